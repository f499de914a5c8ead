"""The command line: ``python -m adnb <command> --help`` documents each command.

- ``run``    execute one chapter with papermill on any dataset and preset; prints its records
- ``book``   execute every chapter of ``_toc.yml`` into the book tree (what ``make book`` calls)
- ``train``  train and evaluate a method on a dataset without Jupyter; prints checkpoints and records
- ``score``  score images or folders with a trained checkpoint: a CSV of scores, PNG overlays
- ``data``   prepare the embedded dataset, download MVTec AD, convert VisA
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence

from adnb.runtime.errors import AdnbError


def _cmd_run(args: argparse.Namespace) -> int:
    from adnb.runtime.runner import parse_value, run_notebook

    params = {key: parse_value(value) for key, value in args.param}
    if args.data_root is not None:
        params["data_root"] = args.data_root
    if args.category is not None:
        params["category"] = args.category
    result = run_notebook(args.notebook, preset=args.preset, parameters=params, output=args.output)
    print(f"executed {result.notebook.name} at preset {args.preset} in {result.seconds:.0f} s -> {result.output}",
          file=sys.stderr)
    if not result.records:
        print("(this chapter wrote no results record)", file=sys.stderr)
    for path in result.records:
        print(path)
    return 0


def _cmd_book(args: argparse.Namespace) -> int:
    from adnb.runtime.runner import build

    results = build(args.preset, keep_going=args.keep_going)
    total = sum(r.seconds for r in results)
    print(f"executed {len(results)} chapters at preset {args.preset} in {total:.0f} s", file=sys.stderr)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from adnb.pipeline import evaluate_and_record, train_category
    from adnb.runtime import get_device, seed_everything
    from adnb.runtime.notebook import open_categories
    from adnb.runtime.presets import load_preset
    from adnb.runtime.runner import parse_value

    params = {**load_preset(args.preset, args.method), **{k: parse_value(v) for k, v in args.param}}
    device = get_device(args.device)
    seed_everything(int(params.get("seed") or 0))
    categories = open_categories(args.data_root or "", args.category or "", params.get("mask_suffix") or None)
    for category in categories:
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the paths below
            detector, peak = train_category(args.method, params, category, device=device, force_train=args.force_train)
            result, record = evaluate_and_record(detector, category, params, args.preset, peak_memory_mb=peak)
        scores = result.table() if result else "no test set with good and anomalous images: not evaluated"
        print(f"{args.method} on {category.dataset}/{category.name}: {scores}", file=sys.stderr)
        print(f"checkpoint: {detector.checkpoint}")
        if record:
            print(f"record: {record}")
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    import csv
    from pathlib import Path

    import cv2
    import numpy as np

    from adnb.data.images import read_image
    from adnb.inference import Scorer, collect_images
    from adnb.plotting import overlay

    scorer = Scorer.from_checkpoint(args.checkpoint, args.device)
    paths = collect_images(args.paths)
    results = list(scorer.score_paths(paths, args.batch_size))
    out = Path(args.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    low = min(float(r.map.min()) for r in results)
    high = max(float(r.map.max()) for r in results) if args.threshold is None else args.threshold
    with open(out / "scores.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "score", *(["anomalous"] if args.threshold is not None else []), "overlay"])
        used: set[str] = set()
        for path, result in zip(paths, results):
            name = f"{path.stem}_overlay.png"
            if name in used:  # same file name in two folders
                name = f"{path.parent.name}_{path.stem}_overlay.png"
            while name in used:
                name = f"_{name}"
            used.add(name)
            picture = overlay(read_image(path), result.map, vmin=low, vmax=high)
            cv2.imwrite(str(out / name), np.ascontiguousarray(picture[:, :, ::-1]))
            flag = [int(result.score >= args.threshold)] if args.threshold is not None else []
            writer.writerow([str(path), f"{result.score:.6g}", *flag, name])
    print(out / "scores.csv")
    print(f"scored {len(results)} image(s) with {scorer.detector.method}; overlays share one colour scale "
          f"[{low:.4g}, {high:.4g}]", file=sys.stderr)
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    if args.action == "prepare":
        from adnb.data import default_dataset

        print(default_dataset())
    elif args.action == "download-mvtec":
        from adnb.data.download import MVTEC_AD, download_mvtec

        print(f"MVTec AD is licensed {MVTEC_AD.licence}", file=sys.stderr)
        print(download_mvtec(args.root, args.category or None))
    elif args.action == "convert-visa":
        from adnb.data.convert import convert_visa

        print("\n".join(convert_visa(args.source, args.dest)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m adnb", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="execute one chapter with papermill; prints the path of each results record",
                         description="Execute one chapter with papermill and print the path of each results record "
                                     "it wrote. Example: python -m adnb run fair --preset ci "
                                     "--data-root ~/data/mvtec_ad --category bottle -p epochs 5")
    run.add_argument("notebook", help="a notebook path or a chapter name (data, fair, pyramidflow, d3ad, realnet, "
                                      "benchmark, own_dataset)")
    run.add_argument("--preset", default="cpu", help="ci, cpu or full (default: cpu)")
    run.add_argument("--data-root", help="dataset folder in MVTec AD layout (default: the embedded dataset)")
    run.add_argument("--category", help="category under the data root (default: every category)")
    run.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                     help="override one notebook parameter (VALUE is read as YAML); repeatable")
    run.add_argument("--output", help="where to write the executed notebook (default: $ADNB_HOME/runs/<preset>/)")
    run.set_defaults(func=_cmd_run)

    book = sub.add_parser("book", help="execute every chapter of _toc.yml into book/chapters/",
                          description="Execute every chapter listed in _toc.yml at one preset into book/chapters/ "
                                      "(make book then renders them with Jupyter Book).")
    book.add_argument("--preset", default="cpu", help="ci, cpu or full (default: cpu)")
    book.add_argument("--keep-going", action="store_true", help="run the remaining chapters after a failure")
    book.set_defaults(func=_cmd_book)

    train = sub.add_parser("train", help="train and evaluate a method without Jupyter",
                           description="Train a method on every category of a dataset (or one), with a preset's "
                                       "settings, evaluate it when the test set allows, write results records and "
                                       "print the checkpoints. Example: python -m adnb train fair --preset ci")
    train.add_argument("method", help="fair, pyramidflow, d3ad, realnet or baseline")
    train.add_argument("--preset", default="cpu", help="ci, cpu or full (default: cpu)")
    train.add_argument("--data-root", help="dataset folder in MVTec AD layout (default: the embedded dataset)")
    train.add_argument("--category", help="category under the data root (default: every category)")
    train.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                       help="override one setting of the preset (as in the chapter's parameters); repeatable")
    train.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    train.add_argument("--force-train", action="store_true", help="retrain even when cached weights exist")
    train.set_defaults(func=_cmd_train)

    score = sub.add_parser("score", help="score images with a trained checkpoint: CSV + PNG overlays",
                           description="Score image files or folders with a trained model. Writes scores.csv and one "
                                       "<stem>_overlay.png per image (the anomaly map over the image, at its own "
                                       "resolution, one colour scale for all) into --out.")
    score.add_argument("paths", nargs="+", help="image files and/or folders of images")
    score.add_argument("--checkpoint", required=True, help="weights.pt of a trained model (a results record's "
                                                           "'checkpoint' field, or printed by 'train')")
    score.add_argument("--out", default=".", help="output folder (default: the current folder)")
    score.add_argument("--threshold", type=float, help="flag images scoring at or above this value; also caps the "
                                                       "colour scale")
    score.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default: 8)")
    score.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    score.set_defaults(func=_cmd_score)

    data = sub.add_parser("data", help="prepare, download or convert datasets",
                          description="Prepare, download or convert datasets.")
    verbs = data.add_subparsers(dest="action", required=True)
    verbs.add_parser("prepare", help="generate the embedded dataset (cached); prints its root")
    mvtec = verbs.add_parser("download-mvtec", help="download MVTec AD (resumable, checksum-verified); prints the root",
                             description="Download and extract MVTec AD under ROOT. Offline, it prints the manual steps.")
    mvtec.add_argument("root", help="folder that will hold <category>/train, test, ground_truth")
    mvtec.add_argument("--category", action="append", help="extract only this category (repeatable)")
    visa = verbs.add_parser("convert-visa", help="lay VisA out as MVTec AD (binarising its masks)",
                            description="Convert VisA (with split_csv/1cls.csv) into the MVTec AD layout.")
    visa.add_argument("source", help="VisA root (holds split_csv/1cls.csv)")
    visa.add_argument("dest", help="output root in MVTec AD layout")
    data.set_defaults(func=_cmd_data)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except AdnbError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

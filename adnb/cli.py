"""The command line: ``python -m adnb <command> --help`` documents each command.

- ``run``    execute one chapter with papermill on any dataset and preset; prints its records
- ``book``   execute every chapter of ``_toc.yml`` into the book tree (what ``make book`` calls)
- ``train``  train and evaluate a method on a dataset without Jupyter; prints checkpoints and records
- ``score``  score images or folders with a trained checkpoint: a CSV of scores, PNG overlays
- ``bench``  time a method's training step and inference on this machine; one JSON line
- ``train-all``  train every (method, category) once into the cache, here or on a Ray cluster
- ``data``   prepare the embedded dataset, download MVTec AD, convert VisA
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Sequence

from adnb.runtime.errors import AdnbError

RESIZE_CHOICES = ("squash", "letterbox", "tile")  # adnb.data.framing.RESIZE_MODES, without importing torch for --help
EXIT_SKIPPED = 3  # score: every readable image was scored, but some files were skipped


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

    start = time.perf_counter()
    results = build(args.preset, keep_going=args.keep_going, jobs=args.jobs)
    print(f"executed {len(results)} chapters at preset {args.preset} in {time.perf_counter() - start:.0f} s "
          f"(the chapters' own seconds add up to {sum(r.seconds for r in results):.0f})", file=sys.stderr)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from adnb.recipe import Recipe
    from adnb.runtime.notebook import open_categories
    from adnb.runtime.runner import parse_value

    recipe = Recipe.from_preset(args.method, args.preset, {k: parse_value(v) for k, v in args.param},
                                device=args.device)
    categories = open_categories(args.data_root or "", args.category or "", recipe.params.get("mask_suffix") or None)
    for category in categories:
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the paths below
            trained = recipe.run(category, force_train=args.force_train)
        result = trained.evaluation
        scores = result.table() if result else "no test set with good and anomalous images: not evaluated"
        print(f"{args.method} on {category.dataset}/{category.name} (config {trained.config_hash}): {scores}",
              file=sys.stderr)
        print(f"checkpoint: {trained.detector.checkpoint}")
        if trained.record:
            print(f"record: {trained.record}")
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from adnb.inference import Scorer, Skipped, collect_images, write_scores
    from adnb.runtime.progress import progress

    scorer = Scorer.from_checkpoint(args.checkpoint, args.device, resize=args.resize, threshold=args.threshold)
    paths = collect_images(args.paths)
    calibration = scorer.calibration
    if calibration is None:
        print(f"note: {args.checkpoint} has no calibration (saved before adnb stored one): raw scores only"
              + ("" if args.threshold is None else f", anomalous = score ≥ {args.threshold:g}")
              + ", each overlay on its own colour scale; retrain it for normalised scores and a default threshold",
              file=sys.stderr)
    elif calibration.resize != scorer.resize:
        print(f"note: the calibration was measured with resize {calibration.resize!r}, this run uses "
              f"{scorer.resize!r}: its threshold may not fit", file=sys.stderr)
    # A bar only for a person at a terminal: quiet in batch runs (ADNB_BATCH=1) and when stderr is a pipe.
    bar = progress(total=len(paths), desc="scoring", unit="img", file=sys.stderr, disable=not sys.stderr.isatty())

    def skip(item: Skipped) -> None:
        tqdm.write(f"skipped {item.source}: {item.reason}", file=sys.stderr)

    try:
        run = write_scores(scorer, paths, args.out, checkpoint=args.checkpoint, batch_size=args.batch_size,
                           overwrite=args.overwrite, overlays=not args.no_overlays, on_skip=skip, on_progress=bar.update)
    except KeyboardInterrupt:
        bar.close()
        print("interrupted: the rows written so far are kept; run the same command again to resume", file=sys.stderr)
        raise
    bar.close()
    print(run.csv)
    resumed = f"; {run.resumed} already in {run.csv.name} (kept)" if run.resumed else ""
    print(f"scored {run.written} image(s) with {scorer.detector.method} (resize {scorer.resize}) in {run.seconds:.1f} s "
          f"({run.images_per_s:.1f} images/s){resumed}", file=sys.stderr)
    if scorer.threshold is not None:
        print(f"{run.anomalous} of {run.written} anomalous; {scorer.describe_threshold()}", file=sys.stderr)
    if run.colour_scale:
        print(f"overlays share the calibration's colour scale [{run.colour_scale[0]:.4g}, {run.colour_scale[1]:.4g}]",
              file=sys.stderr)
    if run.skipped:
        print(f"skipped {len(run.skipped)} file(s) that are not readable images (exit status {EXIT_SKIPPED}):",
              file=sys.stderr)
        for item in run.skipped:
            print(f"  {item.source}: {item.reason}", file=sys.stderr)
        return EXIT_SKIPPED
    return 0


def _threshold(text: str) -> float | str:
    """``--threshold``: a raw score, or ``f1-test``."""
    if text == "f1-test":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number nor f1-test") from None


def _cmd_bench(args: argparse.Namespace) -> int:
    from adnb.bench import bench, summary
    from adnb.recipe import parameters
    from adnb.runtime.runner import parse_value

    overrides = {key: parse_value(value) for key, value in args.param}
    params = parameters(args.method, args.preset, overrides) if args.preset else overrides  # what its chapter trains
    result = bench(args.method, params, size=args.size, batch=args.batch, steps=args.steps, warmup=args.warmup,
                   infer_images=args.infer_images, precision=args.precision, device=args.device, images=args.images)
    print(summary(result), file=sys.stderr)
    print(result.json())
    return 0


def _cmd_train_all(args: argparse.Namespace) -> int:
    from adnb.methods import names
    from adnb.runtime.runner import parse_value
    from adnb.schedule import train_all

    report = train_all(args.methods or names(), args.preset, data_root=args.data_root or "",
                       categories=args.categories, overrides={k: parse_value(v) for k, v in args.param},
                       executor=args.executor, jobs=args.jobs, threads=args.threads, address=args.address,
                       device=args.device, worker_home=args.worker_home)
    for path in report.records:
        print(path)
    failed = f", {len(report.failed)} failed (logs under $ADNB_HOME/logs/train-all/)" if report.failed else ""
    print(f"train-all: {len(report.trained)} trained, {len(report.skipped)} already trained{failed}"
          + (f" in {report.seconds:.0f} s" if report.seconds else ""), file=sys.stderr)
    if report.failed:
        print("run the same command again to retry the failed jobs (finished ones are skipped)", file=sys.stderr)
    return 1 if report.failed else 0


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
    book.add_argument("--jobs", type=int, help="chapters at once, the cores split between them (default: 2 where "
                                               "there are 2 cores or more, or $ADNB_BOOK_JOBS)")
    book.set_defaults(func=_cmd_book)

    train = sub.add_parser("train", help="train and evaluate a method without Jupyter",
                           description="Train a method on every category of a dataset (or one), with a preset's "
                                       "settings, evaluate it when the test set allows, write results records and "
                                       "print the checkpoints. Example: python -m adnb train fair --preset ci")
    train.add_argument("method", help="fair, pyramidflow, d3ad, realnet, baseline, patchcore, padim or any installed method")
    train.add_argument("--preset", default="cpu", help="ci, cpu or full (default: cpu)")
    train.add_argument("--data-root", help="dataset folder in MVTec AD layout (default: the embedded dataset)")
    train.add_argument("--category", help="category under the data root (default: every category)")
    train.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                       help="override one setting of the preset (as in the chapter's parameters); repeatable")
    train.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    train.add_argument("--force-train", action="store_true", help="retrain even when cached weights exist")
    train.set_defaults(func=_cmd_train)

    score = sub.add_parser(
        "score", help="score images with a trained checkpoint: CSV + PNG overlays",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Score image files or folders with a trained model, streaming: each batch of images is read,\n"
                    "scored and written (rows of OUT/scores.csv, OUT/<stem>_overlay.png) before the next, so memory\n"
                    "stays flat for any number of images and an interrupted run resumes where it stopped. Maps\n"
                    "come back at each image's own resolution.",
        epilog="""columns of scores.csv:
  image       the path as given
  score       the model's raw anomaly score (larger = more anomalous; units depend on the method)
  normalised  the score on a common scale: the threshold maps to 0.5 (anomalib's min-max rule), in [0, 1]
  anomalous   1 if score >= threshold, else 0
  overlay     the overlay's file name in OUT
Its first line, '# threshold ...', says where the threshold came from and what it guarantees
(pandas: read_csv(path, comment="#")).

The default threshold comes from held-out good images only (10 % of train/good, 2 to 20 images,
never trained on): the k-th smallest of their n scores, k = min(ceil((n+1)(1-a)), n), a = 0.01.
A new good image scores at or above it with probability at most (n+1-k)/(n+1) (conformal: its
rank among the n+1 scores is uniform). Below 99 held-out images k = n, the largest score, and the
bound is 1/(n+1): 1/11 = 9.1 % for 10 images, 1/21 = 4.8 % for 20, not 1 %. 'score' prints the
checkpoint's own n and bound. --threshold f1-test takes instead the F1-optimal threshold on the
labelled test set the checkpoint was evaluated on: optimistic, as it is chosen on the images whose
metrics are reported. --threshold VALUE sets a raw score. Every overlay uses the calibration's one
fixed colour scale, so overlays of different images and runs can be compared. A checkpoint without
a calibration (saved before adnb stored one): raw scores only ('anomalous' with --threshold VALUE),
each overlay on its own map's range.

Unreadable files (empty, damaged, not an image) are skipped with one line each and listed again at
the end; everything else is scored. Images already in OUT/scores.csv are not scored again unless
--overwrite (a resumed run must use the same checkpoint, --resize and --threshold).

exit status: 0 every image scored; 3 some files were skipped (the rest was scored);
2 a usage error (no such checkpoint or input, a CSV from another run); 130 interrupted.""")
    score.add_argument("paths", nargs="+", help="image files and/or folders of images")
    score.add_argument("--checkpoint", required=True, help="weights.pt of a trained model (a results record's "
                                                           "'checkpoint' field, or printed by 'train')")
    score.add_argument("--out", default=".", help="output folder (default: the current folder)")
    score.add_argument("--threshold", type=_threshold, metavar="VALUE|f1-test",
                       help="raw score at or above which an image is anomalous, or f1-test: the F1-optimal threshold "
                            "on the labelled test set (optimistic) (default: the calibration's threshold from held-out "
                            "good images, with its false-alarm bound; see below)")
    score.add_argument("--resize", choices=RESIZE_CHOICES, help="how an image reaches the model's square input: "
                       "squash (resize, ignoring the aspect ratio), letterbox (fit the long side, pad) or tile "
                       "(fit the short side, score overlapping square tiles, stitch one map) (default: the mode the "
                       "checkpoint was trained with, else squash)")
    score.add_argument("--overwrite", action="store_true", help="score every image again, replacing OUT/scores.csv")
    score.add_argument("--no-overlays", action="store_true", help="write the CSV only (faster)")
    score.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default: 8)")
    score.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    score.set_defaults(func=_cmd_score)

    bench = sub.add_parser(
        "bench", help="time a method's training step and inference; prints one JSON line",
        description="Time training steps (after warm-up) and inference at batch 1 and 8 of one method on this "
                    "machine, on synthetic images (or --images), and print one JSON line: median s/step, images/s, "
                    "peak memory, the precision and the machine (CPU flags or GPU name). A benchmark: nothing is "
                    "trained to convergence and nothing is judged. Example: python -m adnb bench fair --size 128 "
                    "--batch 8 -p width 32 --precision bf16")
    bench.add_argument("method", help="a method that trains iteratively: fair, pyramidflow, d3ad, realnet or any "
                                      "installed one")
    bench.add_argument("--size", type=int, help="image side (default: the method's or the preset's image_size)")
    bench.add_argument("--batch", type=int, help="training batch (default: the method's or the preset's batch_size)")
    bench.add_argument("--steps", type=int, default=5, help="timed training steps (default: 5)")
    bench.add_argument("--warmup", type=int, default=2, help="untimed training steps first (default: 2)")
    bench.add_argument("--infer-images", type=int, default=64, help="images timed at each inference batch size "
                                                                    "(default: 64)")
    bench.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                       help="arithmetic: auto = bf16 where the hardware has it, else fp32 (CPU) or fp16 (CUDA)")
    bench.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    bench.add_argument("--preset", help="start from a preset's settings (ci, cpu, full; default: the method's own "
                                        "defaults, i.e. the paper's)")
    bench.add_argument("--images", help="a folder of images to use instead of synthetic ones")
    bench.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                       help="override one setting (VALUE is read as YAML), e.g. -p width 32; repeatable")
    bench.set_defaults(func=_cmd_bench)

    train_all = sub.add_parser(
        "train-all", help="train every (method, category) once into the cache, here or on a Ray cluster",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Plan one job per (method, category), skip those whose weights are in the cache ($ADNB_HOME), and\n"
                    "train the rest: in a pool of processes here (--executor local) or as Ray tasks (--executor ray,\n"
                    "pip install -e .[ray]). Workers need no shared file system: each sends its weights and results\n"
                    "record back to this machine. 'make book' afterwards loads every model instead of training it.\n"
                    "Example: python -m adnb train-all --preset full --executor ray --address auto",
        epilog="One line per finished job; a failed job is reported with the end of its log (the whole log is\n"
               "under $ADNB_HOME/logs/train-all/) and the others go on. Run the same command again to resume:\n"
               "finished jobs are skipped, interrupted ones resume from their checkpoints where the worker\n"
               "keeps its cache. On a cluster every node needs adnb installed and the dataset at the same path.\n"
               "exit status: 0 every job trained (or already was); 1 some job failed; 2 a usage error.")
    train_all.add_argument("--preset", required=True, help="ci, cpu or full")
    train_all.add_argument("--methods", nargs="+", metavar="METHOD",
                           help="methods to train (default: every method adnb knows: the book's baseline patchcore "
                                "padim fair pyramidflow d3ad realnet, and any installed one)")
    train_all.add_argument("--data-root", help="dataset folder in MVTec AD layout (default: the embedded dataset)")
    train_all.add_argument("--categories", nargs="+", metavar="NAME", help="categories (default: every category)")
    train_all.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                           help="override a preset setting: KEY for every method, METHOD.KEY for one (VALUE is read "
                                "as YAML); repeatable. 'make book' trains with the preset alone: overridden models "
                                "are not the book's")
    train_all.add_argument("--executor", choices=("local", "ray"), default="local",
                           help="local: processes on this machine (default); ray: Ray tasks")
    train_all.add_argument("--jobs", type=int, help="jobs at once (default: local 1; ray: one per GPU, else per CPU)")
    train_all.add_argument("--threads", type=int, help="CPU threads per job, reserved from Ray on a cluster "
                                                       "(default: the CPUs divided among the jobs)")
    train_all.add_argument("--address", help="Ray cluster address (e.g. auto or ray://head:10001; default: start a "
                                             "local Ray instance)")
    train_all.add_argument("--device", default="auto", help="auto, cpu or cuda (ray: one GPU per task where the "
                                                            "cluster has GPUs, with auto)")
    train_all.add_argument("--worker-home", help="the ADNB_HOME workers train in (default: each worker's own)")
    train_all.set_defaults(func=_cmd_train_all)

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

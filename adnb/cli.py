"""The command line: ``python -m adnb <command> --help`` documents each command.

- ``run``    execute one chapter with papermill on any dataset and preset; prints its records
- ``book``   execute every chapter of ``_toc.yml`` into the book tree (what ``make book`` calls)
- ``data``   prepare the embedded dataset, download MVTec AD, convert VisA/BTAD
"""

from __future__ import annotations

import argparse
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

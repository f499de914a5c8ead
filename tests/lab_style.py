"""Run chapters the way JupyterLab does and check that each is the cpu book's run.

"The way JupyterLab does": the source notebook as it is in ``notebooks/``, no papermill and no preset
file (so only the parameters cell's defaults), a fresh ``python3`` kernel in the notebooks folder, not
in batch mode (live widgets, progress bars). After ``make book PRESET=cpu`` such a run must

- train nothing: no weights file appears or changes under ``$ADNB_HOME/weights``;
- write only records the cpu book wrote: every record it writes (under ``$ADNB_HOME/results``) has a
  twin at the same relative path, with the same config hash, among the book's records
  (``$ADNB_HOME/book-results``; a record's file name carries the hash). The path includes the preset
  folder: the own-dataset chapter's command-line run uses ``run_preset`` (``ci``), in the book too.

Run it with the ADNB_HOME of that book (``make`` uses ``.adnb``)::

    ADNB_HOME=$PWD/.adnb HF_HUB_OFFLINE=1 .venv/bin/python tests/lab_style.py [CHAPTER ...]

It prints one line per chapter (seconds, records, new or changed weights) and exits 1 when a chapter
trained, wrote a record of another configuration, or failed. Not a pytest module: it needs a built
cpu book, which the test suite does not have.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from adnb.runtime import paths, runner


def weights_state() -> dict[str, float]:
    """Every stored weights or resume file of the cache, with its modification time."""
    root = paths.cache_dir()
    return {str(p): p.stat().st_mtime for p in root.rglob("*.pt")} if root.is_dir() else {}


def record_hashes(root: Path) -> dict[str, str]:
    """Every record under ``root``, by its path relative to ``root``, with its config hash."""
    return ({str(p.relative_to(root)): json.loads(p.read_text()).get("config_hash", "") for p in root.rglob("*.json")}
            if root.is_dir() else {})


def run_like_jupyterlab(source: Path) -> tuple[float, list[str]]:
    """Execute ``source`` in a fresh kernel as JupyterLab would; returns (seconds, records written)."""
    nb = nbformat.read(source, as_version=4)
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "records.txt"
        saved = dict(os.environ)
        for name in ("ADNB_BATCH", "TQDM_DISABLE"):  # a reader's JupyterLab sets neither
            os.environ.pop(name, None)
        os.environ["ADNB_RECORD_LOG"] = str(log)  # the kernel inherits it: each record written is logged
        start = time.perf_counter()
        try:
            NotebookClient(nb, kernel_name="python3", timeout=3600,
                           resources={"metadata": {"path": str(source.parent)}}).execute()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        seconds = time.perf_counter() - start
        written = list(dict.fromkeys(log.read_text().split())) if log.exists() else []
    return seconds, written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("chapters", nargs="*", help="chapter names (default: every chapter of _toc.yml)")
    args = parser.parse_args(argv)
    sources = [runner.find_notebook(c) for c in args.chapters] or [src for src, _ in runner.toc_chapters()]
    book_root, lab_root = paths.book_results_dir(), paths.results_dir()
    book_records = record_hashes(book_root)
    if not any(Path(p).parts[0] == "cpu" for p in book_records):
        print(f"no cpu records under {book_root / 'cpu'}: build the cpu book first (make book PRESET=cpu)")
        return 1
    failed = False
    for source in sources:
        before = weights_state()
        try:
            seconds, written = run_like_jupyterlab(source)
        except Exception as error:  # report the chapter and go on with the others
            print(f"{source.stem}: FAILED: {type(error).__name__}: {str(error)[:300]}")
            failed = True
            continue
        after = weights_state()
        trained = sorted(p for p in after if before.get(p) != after[p])
        now = record_hashes(lab_root)
        relative = {p: str(Path(p).relative_to(lab_root)) if Path(p).is_relative_to(lab_root) else None
                    for p in written}
        foreign = [p for p, rel in relative.items() if rel is None or book_records.get(rel) != now.get(rel)]
        ok = not trained and not foreign
        failed |= not ok
        print(f"{source.stem}: {seconds:.0f} s, {len(written)} record(s) written, {len(trained)} weights file(s) "
              f"new or changed{'' if ok else ' -- NOT the cpu book run'}", flush=True)
        for path in trained:
            print(f"  trained: {path}")
        for path in foreign:
            print(f"  record not the cpu book's (new file or other config hash): {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""The notebook runner behind ``make book`` and ``python -m adnb run``: papermill with guard rails.

- parameters come from the preset's YAML, then ``--data-root``/``--category``, then ``-p`` pairs;
  an unknown name or a value of the wrong type fails before anything runs, listing the valid ones;
- the kernel runs in batch mode (``ADNB_BATCH=1``: no progress bars, no widgets);
- the executed copy gets its injected-parameters cell collapsed (``hide-cell``) and any widget
  debris removed, ready for Jupyter Book;
- a failing cell ends the run with one message naming the notebook, the cell and the error;
- the results records the run wrote are returned (and printed by the CLI).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbformat
import yaml

from adnb.runtime import paths
from adnb.runtime.environment import environment
from adnb.runtime.errors import AdnbError
from adnb.runtime.presets import chapter_key, load_preset, registered_chapter

WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
STAMP_KEY = "adnb"  # an executed chapter's metadata: its preset, the fingerprint of its inputs, its records
TYPES = {"int": int, "float": (int, float), "bool": bool, "str": str, "list": list, "dict": dict}


@dataclass
class RunResult:
    notebook: Path
    output: Path
    records: list[Path] = field(default_factory=list)
    seconds: float = 0.0


class NotebookFailed(AdnbError):
    """A cell of a notebook raised; the message names the notebook, the cell and the error."""


def find_notebook(name: str | Path) -> Path:
    """A notebook path, or a chapter name such as ``fair`` or ``02_fair_frequency_filters``."""
    path = Path(name)
    if path.suffix == ".ipynb" and path.is_file():
        return path.resolve()
    candidates = sorted(paths.notebooks_dir().glob("*.ipynb"))
    matches = [p for p in candidates if p.stem == path.stem or chapter_key(p) == path.stem.lower()]
    if len(matches) == 1:
        return matches[0]
    method = None if matches else registered_chapter(path.stem)  # a method's own chapter, outside the book
    if method is not None:
        return method.notebook.resolve()
    names = ", ".join(p.stem for p in candidates) or "(none found)"
    what = "is ambiguous" if matches else "is not a notebook file or a chapter name"
    raise AdnbError(f"{str(name)!r} {what}; chapters: {names}")


def notebook_parameters(notebook: Path) -> dict[str, dict[str, Any]]:
    """The ``parameters`` cell's names with their declared type, default and help comment."""
    import papermill

    return dict(papermill.inspect_notebook(str(notebook)))


def notebook_defaults(chapter: str | Path) -> dict[str, Any]:
    """The default value of every parameter of a chapter's ``parameters`` cell (literals only)."""
    import ast

    out = {}
    for name, spec in notebook_parameters(find_notebook(chapter)).items():
        try:
            out[name] = ast.literal_eval(spec["default"])
        except (ValueError, SyntaxError):
            raise AdnbError(f"the default of parameter {name} in {chapter}'s notebook is not a literal "
                            f"({spec['default']!r}); parameters cells hold plain values") from None
    return out


def chapter_parameters(chapter: str, namespace: Mapping[str, Any]) -> dict[str, Any]:
    """The values of a chapter's parameters in ``namespace`` (a notebook's ``globals()``): what the
    chapter runs with, papermill's injections included — the same mapping ``adnb.recipe.parameters``
    builds for the command line."""
    return {name: namespace[name] for name in notebook_parameters(find_notebook(chapter)) if name in namespace}


def parse_value(text: str) -> Any:
    """A ``-p`` value, read as YAML: ``3`` is an int, ``true`` a bool, ``[a, b]`` a list."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def check_parameters(notebook: Path, values: Mapping[str, Any], what: str = "") -> None:
    """An error naming the valid keys for a key of ``values`` that ``notebook``'s parameters cell does not
    declare, or a value of another type than its default's (``what`` names the notebook in messages)."""
    declared = notebook_parameters(notebook)
    what = what or notebook.name
    valid = ", ".join(sorted(declared))
    unknown = sorted(set(values) - set(declared))
    if unknown:
        raise AdnbError(f"unknown parameter(s) {', '.join(unknown)} for {what}; valid: {valid}")
    for key, value in values.items():
        kind = TYPES.get(str(declared[key].get("inferred_type_name")).split("[")[0])
        if kind is None or value is None:
            continue
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            want = declared[key]["inferred_type_name"]
            raise AdnbError(f"parameter {key}={value!r} of {what} should be {want} "
                            f"(default {declared[key]['default']}); {declared[key].get('help') or ''}".rstrip("; "))


@contextlib.contextmanager
def _batch_environment(record_log: Path) -> Iterator[None]:
    with environment(ADNB_BATCH="1", TQDM_DISABLE="1", ADNB_RECORD_LOG=str(record_log),
                     PYDEVD_DISABLE_FILE_VALIDATION="1", MPLBACKEND="module://matplotlib_inline.backend_inline"):
        yield


def finalize(output: Path) -> None:
    """Collapse the injected-parameters cell and drop widget debris from an executed notebook."""
    nb = nbformat.read(output, as_version=4)
    for cell in nb.cells:
        tags = cell.metadata.setdefault("tags", [])
        if "injected-parameters" in tags and "hide-cell" not in tags:
            tags.append("hide-cell")
        if cell.cell_type == "code":
            for out in cell.get("outputs", []):
                data = out.get("data", {})
                if WIDGET_MIME in data:
                    data.pop(WIDGET_MIME)
                    if set(data) == {"text/plain"}:
                        data.pop("text/plain")
            cell.outputs = [o for o in cell.get("outputs", []) if o.get("output_type") != "display_data" or o.get("data")]
    nb.metadata.pop("widgets", None)
    nbformat.write(nb, output)


PATH_SUFFIXES = ("_root", "_dir")  # parameters named so are folders


def _callers_paths(parameters: Mapping[str, Any]) -> dict[str, Any]:
    """``parameters`` with relative folders made absolute: the chapter runs in its own folder, but a
    path the caller typed means the caller's working folder (the folder's name, part of a dataset's
    identity, is kept as given)."""
    return {key: os.path.abspath(os.path.expanduser(value))
            if key.endswith(PATH_SUFFIXES) and isinstance(value, str) and value else value
            for key, value in parameters.items()}


def run_notebook(notebook: str | Path, *, preset: str = "cpu", parameters: Mapping[str, Any] | None = None,
                 output: str | Path | None = None, timeout: int | None = None) -> RunResult:
    """Execute ``notebook`` with papermill at ``preset`` (plus ``parameters``) into ``output``."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    source = find_notebook(notebook)
    values = {**load_preset(preset, source), **_callers_paths(parameters or {})}
    check_parameters(source, values)
    output = Path(output) if output else paths.home() / "runs" / preset / source.name
    output.parent.mkdir(parents=True, exist_ok=True)
    timeout = timeout or int(os.environ.get("ADNB_CELL_TIMEOUT", "3600"))
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "records.txt"
        start = time.perf_counter()
        with _batch_environment(log):
            try:
                papermill.execute_notebook(str(source), str(output), parameters=values, kernel_name="python3",
                                           cwd=str(source.parent), execution_timeout=timeout, progress_bar=False)
            except PapermillExecutionError as exc:
                first = next((line for line in exc.source.splitlines() if line.strip()), "")
                raise NotebookFailed(
                    f"{source.name} failed in cell {exc.cell_index} (execution count {exc.exec_count}): "
                    f"{exc.ename}: {exc.evalue}\n  the cell begins: {first[:100]}\n"
                    f"  the executed notebook, with the full traceback, is {output}") from None
        seconds = time.perf_counter() - start
        records = [Path(line) for line in dict.fromkeys(log.read_text().split())] if log.exists() else []
    finalize(output)
    return RunResult(source, output, records, seconds)


def toc_chapters(toc: Path | None = None) -> list[tuple[Path, Path]]:
    """(source notebook, executed copy) for every executed chapter listed in ``_toc.yml``.

    The table of contents lists the executed copies under ``book/chapters/``; their sources are
    the notebooks of the same name in ``notebooks/``.
    """
    toc = toc or paths.REPO_ROOT / "_toc.yml"
    files: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("file"), str):
                files.append(node["file"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(yaml.safe_load(toc.read_text()))
    chapters = []
    for entry in files:
        executed = paths.REPO_ROOT / (entry if entry.endswith(".ipynb") else entry + ".ipynb")
        if executed.parent.name == "chapters":
            source = paths.notebooks_dir() / executed.name
            if not source.is_file():
                raise AdnbError(f"_toc.yml lists {entry} but there is no source notebook {source}")
            chapters.append((source, executed))
    return chapters


@functools.lru_cache(maxsize=1)
def package_fingerprint() -> str:
    """A hash of what every chapter runs on: the package's code and presets and the pinned requirements."""
    root = paths.REPO_ROOT
    files = sorted([*(root / "adnb").rglob("*.py"), *(root / "adnb" / "presets").rglob("*.yaml"),
                    root / "requirements.txt"])
    digest = hashlib.sha256()
    for path in files:
        if path.is_file():
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def chapter_fingerprints(preset: str) -> dict[Path, str]:
    """For every chapter of the book (source notebook → hash): what its execution at ``preset`` depends on —
    its notebook, the package, and the chapters before it, whose records the later chapters read."""
    chain = hashlib.sha256(f"{preset}|{package_fingerprint()}".encode())
    fingerprints = {}
    for source, _ in toc_chapters():
        chain.update(source.read_bytes())
        fingerprints[source] = chain.hexdigest()[:16]
    return fingerprints


def stamp(result: RunResult, preset: str, fingerprint: str) -> None:
    """Write into the executed chapter what it was built from and which records it wrote."""
    nb = nbformat.read(result.output, as_version=4)
    nb.metadata[STAMP_KEY] = {"preset": preset, "fingerprint": fingerprint, "seconds": round(result.seconds, 1),
                              "records": [str(p) for p in result.records]}
    nbformat.write(nb, result.output)


def current_book(preset: str) -> list[RunResult] | None:
    """The book's executed chapters (``book/chapters``) when every one was built at ``preset`` from the
    notebooks, package and requirements as they are now and its records are still there; else None.

    The notebook tests check these instead of executing the chapters a second time after ``make book``.
    """
    fingerprints = chapter_fingerprints(preset)
    results = []
    for source, executed in toc_chapters():
        if not executed.is_file():
            return None
        info = nbformat.read(executed, as_version=4).metadata.get(STAMP_KEY, {})
        records = [Path(p) for p in info.get("records", [])]
        if (info.get("preset"), info.get("fingerprint")) != (preset, fingerprints[source]) or not all(
                p.is_file() for p in records):
            return None
        results.append(RunResult(source, executed, records, float(info.get("seconds", 0.0))))
    return results


@contextlib.contextmanager
def _results_in(folder: Path) -> Iterator[None]:
    """Records written meanwhile (by this process and the kernels it starts) go under ``folder``."""
    saved = os.environ.get("ADNB_RESULTS")
    os.environ["ADNB_RESULTS"] = str(folder)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("ADNB_RESULTS", None)
        else:
            os.environ["ADNB_RESULTS"] = saved


def reads_records(notebook: Path) -> bool:
    """Whether a chapter reads the records other chapters wrote (it calls ``load_records``)."""
    return any(cell.cell_type == "code" and "load_records" in cell.source
               for cell in nbformat.read(notebook, as_version=4).cells)


def build_jobs() -> int:
    """Chapters the book build runs at once: two where there are two cores or more (``$ADNB_BOOK_JOBS`` to
    change it). A training step at one thread took 1.24× (D3AD) to 1.59× (FAIR) the time it took at two
    (``adnb bench <method> --preset cpu``, 2 cores with AVX512-BF16), so two chapters at one thread each
    finish sooner than the same two one after the other at two threads: the ``cpu`` book (fresh clone, empty
    cache, install included) in 871 s instead of 1,070 s on that machine."""
    from adnb.schedule.executors import usable_cpus

    return int(os.environ.get("ADNB_BOOK_JOBS") or min(2, usable_cpus()))


def previous_seconds(executed: Path, preset: str) -> float:
    """How long the book's last build of ``executed`` at ``preset`` took (0 when there is none)."""
    if not executed.is_file():
        return 0.0
    info = nbformat.read(executed, as_version=4).metadata.get(STAMP_KEY, {})
    return float(info.get("seconds", 0.0)) if info.get("preset") == preset else 0.0


def build(preset: str = "cpu", keep_going: bool = False, into: Path | None = None,
          jobs: int | None = None) -> list[RunResult]:
    """Execute every chapter of ``_toc.yml`` at ``preset`` into the book tree (or the folder ``into``).

    Up to ``jobs`` chapters run at once (default ``build_jobs()``), each in a process of its own on an
    equal share of the cores, also when it runs alone: every training second of one build is measured
    at the same thread count, so the benchmark's cost table compares like with like. A chapter that
    reads the records of others (``reads_records``) starts once every chapter before it in the book has
    finished. Of the chapters ready to start, the one the last build of this preset spent longest on
    goes first (book order when there was none), so that a long chapter does not end up running alone
    at the end.

    The build writes its records in a folder of its own, ``paths.book_results_dir()``, so the
    benchmark compares only what this build produced, and the records that ``run``, ``train`` and
    ``train-all`` write under ``$ADNB_HOME/results`` are never touched. Only the previous build's
    records of this preset (that folder's ``<preset>/``) are replaced. Trained weights stay cached;
    rewriting a record costs an evaluation, not a training.
    """
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait

    from adnb.schedule.executors import usable_cpus
    from adnb.schedule.worker import init_local_worker

    jobs = max(1, jobs or build_jobs())
    share = max(1, usable_cpus() // jobs)
    root = paths.book_results_dir()
    chapters = toc_chapters()
    order = [source for source, _ in chapters]
    output = {source: into / executed.name if into else executed for source, executed in chapters}
    waits = {source: reads_records(source) for source in order}
    pending = sorted(order, key=lambda s: -previous_seconds(output[s], preset))  # stable: book order on ties
    fingerprints = chapter_fingerprints(preset)
    shutil.rmtree(root / preset, ignore_errors=True)  # the previous build's output, nothing else
    results: dict[Path, RunResult] = {}
    failed: dict[Path, str] = {}
    running: dict[Future, Path] = {}

    def ready() -> list[Path]:
        if failed and not keep_going:
            return []
        done = set(results) | set(failed)
        return [s for s in pending if not waits[s] or all(b in done for b in order[:order.index(s)])]

    # each pool process takes its share of the cores before anything sizes a thread pool; a chapter's kernel
    # inherits it through OMP_NUM_THREADS
    with _results_in(root), ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=init_local_worker, initargs=(share,)) as pool:
        while True:
            for source in ready()[:jobs - len(running)]:
                print(f"[{preset}] {source.name} ... ({share} thread(s))", flush=True)
                running[pool.submit(run_notebook, source, preset=preset, output=output[source])] = source
                pending.remove(source)
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                source = running.pop(future)
                try:
                    result = future.result()
                except NotebookFailed as exc:
                    failed[source] = str(exc)
                    print(f"[{preset}] {source.name} failed", flush=True)
                    continue
                stamp(result, preset, fingerprints[source])
                results[source] = result
                print(f"[{preset}] {source.name} done in {result.seconds:.0f} s", flush=True)
    if failed:
        raise NotebookFailed(f"{len(failed)} notebook(s) failed:\n" + "\n".join(failed.values()))
    return [results[source] for source in order if source in results]

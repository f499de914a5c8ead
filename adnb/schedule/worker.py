"""What a ``train-all`` worker does with one job: prepare → fit → evaluate → record, all logged.

``run_job`` runs in the worker's process (a local pool process or a Ray task). It refuses a job
from a driver of another adnb version, trains in the worker's ``ADNB_HOME``, captures everything
the job prints (C++ warnings too) into the job's log file there, and sends back what the driver
needs: the files of the cache entries it made (unless the cache is shared), the results record
and the log. It never raises for a failing job: the error and the log come back, and the other
jobs go on.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import traceback
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adnb import __version__
from adnb.runtime import paths
from adnb.runtime.environment import environment
from adnb.schedule.plan import Job
from adnb.schedule.transfer import Files, is_shared, read_entries, relative, write_entries


@dataclass
class Task:
    """What a worker is given: the job and how to run it."""

    index: int
    job: Job
    device: str = "auto"
    threads: int = 1
    home: str | None = None  # the worker's ADNB_HOME (None: whatever its environment says)
    marker: tuple[str, str] = ("", "")  # a file only the driver's cache holds: found there, the cache is shared
    version: str = __version__  # the driver's adnb: a worker with another one refuses the job


@dataclass
class Outcome:
    """What a worker sends back."""

    ok: bool
    seconds: float = 0.0
    error: str = ""
    log: str = ""
    entry: str = ""  # the detector's entry (relative)
    loaded: bool = False  # the worker found it trained in its own cache
    prepared: list[str] = field(default_factory=list)  # the preparation entries the job used (relative)
    files: Files = field(default_factory=dict)  # the entries' files, when the worker's cache is not the driver's
    record: dict[str, Any] | None = None
    cache_root: str = ""  # the worker's cache root, to move the record's checkpoint path to the driver's


def log_path(job: Job, home: Path | None = None) -> Path:
    """Where the log of ``job`` is kept under ``home`` (default: this process's ``ADNB_HOME``)."""
    return (home or paths.home()) / "logs" / "train-all" / job.preset / f"{job.label}-{job.dataset}-{job.category}.log"


def version_mismatch(driver: str) -> str:
    """The refusal of a worker whose adnb is not the driver's ("" when they agree)."""
    if driver == __version__:
        return ""
    return (f"this worker runs adnb {__version__} and the machine that ran train-all adnb {driver}: models and "
            "cache keys would not match; install the same adnb on every node")


def run_job(task: Task, needs: Mapping[str, bytes] | None = None) -> Outcome:
    """Train ``task.job`` in this process (see the module docstring). ``needs`` are the files of the
    preparation entries the job uses, made elsewhere."""
    start = time.perf_counter()
    refusal = version_mismatch(task.version)
    if refusal:
        return Outcome(False, error=refusal)
    with job_environment(task):
        log = log_path(task.job)
        log.parent.mkdir(parents=True, exist_ok=True)
        with captured(log):
            outcome = _run_captured(task, needs)
        outcome.log = log.read_text(errors="replace")
    outcome.seconds = time.perf_counter() - start
    return outcome


def _run_captured(task: Task, needs: Mapping[str, bytes] | None) -> Outcome:
    job, root = task.job, paths.cache_dir()
    shared = is_shared(task.marker)
    given = {name.rpartition("/")[0] for name in needs or {}}  # the driver has these: they need not go back

    def files_of(folders: list[str]) -> Files:
        return {} if shared else read_entries([f for f in folders if f not in given], root)

    prepared_entries: list[str] = []
    try:
        if needs and not shared:
            write_entries(needs, root)
        recipe = job.recipe(device=task.device)
        category = job.open(recipe)
        config = recipe.config(category)
        prepared = recipe.prepare(config, category)
        prepared_entries = [relative(e.folder) for e in prepared.entries if e.exists()]
        entry = recipe.cache_entry(category, config=config, prepared=prepared)
        loaded = entry.exists()
        trained = recipe.run(category, config=config, prepared=prepared)
        made = [relative(e.folder) for e in (trained.entry, *trained.entry.stages) if e.exists()]
        record = json.loads(trained.record.read_text()) if trained.record else None
        print(f"{job.name}: {'loaded' if loaded else 'trained'} in {root}, entries {', '.join(made) or 'none'}; "
              f"record {trained.record or 'none (no test set with good and anomalous images)'}")
        return Outcome(True, entry=relative(entry.folder), loaded=loaded, prepared=prepared_entries,
                       files=files_of([*prepared_entries, *made]), record=record, cache_root=str(root))
    except Exception as exc:
        traceback.print_exc()
        # A preparation that finished is kept: the jobs waiting for it can still run.
        return Outcome(False, error=f"{type(exc).__name__}: {exc}", prepared=prepared_entries,
                       files=files_of(prepared_entries), cache_root=str(root))


@contextlib.contextmanager
def job_environment(task: Task) -> Iterator[None]:
    """Batch mode (no progress bars), the task's ADNB_HOME and thread count, restored afterwards."""
    import torch

    values = {"ADNB_BATCH": "1", "TQDM_DISABLE": "1", **({"ADNB_HOME": str(task.home)} if task.home else {})}
    threads = torch.get_num_threads()
    torch.set_num_threads(task.threads)
    try:
        with environment(**values):
            yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def captured(log: Path) -> Iterator[None]:
    """Send this process's stdout and stderr (file descriptors 1 and 2: C++ warnings too) to ``log``, as
    they come (a worker that dies leaves its log so far)."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
        if hasattr(stream, "reconfigure"):  # line by line: a worker killed mid-job leaves its last lines
            stream.reconfigure(line_buffering=True)
    saved = os.dup(1), os.dup(2)
    with open(log, "wb", buffering=0) as fh:
        os.dup2(fh.fileno(), 1)
        os.dup2(fh.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def init_local_worker(threads: int) -> None:
    """A pool process's start: its share of the cores, before torch sizes its thread pools."""
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)

"""``train-all``'s driver: plan, hand the jobs to an executor, bring each finished one home, report.

Jobs that share a missing preparation wait for the first of them, which goes first; a finished
job's cache entries are written into this machine's cache and its record into its results; a
failed job is reported with the end of its log (the whole log under ``$ADNB_HOME/logs/train-all/``)
and the others go on. Running the same call again trains only what is missing.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from adnb.runtime import atomic, paths
from adnb.runtime.errors import AdnbError
from adnb.schedule.executors import EXECUTORS, Executor, make_executor
from adnb.schedule.plan import Job, Planned, check_request, plan
from adnb.schedule.transfer import moved_record, place_marker, read_entries, write_entries
from adnb.schedule.worker import Outcome, Task, log_path

LOG_TAIL = 30  # lines of a failed job's log printed with its failure (a traceback through a method's training fits)


@dataclass
class Report:
    """What a ``train-all`` call did."""

    planned: list[Planned]
    trained: list[Planned] = field(default_factory=list)
    failed: list[tuple[Planned, str]] = field(default_factory=list)
    records: list[Path] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def skipped(self) -> list[Planned]:
        return [p for p in self.planned if p.trained]


def run_jobs(planned: Sequence[Planned], executor: Executor, *, worker_home: str | None = None,
             out: IO[str] = sys.stderr) -> Report:
    """Run every job of ``planned`` that is not trained yet, ``executor.jobs`` at a time; one line per finished job."""
    start = time.perf_counter()
    report = Report(list(planned))
    todo = [p for p in planned if not p.trained]
    print(f"train-all: {len(planned)} job(s), {len(report.skipped)} already trained, {len(todo)} to run on "
          f"{executor.describe()}", file=out, flush=True)
    ready: deque[Planned] = deque()
    leaders: dict[str, Planned] = {}  # a missing shared preparation → the job that makes it
    waiting: dict[str, list[Planned]] = {}  # … → the jobs that wait for it
    for p in todo:
        if p.error:
            _fail(report, p, f"could not be planned: {p.error}", out=out, total=len(todo))
        elif p.shares and p.shares in leaders:
            waiting.setdefault(p.shares, []).append(p)
        elif p.shares:
            leaders[p.shares] = p
            ready.appendleft(p)  # the jobs others wait for go first
        else:
            ready.append(p)
    marker = place_marker()
    index = {id(p): i for i, p in enumerate(planned)}
    try:
        while ready or executor.in_flight():
            while ready and executor.in_flight() < executor.jobs:
                p = ready.popleft()
                needs = read_entries(p.needs) if p.needs and executor.ships else None
                executor.submit(Task(index[id(p)], p.job, executor.device, executor.threads, worker_home, marker),
                                needs)
            task, outcome = executor.next_done()
            p = planned[task.index]
            _collect(report, p, outcome, out=out, total=len(todo))
            followers = waiting.pop(p.shares, []) if p.shares and leaders.get(p.shares) is p else []
            for w in followers:
                if p.shares in outcome.prepared:
                    w.needs = outcome.prepared
                    ready.append(w)
                else:
                    _fail(report, w, f"not run: the preparation it shares ({p.shares}) failed in {p.job.name}",
                          out=out, total=len(todo))
    except KeyboardInterrupt:
        print(f"interrupted: {len(report.trained)} job(s) finished and kept; run the same command again to "
              "resume", file=out, flush=True)
        raise
    finally:
        executor.close()
        (paths.cache_dir() / marker[0]).unlink(missing_ok=True)
    report.seconds = time.perf_counter() - start
    return report


def _collect(report: Report, p: Planned, outcome: Outcome, *, out: IO[str], total: int) -> None:
    """Bring one finished job home: its cache entries, its record (checkpoint path moved here), its log."""
    write_entries(outcome.files)
    log = _write_log(p.job, outcome.log) if outcome.log else log_path(p.job)  # a dead Ray worker's stays on its node
    if not outcome.ok:
        tail = "\n".join(f"    | {line}" for line in outcome.log.rstrip().splitlines()[-LOG_TAIL:])
        _fail(report, p, f"after {outcome.seconds:.0f} s: {outcome.error}" + (f"\n{tail}" if tail else "")
              + f"\n    full log: {log}", out=out, total=total)
        return
    if outcome.record is not None:
        from adnb.runtime.records import write_record

        report.records.append(write_record(moved_record(outcome.record, outcome.cache_root)))
    report.trained.append(p)
    what = "found in the worker's cache" if outcome.loaded else "trained"
    scores = outcome.record["metrics"] if outcome.record else {}
    score = f", image AUROC {scores['image_auroc']:.3f}" if scores.get("image_auroc") is not None else ""
    train = outcome.record.get("train_seconds") if outcome.record else None
    took = f"{outcome.seconds:.0f} s" + (f" (training {train:.0f} s)" if train is not None else "")
    print(f"[{_count(report)}/{total}] {what} {p.job.name} in {took}{score}", file=out, flush=True)
    if p.entry and outcome.entry and outcome.entry != p.entry:
        print(f"    warning: the worker trained {outcome.entry} but this machine expects {p.entry}: the two "
              "resolve the configuration differently (other pretrained weights installed?); the book here "
              "would train again", file=out, flush=True)


def _fail(report: Report, p: Planned, why: str, *, out: IO[str], total: int) -> None:
    report.failed.append((p, why))
    print(f"[{_count(report)}/{total}] FAILED {p.job.name} {why}", file=out, flush=True)


def _count(report: Report) -> int:
    return len(report.trained) + len(report.failed)


def _write_log(job: Job, text: str) -> Path:
    """This machine's copy of a job's log (the worker's, when it shares this ``ADNB_HOME``, is the same file)."""
    path = log_path(job)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(path, text)
    return path


def train_all(methods: Sequence[str], preset: str, *, data_root: str = "", categories: Sequence[str] | None = None,
              overrides: Mapping[str, Any] | None = None, executor: str = "local", jobs: int | None = None,
              threads: int | None = None, address: str | None = None, device: str = "auto",
              worker_home: str | None = None, ray_cpus: int | None = None, out: IO[str] = sys.stderr) -> Report:
    """Plan every (method, category) of ``methods`` at ``preset`` and train those not in the cache yet.

    ``executor``: ``"local"`` (``jobs`` processes here) or ``"ray"`` (a local Ray instance with
    ``ray_cpus`` CPUs, or the cluster at ``address``). ``worker_home``: the ``ADNB_HOME`` workers
    train in (default: their own environment's). Returns what happened; failed jobs are in
    ``report.failed`` with their reason (their logs under ``$ADNB_HOME/logs/train-all/``).
    """
    check_request(methods, preset)
    if executor not in EXECUTORS:
        raise AdnbError(f"unknown executor {executor!r}; valid: {', '.join(EXECUTORS)}")
    planned = plan(methods, preset, data_root=data_root, categories=categories, overrides=overrides)
    if all(p.trained for p in planned):
        print(f"train-all: all {len(planned)} job(s) already trained at preset {preset}; nothing to do",
              file=out, flush=True)
        return Report(planned)
    pool = make_executor(executor, jobs=jobs, threads=threads, device=device, address=address,
                         worker_home=worker_home, ray_cpus=ray_cpus)
    return run_jobs(planned, pool, worker_home=worker_home, out=out)

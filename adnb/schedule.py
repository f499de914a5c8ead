"""``train-all``: every (method, category) trained once into the cache, here or on a Ray cluster.

The book loads trained weights from its cache (``adnb.runtime.cache``) instead of retraining, and
every method trains through one ``Recipe`` under one cache key, so a rebuild can be spread out:
train every job anywhere, bring the weights home, then ``make book`` retrains nothing.

- **Planning** (``plan``): one job per (method, category), and one per named variant a chapter
  trains beside its main model (``Recipe.variants``). This machine asks the recipe which cache
  entry the job would train into (``Recipe.cache_entry``) and skips jobs whose entry exists. A
  method's ``prepare`` may itself train something shared by several jobs (RealNet's SDAS model is
  trained once for a whole dataset): planning runs ``prepare`` with cache misses turned into a
  stop (``watch_entries``), so it never trains; the jobs that stop at the same missing entry share
  that preparation, the first of them makes it and the others wait for it.
- **Running** (``run_jobs``): an executor runs ``run_job`` in workers: ``local`` (a process pool on
  this machine) or ``ray`` (Ray tasks, one GPU each where training runs on CUDA).
- **Transfer**: a worker needs no shared file system. It trains into its own ``ADNB_HOME`` and
  returns the files of every cache entry it made (the detector, D3AD's stages, RealNet's SDAS
  model and samples) with its results record; the driver writes them into its own ``ADNB_HOME`` at
  the same relative paths. The preparation entries a job needs travel the other way. When the
  worker's cache *is* the driver's (this machine, or a shared file system) nothing travels.
- **Resuming**: finished jobs are skipped on the next call; an interrupted one resumes from its
  ``checkpoint.pt`` where its worker keeps (or shares) the cache.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import secrets
import sys
import tempfile
import time
import traceback
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from adnb.runtime import paths
from adnb.runtime.errors import AdnbError

EXECUTORS = ("local", "ray")
LOG_TAIL = 15  # lines of a failed job's log printed with its failure
SIDECAR = "weights.json"  # an entry exists once weights.pt and its sidecar are there: the sidecar is written last
RESUME_FILE = "checkpoint.pt"  # a half-finished training: only useful to the worker that can resume it
RAY_EXTRA = "pip install -e .[ray]"

Files = dict[str, bytes]  # path relative to the cache root → content


# --- jobs and plans


@dataclass(frozen=True)
class Job:
    """One method at one preset on one category: what one worker trains."""

    method: str
    preset: str
    category: str
    dataset: str = "embedded"  # for messages and log names only
    data_root: str = ""  # "" is the embedded dataset, which every worker generates for itself
    overrides: tuple[tuple[str, Any], ...] = ()  # the parameters changed from the preset (hashable)
    variant: str = ""  # a named variant the method's chapter trains too (``Recipe.variants``)

    @property
    def label(self) -> str:
        return f"{self.method}-{self.variant}" if self.variant else self.method

    @property
    def name(self) -> str:
        return f"{self.label} on {self.dataset}/{self.category}"

    def recipe(self, device: str = "auto") -> Any:
        from adnb.recipe import Recipe

        recipe = Recipe.from_preset(self.method, self.preset, dict(self.overrides), device=device)
        return recipe.variants()[self.variant] if self.variant else recipe

    def open(self, recipe: Any) -> Any:
        """The job's category, opened as a chapter opens it (so the cache key is the chapter's)."""
        from adnb.runtime.notebook import open_categories

        [category] = open_categories(self.data_root, self.category, recipe.params.get("mask_suffix") or None)
        return category


@dataclass
class Planned:
    """A job and what this machine knows about it before it runs."""

    job: Job
    entry: str = ""  # the detector's cache entry, relative to the cache root ("" while its preparation is missing)
    trained: bool = False  # that entry exists here: nothing to do
    needs: list[str] = field(default_factory=list)  # preparation entries (relative) the worker must have
    shares: str = ""  # a missing preparation entry: the first job that misses it makes it, the others wait
    error: str = ""  # planning failed: the job does not run


def overrides_for(method: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The overrides that apply to ``method``: ``KEY`` applies to every method, ``METHOD.KEY`` to one."""
    from adnb.methods import METHODS

    general, scoped = {}, {}
    for key, value in overrides.items():
        scope, dot, name = key.partition(".")
        if not dot:
            general[key] = value
        elif scope not in METHODS:
            raise AdnbError(f"override {key!r}: {scope!r} is not a method; write KEY or METHOD.KEY "
                            f"(methods: {', '.join(METHODS)})")
        elif scope == method:
            scoped[name] = value
    return {**general, **scoped}  # METHOD.KEY wins over KEY, whatever their order


def check_request(methods: Sequence[str], preset: str) -> None:
    """One clear error for an unknown method or preset, before anything is opened or trained."""
    from adnb.methods import METHODS
    from adnb.runtime.presets import list_presets

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise AdnbError(f"unknown method(s) {', '.join(unknown)}; valid: {', '.join(METHODS)}")
    if preset not in list_presets():
        raise AdnbError(f"unknown preset {preset!r}; valid presets: {', '.join(list_presets())}")


def plan(methods: Sequence[str], preset: str, *, data_root: str = "", categories: Sequence[str] | None = None,
         overrides: Mapping[str, Any] | None = None) -> list[Planned]:
    """One planned job per (method, category) and per named variant of the method's chapter
    (``Recipe.variants``), in that order, each marked trained or not (see the module docstring)."""
    from adnb.runtime.notebook import open_categories

    check_request(methods, preset)
    # Absolute, since a worker runs elsewhere (Ray's workers in a folder of their own); not resolved, since
    # the dataset's name (part of the cache key) is its folder's name as given.
    data_root = os.path.abspath(os.path.expanduser(data_root)) if data_root else ""
    planned = []
    for method in methods:
        changes = overrides_for(method, overrides or {})
        recipe = Job(method, preset, "", overrides=tuple(changes.items())).recipe(device="cpu")
        every = open_categories(data_root, "", recipe.params.get("mask_suffix") or None)
        names = [c.name for c in every]
        missing = [name for name in categories or () if name not in names]
        if missing:
            raise AdnbError(f"no category {', '.join(missing)} in {data_root or 'the embedded dataset'}; "
                            f"categories: {', '.join(names)}")
        versions = [("", recipe), *recipe.variants().items()]  # the chapter's named variants are jobs too
        for category in every:
            if categories and category.name not in categories:
                continue
            for variant, version in versions:
                job = Job(method, preset, category.name, category.dataset, data_root, tuple(changes.items()), variant)
                planned.append(_probe(job, version, category))
    return planned


def _probe(job: Job, recipe: Any, category: Any) -> Planned:
    """Which cache entry ``job`` trains into, and whether it is already there, without training anything."""
    try:
        config = recipe.config(category)
        with watch_entries(stop_at_miss=True) as seen:
            try:
                prepared = recipe.prepare(config, category)
            except MissingEntry as miss:
                return Planned(job, shares=relative(miss.folder))
        entry = recipe.cache_entry(category, config=config, prepared=prepared)
    except Exception as exc:  # one job that cannot be planned must not stop the others
        return Planned(job, error=f"{type(exc).__name__}: {exc}")
    needs = [relative(folder) for folder, found in seen.items() if found]
    return Planned(job, relative(entry.folder), entry.exists(), needs)


# --- watching the cache


class MissingEntry(Exception):
    """Planning reached a cache entry that is not there: the code past this point would train."""

    def __init__(self, folder: Path):
        super().__init__(f"not in the cache: {folder}")
        self.folder = folder


@contextlib.contextmanager
def watch_entries(stop_at_miss: bool = False) -> Iterator[dict[Path, bool]]:
    """Every cache entry asked about inside the block, with whether it existed when first asked.

    ``CacheEntry.exists`` is the one door: every method checks its entry there before it trains
    (``Detector.restore``, ``cached_training``). Watching it tells a worker which entries a job
    made or used, whatever the method; with ``stop_at_miss`` the first missing entry raises
    ``MissingEntry``, which lets planning run a method's ``prepare`` without training.
    """
    from adnb.runtime.cache import CacheEntry

    seen: dict[Path, bool] = {}
    original = CacheEntry.exists

    def exists(entry: CacheEntry) -> bool:
        found = original(entry)
        seen.setdefault(entry.folder, found)
        if stop_at_miss and not found:
            raise MissingEntry(entry.folder)
        return found

    CacheEntry.exists = exists  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        CacheEntry.exists = original  # type: ignore[method-assign]


def relative(folder: Path) -> str:
    """A cache entry's folder relative to the cache root: the same on every machine."""
    return Path(folder).resolve().relative_to(paths.cache_dir().resolve()).as_posix()


def read_entries(folders: Sequence[str], root: Path | None = None) -> Files:
    """The files of the given entries (relative folders), the resume checkpoint and temporaries left out."""
    root = root or paths.cache_dir()
    files = {}
    for folder in dict.fromkeys(folders):
        for path in sorted((root / folder).iterdir()) if (root / folder).is_dir() else []:
            if path.is_file() and path.name != RESUME_FILE and not path.name.endswith(".tmp"):
                files[f"{folder}/{path.name}"] = path.read_bytes()
    return files


def write_entries(files: Mapping[str, bytes], root: Path | None = None) -> list[Path]:
    """Write ``files`` under ``root`` (the cache), each atomically, sidecars last, identical files left alone.

    Returns the files written. The sidecar goes last so that an interrupted copy is a missing entry
    (trained again), never an entry with weights that do not match it.
    """
    root = (root or paths.cache_dir()).resolve()
    written = []
    for name in sorted(files, key=lambda rel: Path(rel).name == SIDECAR):
        target = (root / name).resolve()
        if root not in target.parents:
            raise AdnbError(f"refusing to write {name!r} outside the cache {root}")
        content = files[name]
        if target.is_file() and target.stat().st_size == len(content) and target.read_bytes() == content:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_bytes(content)
        os.replace(tmp, target)
        written.append(target)
    return written


# --- the worker


@dataclass
class Task:
    """What a worker is given: the job and how to run it."""

    index: int
    job: Job
    device: str = "auto"
    threads: int = 1
    home: str | None = None  # the worker's ADNB_HOME (None: whatever its environment says)
    marker: tuple[str, str] = ("", "")  # a file only the driver's cache holds: found there, the cache is shared


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


def run_job(task: Task, needs: Mapping[str, bytes] | None = None) -> Outcome:
    """Train ``task.job`` in this process (a worker): prepare → fit → evaluate → record, all logged.

    ``needs`` are the files of the preparation entries the job uses, made elsewhere. Never raises
    for a failing job: its error and log come back in the outcome, so the other jobs go on.
    """
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="adnb-job-") as tmp:
        log = Path(tmp) / "job.log"
        with _job_environment(task), _captured(log):
            outcome = _run_captured(task, needs)
        outcome.log = log.read_text(errors="replace")
    outcome.seconds = time.perf_counter() - start
    return outcome


def _run_captured(task: Task, needs: Mapping[str, bytes] | None) -> Outcome:
    job, root = task.job, paths.cache_dir()
    shared = _is_shared(task.marker)
    given = {name.rpartition("/")[0] for name in needs or {}}  # the driver has these: they need not go back

    def files_of(folders: list[str]) -> Files:
        return {} if shared else read_entries([f for f in folders if f not in given], root)

    prepared: list[str] = []
    try:
        if needs and not shared:
            write_entries(needs, root)
        recipe = job.recipe(device=task.device)
        category = job.open(recipe)
        config = recipe.config(category)
        with watch_entries() as seen:
            recipe.prepare(config, category)
        prepared = [relative(folder) for folder in seen if (folder / SIDECAR).is_file()]
        with watch_entries() as seen:
            trained = recipe.run(category, config=config)
        checkpoint = trained.detector.checkpoint
        entry = relative(Path(checkpoint).parent) if checkpoint else ""
        loaded = bool(checkpoint) and seen.get(Path(checkpoint).parent, False)
        made = [relative(folder) for folder in seen if (folder / SIDECAR).is_file()]
        record = json.loads(trained.record.read_text()) if trained.record else None
        print(f"{job.name}: {'loaded' if loaded else 'trained'} in {root}, entries {', '.join(made) or 'none'}; "
              f"record {trained.record or 'none (no test set with good and anomalous images)'}")
        return Outcome(True, entry=entry, loaded=loaded, prepared=prepared, files=files_of([*prepared, *made]),
                       record=record, cache_root=str(root))
    except Exception as exc:
        traceback.print_exc()
        # A preparation that finished is kept: the jobs waiting for it can still run.
        return Outcome(False, error=f"{type(exc).__name__}: {exc}", prepared=prepared, files=files_of(prepared),
                       cache_root=str(root))


def _is_shared(marker: tuple[str, str]) -> bool:
    name, token = marker
    path = paths.cache_dir() / name
    return bool(name) and path.is_file() and path.read_text() == token


@contextlib.contextmanager
def _job_environment(task: Task) -> Iterator[None]:
    """Batch mode (no progress bars), the task's ADNB_HOME and thread count, restored afterwards."""
    import torch

    saved = dict(os.environ)
    os.environ.update({"ADNB_BATCH": "1", "TQDM_DISABLE": "1"})
    if task.home:
        os.environ["ADNB_HOME"] = str(task.home)
    threads = torch.get_num_threads()
    torch.set_num_threads(task.threads)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        os.environ.clear()
        os.environ.update(saved)


@contextlib.contextmanager
def _captured(log: Path) -> Iterator[None]:
    """Send this process's stdout and stderr (file descriptors 1 and 2: C++ warnings too) to ``log``."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log, "wb") as fh:
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


def _init_local_worker(threads: int) -> None:
    """A pool process's start: its share of the cores, before torch sizes its thread pools."""
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)


# --- executors


def usable_cpus() -> int:
    """The CPUs this process may run on (a container's or a batch job's share, not the whole machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class Executor(Protocol):
    """Runs tasks in workers; the scheduler keeps at most ``jobs`` in flight."""

    jobs: int
    threads: int
    device: str
    ships: bool  # whether workers may have a cache of their own (then the preparation entries travel)

    def submit(self, task: Task, needs: Files | None) -> None: ...
    def next_done(self) -> tuple[Task, Outcome]: ...
    def in_flight(self) -> int: ...
    def describe(self) -> str: ...
    def close(self) -> None: ...


class LocalExecutor:
    """A pool of ``jobs`` processes on this machine (spawned, so each starts clean), cores split between them."""

    def __init__(self, jobs: int | None = None, threads: int | None = None, device: str = "auto",
                 worker_home: str | None = None):
        self.jobs = max(1, jobs or 1)
        self.threads = max(1, threads or usable_cpus() // self.jobs)
        self.device = device
        self.ships = bool(worker_home) and Path(worker_home).resolve() != paths.home().resolve()
        self._futures: dict[Future[Outcome], Task] = {}
        self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.jobs, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_local_worker, initargs=(self.threads,))

    def submit(self, task: Task, needs: Files | None) -> None:
        try:
            future = self._pool.submit(run_job, task, needs)
        except BrokenProcessPool:  # a worker died earlier: the jobs in flight then were reported, start afresh
            self._pool = self._new_pool()
            future = self._pool.submit(run_job, task, needs)
        self._futures[future] = task

    def next_done(self) -> tuple[Task, Outcome]:
        done, _ = wait(self._futures, return_when=FIRST_COMPLETED)
        future = next(iter(done))
        task = self._futures.pop(future)
        try:
            return task, future.result()
        except BrokenProcessPool:
            return task, Outcome(False, error="its worker process died (killed for memory?); the jobs running "
                                              "beside it were stopped too")

    def in_flight(self) -> int:
        return len(self._futures)

    def describe(self) -> str:
        return f"{self.jobs} process(es) on this machine, {self.threads} thread(s) each"

    def close(self) -> None:
        if not self._futures:  # the scheduler waited for every job
            self._pool.shutdown()
            return
        # Interrupted: stop the running jobs now (they resume from their checkpoints), or exiting would wait for
        # them. Python 3.14 has terminate_workers(); before, only the pool's private map of processes.
        if hasattr(self._pool, "terminate_workers"):
            self._pool.terminate_workers()
            return
        processes = list((getattr(self._pool, "_processes", None) or {}).values())
        self._pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.terminate()


class RayExecutor:
    """Ray tasks on a local Ray instance (started here) or an existing cluster at ``address``.

    Each task asks Ray for ``threads`` CPUs and, where training runs on CUDA, one GPU. Workers
    return their weights to this process, so the cluster needs no shared file system; every node
    needs adnb installed (the same version) and the dataset at the same path as here.
    """

    def __init__(self, jobs: int | None = None, threads: int | None = None, device: str = "auto",
                 address: str | None = None, num_cpus: int | None = None):
        try:
            import ray
        except ImportError:
            raise AdnbError(f"--executor ray needs Ray, an optional extra: {RAY_EXTRA}") from None
        self._ray = ray
        self._refs: dict[Any, Task] = {}
        self._bundles: dict[tuple[str, ...], Any] = {}
        self._owns = not ray.is_initialized()
        if self._owns:
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage-statistics banner
            ray.init(address=address, num_cpus=None if address else num_cpus, include_dashboard=False,
                     log_to_driver=False, logging_level="ERROR")
        total = ray.cluster_resources()
        cpus, gpus = int(total.get("CPU", 1)), int(total.get("GPU", 0))
        node_cpus = max((int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")), default=cpus)
        if device.startswith("cuda") and not gpus:
            self.close()
            raise AdnbError(f"--device {device} but the Ray cluster has no GPU; use --device auto or cpu")
        self.gpu = device.startswith("cuda") or (device == "auto" and gpus > 0)
        self.device = "cuda" if self.gpu else "cpu"  # a CPU task on a GPU node must not take its GPU
        self.jobs = max(1, jobs or (gpus if self.gpu else cpus))
        self.threads = max(1, threads or min(max(1, node_cpus), cpus // self.jobs))
        self.ships = True
        # A task whose worker is lost (a node gone) is retried once; a job's own errors come back in its
        # outcome and are never retried.
        self._remote = ray.remote(num_cpus=self.threads, num_gpus=1 if self.gpu else 0, max_retries=1)(run_job)

    def submit(self, task: Task, needs: Files | None) -> None:
        key = tuple(sorted(needs or {}))
        if needs and key not in self._bundles:  # stored once in Ray's object store, however many jobs need it
            self._bundles[key] = self._ray.put(dict(needs))
        self._refs[self._remote.remote(task, self._bundles.get(key))] = task

    def next_done(self) -> tuple[Task, Outcome]:
        [ref], _ = self._ray.wait(list(self._refs), num_returns=1)
        task = self._refs.pop(ref)
        try:
            return task, self._ray.get(ref)
        except Exception as exc:  # the worker died or Ray failed: report the job, keep going
            return task, Outcome(False, error=f"the Ray task failed: {str(exc).strip().splitlines()[0]}")

    def in_flight(self) -> int:
        return len(self._refs)

    def describe(self) -> str:
        where = "a local Ray instance" if self._owns else "the Ray cluster"
        what = "1 GPU" if self.gpu else f"{self.threads} CPU(s)"
        return f"{where}, up to {self.jobs} task(s) at once, {what} each"

    def close(self) -> None:
        for ref in self._refs:
            self._ray.cancel(ref, force=True)
        self._refs.clear()
        if self._owns:
            self._ray.shutdown()


def make_executor(kind: str, *, jobs: int | None = None, threads: int | None = None, device: str = "auto",
                  address: str | None = None, worker_home: str | None = None,
                  ray_cpus: int | None = None) -> Executor:
    if kind == "local":
        if address:
            raise AdnbError("--address is for --executor ray")
        return LocalExecutor(jobs, threads, device, worker_home)
    if kind == "ray":
        return RayExecutor(jobs, threads, device, address, ray_cpus)
    raise AdnbError(f"unknown executor {kind!r}; valid: {', '.join(EXECUTORS)}")


# --- the driver


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
    marker = _place_marker()
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


def _place_marker() -> tuple[str, str]:
    """A file with a random token in this machine's cache: a worker that finds it shares the cache."""
    token = secrets.token_hex(16)
    name = f".train-all-{token[:8]}"
    paths.cache_dir().mkdir(parents=True, exist_ok=True)
    (paths.cache_dir() / name).write_text(token)
    return name, token


def _collect(report: Report, p: Planned, outcome: Outcome, *, out: IO[str], total: int) -> None:
    """Bring one finished job home: its cache entries, its record (checkpoint path moved here), its log."""
    write_entries(outcome.files)
    log = _write_log(p.job, outcome.log)
    if not outcome.ok:
        tail = "\n".join(f"    | {line}" for line in outcome.log.rstrip().splitlines()[-LOG_TAIL:])
        _fail(report, p, f"after {outcome.seconds:.0f} s: {outcome.error}\n{tail}\n    full log: {log}",
              out=out, total=total)
        return
    if outcome.record is not None:
        from adnb.runtime.records import write_record

        report.records.append(write_record(_moved_record(outcome.record, outcome.cache_root)))
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


def _moved_record(record: Mapping[str, Any], worker_cache: str) -> dict[str, Any]:
    """The record with its checkpoint path moved from the worker's cache to this machine's."""
    moved = dict(record)
    checkpoint = record.get("checkpoint")
    if checkpoint and worker_cache:
        with contextlib.suppress(ValueError):
            moved["checkpoint"] = str(paths.cache_dir() / Path(checkpoint).relative_to(worker_cache))
    return moved


def _write_log(job: Job, text: str) -> Path:
    path = paths.home() / "logs" / "train-all" / job.preset / f"{job.label}-{job.dataset}-{job.category}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
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

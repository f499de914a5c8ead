"""Where ``train-all``'s jobs run: a pool of processes here, or Ray tasks on a cluster.

An executor runs ``adnb.schedule.worker.run_job`` in workers and hands back each finished job's
``Outcome``; the driver keeps at most ``jobs`` in flight. A worker that dies (killed, out of
memory) costs only its own job: ``local`` reports it with the log it left, ``ray`` retries it once
(from its last checkpoint, where the node keeps its cache) before reporting it.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Protocol

from adnb import __version__
from adnb.runtime import paths
from adnb.runtime.errors import AdnbError
from adnb.schedule.transfer import Files
from adnb.schedule.worker import Outcome, Task, init_local_worker, log_path, run_job

EXECUTORS = ("local", "ray")
RAY_EXTRA = "pip install -e .[ray]"
NODE_PROBE_TIMEOUT = 120  # seconds for every node to answer which adnb it runs


def usable_cpus() -> int:
    """The CPUs this process may run on (a container's or a batch job's share, not the whole machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class Executor(Protocol):
    """Runs tasks in workers; the driver keeps at most ``jobs`` in flight."""

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
    """``jobs`` processes on this machine (spawned, so each starts clean), cores split between them.

    Each job slot is a pool of one process: a process that dies breaks its own pool only, so the
    jobs beside it finish; its job is reported with the log it left.
    """

    def __init__(self, jobs: int | None = None, threads: int | None = None, device: str = "auto",
                 worker_home: str | None = None):
        self.jobs = max(1, jobs or 1)
        self.threads = max(1, threads or usable_cpus() // self.jobs)
        self.device = device
        self.ships = bool(worker_home) and Path(worker_home).resolve() != paths.home().resolve()
        self._slots: list[ProcessPoolExecutor | None] = [None] * self.jobs
        self._futures: dict[Future[Outcome], tuple[int, Task]] = {}

    def _pool(self, slot: int) -> ProcessPoolExecutor:
        if self._slots[slot] is None:
            self._slots[slot] = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                                    initializer=init_local_worker, initargs=(self.threads,))
        return self._slots[slot]

    def submit(self, task: Task, needs: Files | None) -> None:
        busy = {slot for slot, _ in self._futures.values()}
        slot = next(i for i in range(self.jobs) if i not in busy)
        self._futures[self._pool(slot).submit(run_job, task, needs)] = (slot, task)

    def next_done(self) -> tuple[Task, Outcome]:
        done, _ = wait(self._futures, return_when=FIRST_COMPLETED)
        future = next(iter(done))
        slot, task = self._futures.pop(future)
        try:
            return task, future.result()
        except BrokenProcessPool:
            self._slots[slot] = None  # a fresh process for the next job of this slot
            log = log_path(task.job, Path(task.home) if task.home else None)
            return task, Outcome(False, error="its worker process died (killed, or out of memory); run the same "
                                              "command again to resume it from its last checkpoint",
                                 log=log.read_text(errors="replace") if log.is_file() else "")

    def in_flight(self) -> int:
        return len(self._futures)

    def describe(self) -> str:
        return f"{self.jobs} process(es) on this machine, {self.threads} thread(s) each"

    def close(self) -> None:
        pools = [pool for pool in self._slots if pool is not None]
        if not self._futures:  # the driver waited for every job
            for pool in pools:
                pool.shutdown()
            return
        # Interrupted: stop the running jobs now (they resume from their checkpoints), or exiting would wait for
        # them. Python 3.14 has terminate_workers(); before, only the pool's private map of processes.
        for pool in pools:
            if hasattr(pool, "terminate_workers"):
                pool.terminate_workers()
                continue
            processes = list((getattr(pool, "_processes", None) or {}).values())
            pool.shutdown(wait=False, cancel_futures=True)
            for process in processes:
                process.terminate()


def node_version() -> str:
    """The adnb version of the node this runs on (a Ray task's answer)."""
    return __version__


class RayExecutor:
    """Ray tasks on a local Ray instance (started here) or an existing cluster at ``address``.

    Each task asks Ray for ``threads`` CPUs and, where training runs on CUDA, one GPU. Workers
    return their weights to this process, so the cluster needs no shared file system; every node
    needs adnb installed (the same version: a node with another is refused before any job runs)
    and the dataset at the same path as here.
    """

    def __init__(self, jobs: int | None = None, threads: int | None = None, device: str = "auto",
                 address: str | None = None, num_cpus: int | None = None):
        try:
            import ray
        except ImportError:
            raise AdnbError(f"--executor ray needs Ray, an optional extra: {RAY_EXTRA}") from None
        self._ray = ray
        self._address = address
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
        self.check_versions()
        self.gpu = device.startswith("cuda") or (device == "auto" and gpus > 0)
        self.device = "cuda" if self.gpu else "cpu"  # a CPU task on a GPU node must not take its GPU
        self.jobs = max(1, jobs or (gpus if self.gpu else cpus))
        self.threads = max(1, threads or min(max(1, node_cpus), cpus // self.jobs))
        self.ships = True
        # A task whose worker dies (killed, out of memory, a node gone) is retried once, from the job's last
        # checkpoint where that node keeps its cache; a job's own errors come back in its outcome, never retried.
        self._remote = ray.remote(num_cpus=self.threads, num_gpus=1 if self.gpu else 0, max_retries=1)(run_job)

    def check_versions(self) -> None:
        """Refuse the cluster when a node that can take jobs runs another adnb than this machine."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        nodes = [n for n in self._ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) > 0]
        probe = self._ray.remote(num_cpus=0, max_retries=0)(node_version)
        refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
                for n in nodes]
        wrong = []
        for node, ref in zip(nodes, refs):
            try:
                version = self._ray.get(ref, timeout=NODE_PROBE_TIMEOUT)
            except Exception as exc:  # its adnb cannot even run the probe: an older layout, or none
                version = f"an adnb that cannot answer ({type(exc).__name__})"
            if version != __version__:
                wrong.append(f"node {node['NodeManagerAddress']} (id {node['NodeID'][:8]}) runs adnb {version}")
        if wrong:
            self.close()
            raise AdnbError(f"refusing the Ray cluster: {'; '.join(wrong)}, this machine adnb {__version__}. Install "
                            f"the same adnb on every node ({RAY_EXTRA} from the same checkout), or take the node out "
                            "of the cluster")

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
        except Exception as exc:  # the worker died twice, or Ray failed: report the job, keep going
            where = log_path(task.job, Path(task.home) if task.home else Path("$ADNB_HOME"))
            return task, Outcome(False, error=f"the Ray task failed: {str(exc).strip().splitlines()[0]}; its log "
                                              f"is {where} on the node that ran it")

    def in_flight(self) -> int:
        return len(self._refs)

    def describe(self) -> str:
        where = "a local Ray instance" if self._owns and not self._address else "the Ray cluster"
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

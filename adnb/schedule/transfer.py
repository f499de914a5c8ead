"""Moving cache entries between machines: a worker needs no shared file system.

A worker trains into its own ``ADNB_HOME`` and sends back the files of every cache entry it made
(the detector, its stages, a preparation such as RealNet's SDAS model and samples) with its results
record; the driver writes them into its own cache at the same relative paths. The preparation
entries a job needs travel the other way. When the worker's cache *is* the driver's (this machine,
or a shared file system: it finds the driver's marker file) nothing travels.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from adnb.runtime import atomic, paths
from adnb.runtime.errors import AdnbError

SIDECAR = "weights.json"  # an entry exists once weights.pt and its sidecar are there: the sidecar is written last
RESUME_FILE = "checkpoint.pt"  # a half-finished training: only useful to the worker that can resume it

Files = dict[str, bytes]  # path relative to the cache root → content


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
        atomic.write_bytes(target, content)
        written.append(target)
    return written


def place_marker() -> tuple[str, str]:
    """A file with a random token in this machine's cache: a worker that finds it shares the cache."""
    token = secrets.token_hex(16)
    name = f".train-all-{token[:8]}"
    paths.cache_dir().mkdir(parents=True, exist_ok=True)
    atomic.write_text(paths.cache_dir() / name, token)  # a worker never reads half a token
    return name, token


def is_shared(marker: tuple[str, str]) -> bool:
    """Whether this process's cache holds the driver's marker: then it is the driver's cache."""
    name, token = marker
    path = paths.cache_dir() / name
    return bool(name) and path.is_file() and path.read_text() == token


def moved_record(record: Mapping[str, Any], worker_cache: str) -> dict[str, Any]:
    """The record with its checkpoint path moved from the worker's cache to this machine's."""
    moved = dict(record)
    checkpoint = record.get("checkpoint")
    if checkpoint and worker_cache:
        with contextlib.suppress(ValueError):
            moved["checkpoint"] = str(paths.cache_dir() / Path(checkpoint).relative_to(worker_cache))
    return moved

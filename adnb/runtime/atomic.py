"""Writing a file so that a reader sees the old one or the whole new one, never half of it.

Files whose presence says "this is complete" (a cache entry's sidecar, a results record, a
calibration) are written to a temporary file beside the target, flushed to disk, and renamed over
it with ``os.replace``, which is atomic on POSIX and Windows. A process killed mid-write leaves
at most a ``.<name>.<pid>.tmp`` file, which no reader looks at.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def temporary_name(path: Path) -> Path:
    """Where ``path`` is written before it is renamed into place (hidden, per process, ending in ``.tmp``)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def replace_atomically(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` on a temporary file beside ``path``, then rename it to ``path``; returns ``path``."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_bytes(path: str | Path, data: bytes) -> Path:
    """``path.write_bytes(data)``, atomically and flushed to disk."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())

    return replace_atomically(path, write)


def write_text(path: str | Path, text: str) -> Path:
    """``path.write_text(text)`` (UTF-8), atomically and flushed to disk."""
    return write_bytes(path, text.encode("utf-8"))

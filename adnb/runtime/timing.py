"""Wall-clock and peak-memory measurement for the numbers the book reports."""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    scale = 1 / 1024**2 if sys.platform == "darwin" else 1 / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


@dataclass
class Measure:
    """Context manager: elapsed seconds and peak memory (process RSS, and CUDA when used).

    >>> with Measure() as m: ...
    >>> m.seconds, m.peak_mb
    """

    device: torch.device | str = "cpu"
    seconds: float = 0.0
    peak_mb: float = 0.0
    peak_kind: str = field(default="process RSS")
    _start: float = 0.0

    def __enter__(self) -> Measure:
        dev = torch.device(self.device)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
            self.peak_kind = "CUDA allocated"
        elif not _reset_peak_rss():
            self.peak_kind = "process RSS since start"
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        dev = torch.device(self.device)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            self.peak_mb = torch.cuda.max_memory_allocated(dev) / 1024**2
        else:
            self.peak_mb = _peak_rss_mb()
        self.seconds = time.perf_counter() - self._start

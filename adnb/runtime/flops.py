"""Floating-point work and the machine's peak: how far from its limit a step runs.

``count_flops(fn)`` runs ``fn`` once under ``torch.utils.flop_counter.FlopCounterMode``, which
counts the multiply-adds of convolutions and matrix products (forward and backward, 2 FLOPs each)
and nothing else: element-wise operations, normalisations and FFTs are left out, so the fraction
of peak below is the share of the machine spent on the arithmetic that dominates these networks.

A CPU's peak is ``cores × FLOP per cycle × clock``::

    fp32    8 (SSE) · 16 (AVX) · 32 (AVX2 + FMA: two 8-wide fused multiply-adds) · 64 (AVX-512: two 16-wide)
    bf16    128 with AVX512-BF16 (a dot product of bf16 pairs into fp32 per lane) · 1024 with AMX-BF16
            (a 16×32 by 32×16 tile product per 16 cycles); where neither exists bf16 is emulated
            through fp32 and the fp32 peak is the limit

with the vector width PyTorch's kernels use (``torch.backends.cpu.get_cpu_capability()``, which
``ATEN_CPU_CAPABILITY=avx2`` lowers), the physical cores PyTorch's threads can use (the smaller of
its thread count and the cores; hyper-threads share the FMA units), and the clock ``/sys`` or
``/proc/cpuinfo`` reports — the base clock on most virtual machines, so a CPU that turbo-boosts can
exceed "100 %". Some AVX-512 CPUs have a single FMA unit
(half the 64 above): the fraction is then understated, never overstated.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from adnb.runtime.precision import cpu_flags, native_bf16

FP32_PER_CYCLE = {"AVX512": 64, "AVX2": 32, "AVX": 16}  # torch.backends.cpu.get_cpu_capability() → FLOP/cycle/core
SSE_PER_CYCLE = 8
AVX512_BF16_PER_CYCLE = 128
AMX_BF16_PER_CYCLE = 1024


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of the convolutions and matrix products ``fn()`` runs (forward and backward)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_clock_ghz() -> tuple[float, str] | None:
    """The CPU's clock in GHz and where it was read: the highest frequency ``/sys`` states, else the
    ``cpu MHz`` of ``/proc/cpuinfo``; None where neither exists."""
    try:
        return int(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text()) / 1e6, "cpuinfo_max_freq"
    except (OSError, ValueError):
        pass
    mhz = [float(line.split(":")[1]) for line in _cpuinfo().splitlines() if line.startswith("cpu MHz")]
    return (max(mhz) / 1e3, "/proc/cpuinfo cpu MHz") if mhz else None


def physical_cores() -> int:
    """Cores this process may run on, hyper-threads counted once (``/proc/cpuinfo``'s cores per siblings)."""
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    fields = {key.strip(): value.strip() for key, _, value in
              (line.partition(":") for line in _cpuinfo().splitlines())}
    try:
        per_thread = int(fields["cpu cores"]) / int(fields["siblings"])
    except (KeyError, ValueError, ZeroDivisionError):
        per_thread = 1.0
    return max(1, round(logical * per_thread))


def cpu_flop_per_cycle(precision: str) -> int:
    """FLOP per cycle and core of ``precision``'s arithmetic on this CPU (the module docstring's table)."""
    fp32 = FP32_PER_CYCLE.get(torch.backends.cpu.get_cpu_capability(), SSE_PER_CYCLE)
    if precision != "bf16" or not native_bf16("cpu"):
        return fp32
    return AMX_BF16_PER_CYCLE if "amx_bf16" in cpu_flags() else AVX512_BF16_PER_CYCLE


def peak(device: torch.device | str, precision: str) -> dict[str, object] | None:
    """The device's peak GFLOP/s at ``precision`` and how it was computed; None off CPUs (a GPU's peak
    depends on its model's tables, which are not read here)."""
    if torch.device(device).type != "cpu":
        return None
    clock = cpu_clock_ghz()
    if clock is None:
        return None
    cores, per_cycle = min(physical_cores(), torch.get_num_threads()), cpu_flop_per_cycle(precision)
    return {"peak_gflops": round(cores * per_cycle * clock[0], 1), "cores": cores, "flop_per_cycle": per_cycle,
            "clock_ghz": round(clock[0], 3), "clock_source": clock[1]}

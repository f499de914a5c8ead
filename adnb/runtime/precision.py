"""Mixed precision: which number format a model's arithmetic runs in, chosen once per run.

``fp32`` is the reference. ``bf16`` keeps fp32's 8-bit exponent (the same range) with an 8-bit
mantissa (about 3 significant digits): under ``torch.autocast`` convolutions and matrix products
take bf16 inputs and accumulate in fp32, which CPUs with AVX512-BF16 or AMX and recent GPUs run
at about twice fp32's speed, while reductions, norms and losses stay fp32. ``fp16`` has a 5-bit
exponent: small gradients underflow to zero unless the loss is scaled up first (a
``GradScaler``), so it is only the fallback for GPUs without bf16.

``resolve_precision("auto", device)`` picks bf16 where the hardware runs it natively, fp16 on a
CUDA GPU without bf16, and fp32 everywhere else (a CPU without native bf16 would emulate it,
slower than fp32). Blocks whose numerics need fp32 (FFT filters, a flow's log-determinants,
metrics) run inside ``full_precision`` and say why where they do.

An explicit ``bf16`` or ``fp16`` is honoured on any CPU, but where the CPU lacks the instructions
PyTorch emulates it through fp32, many times slower: ``resolve_precision`` then warns once per
process (``warn_if_emulated``), with the measured cost and the fix, so ``train``, ``bench`` and the
chapters all say it.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from adnb.runtime.errors import AdnbError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of native bf16 dot products
CPU_BF16_ENV = "ADNB_CPU_BF16"  # "1"/"0": what cpu_has_native_bf16 answers, whatever the flags say
# AMX-FP16's tiles are what oneDNN runs fp16 convolutions and matrix products on; AVX512-FP16 alone is not
# enough through PyTorch: on a Xeon with it and without AMX-FP16, FAIR's fp16 training (c = 32, 128², batch 8, one
# thread) did not finish two steps in 15 minutes, where fp32 takes 1.3 s a step.
CPU_FP16_FLAGS = ("amx_fp16",)
# What emulation cost where it was measured: FAIR (c = 32, 128², batch 8), 2 cores, against fp32 on the same CPU.
# bf16: 17.1 s per training step against 1.41 and 2.8 images/s at batch 1 against 15–17, on an AMD EPYC (Zen 3,
# AVX2); fp16: 32.2 s against 2.06 and 2.45 images/s against 11.5, on a Xeon limited to AVX2
# (ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2, one thread).
EMULATION_COST = {"bf16": "about 12× slower training and 6× slower inference than fp32",
                  "fp16": "about 16× slower training and 5× slower inference than fp32"}


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (Linux; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 dot-product instructions (AVX512-BF16 or AMX-BF16).

    ``ADNB_CPU_BF16=1`` or ``0`` overrides the detection: for a virtual machine that hides its CPU
    flags, and for tests of clusters whose nodes disagree.
    """
    forced = os.environ.get(CPU_BF16_ENV, "")
    if forced in ("0", "1"):
        return forced == "1"
    if cpu_flags():
        return any(flag in cpu_flags() for flag in CPU_BF16_FLAGS)
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)  # other systems: PyTorch's own probe
    return bool(probe and probe())


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` runs bf16 arithmetic in hardware (not emulated through fp32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu" and cpu_has_native_bf16()


def emulated(precision: str, device: torch.device | str) -> bool:
    """True when ``device`` has no hardware for the resolved ``precision`` and PyTorch would emulate it
    through fp32 (bf16 without AVX512-BF16/AMX-BF16, fp16 without AMX-FP16; CPUs only)."""
    if torch.device(device).type != "cpu" or precision == "fp32":
        return False
    if precision == "bf16":
        return not cpu_has_native_bf16()
    return not any(flag in cpu_flags() for flag in CPU_FP16_FLAGS)


class EmulatedPrecisionWarning(UserWarning):
    """A 16-bit precision was asked for on a CPU that emulates it."""


_warned: set[str] = set()  # the precisions already warned about in this process


def warn_if_emulated(precision: str, device: torch.device | str) -> None:
    """Warn, once per process and precision, when ``precision`` would run emulated on ``device``: the
    measured slowdown and the fix."""
    if precision in _warned or not emulated(precision, device):
        return
    _warned.add(precision)
    lacks = "AVX512-BF16 and AMX-BF16" if precision == "bf16" else "AMX-FP16"
    warnings.warn(f"precision {precision} on this CPU is emulated through fp32 (it lacks {lacks}): "
                  f"{EMULATION_COST[precision]}, as measured on 2-core CPUs without it. Use precision auto (or "
                  "fp32): -p precision auto for train and run, --precision auto for bench, precision = \"auto\" "
                  "in a chapter's parameters cell.", EmulatedPrecisionWarning, stacklevel=3)


def resolve_precision(choice: str, device: torch.device | str) -> str:
    """``"fp32"``, ``"bf16"`` or ``"fp16"`` for ``choice`` on ``device``; ``"auto"`` picks the fastest safe one.

    auto: bf16 where native (CPUs with AVX512-BF16/AMX, CUDA GPUs from Ampere on), fp16 on older
    CUDA GPUs, fp32 otherwise (CPUs without bf16, Apple MPS). An explicit choice is honoured
    (with a warning where a CPU would emulate it) except bf16 on a CUDA GPU without it, which is an error.
    """
    if choice not in PRECISIONS:
        raise AdnbError(f"unknown precision {choice!r}; valid: {', '.join(PRECISIONS)}")
    device = torch.device(device)
    if choice == "auto":
        if native_bf16(device):
            return "bf16"
        return "fp16" if device.type == "cuda" else "fp32"
    if choice == "bf16" and device.type == "cuda" and not native_bf16(device):
        raise AdnbError("this CUDA GPU has no bf16 arithmetic; use precision fp16 (with loss scaling) or auto")
    warn_if_emulated(choice, device)
    return choice


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """The block inside runs at ``precision`` (a resolved one): ``torch.autocast`` for bf16/fp16, nothing for fp32."""
    if precision not in DTYPES:
        raise AdnbError(f"resolve the precision first (got {precision!r}; valid: fp32, bf16, fp16)")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=DTYPES[precision])


def full_precision(device: torch.device | str) -> contextlib.AbstractContextManager:
    """An fp32 island inside an autocast block: operations run in their inputs' own (fp32) type."""
    return torch.autocast(torch.device(device).type, enabled=False)


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` as fp32 when it is a 16-bit float (fp64 stays fp64)."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def grad_scaler(precision: str, device: torch.device | str) -> torch.amp.GradScaler:
    """Loss scaling for fp16 (its gradients would underflow); a pass-through for fp32 and bf16."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=precision == "fp16")


def optimiser_step(loss: torch.Tensor, optimiser: torch.optim.Optimizer, scaler: torch.amp.GradScaler, *,
                   clip: float | None = None, parameters: Iterable[nn.Parameter] = ()) -> None:
    """Zero the gradients, back-propagate ``loss``, clip their norm to ``clip`` (if given), step.

    With fp16 the loss is scaled before the backward pass and the gradients unscaled before
    clipping; a step whose gradients overflowed is skipped and the scale lowered.
    """
    optimiser.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if clip is not None:
        scaler.unscale_(optimiser)
        nn.utils.clip_grad_norm_(list(parameters), clip)
    scaler.step(optimiser)
    scaler.update()

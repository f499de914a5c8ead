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
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from adnb.runtime.errors import AdnbError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of native bf16 dot products


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
    """True when the CPU has bf16 dot-product instructions (AVX512-BF16 or AMX-BF16)."""
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


def resolve_precision(choice: str, device: torch.device | str) -> str:
    """``"fp32"``, ``"bf16"`` or ``"fp16"`` for ``choice`` on ``device``; ``"auto"`` picks the fastest safe one.

    auto: bf16 where native (CPUs with AVX512-BF16/AMX, CUDA GPUs from Ampere on), fp16 on older
    CUDA GPUs, fp32 otherwise (CPUs without bf16, Apple MPS). An explicit choice is honoured
    except bf16 on a CUDA GPU without it, which is an error.
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

"""Pick the compute device once, in one place: cuda, then mps, then cpu."""

from __future__ import annotations

import torch

from adnb.runtime.errors import AdnbError


def get_device(preference: str = "auto") -> torch.device:
    """Return the device to run on.

    ``"auto"`` takes CUDA when present, then Apple's MPS, then the CPU. An explicit ``"cuda"``
    or ``"mps"`` that is not available is an error rather than a silent fall back, so a run
    that was meant for a GPU never quietly takes hours on a CPU.
    """
    preference = (preference or "auto").lower()
    mps_ok = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if preference == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if mps_ok else "cpu")
    kind = preference.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise AdnbError("device 'cuda' was asked for but no CUDA GPU is visible; use device='auto' or 'cpu'")
    if kind == "mps" and not mps_ok:
        raise AdnbError("device 'mps' was asked for but Apple MPS is not available; use device='auto' or 'cpu'")
    if kind not in {"cpu", "cuda", "mps"}:
        raise AdnbError(f"unknown device {preference!r}; valid: auto, cpu, cuda, cuda:N, mps")
    return torch.device(preference)


def describe(device: torch.device) -> str:
    """A short human label for the record and the configuration printout."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        threads = torch.get_num_threads()
        return f"cpu ({threads} thread{'' if threads == 1 else 's'})"
    return device.type

"""Random draws from an optional CPU generator (so results repeat on CPU and GPU alike)."""

from __future__ import annotations

import torch


def uniform(generator: torch.Generator | None, low: float, high: float, *shape: int) -> torch.Tensor:
    """U(low, high) samples on the CPU; a scalar tensor when no shape is given."""
    return torch.rand(shape, generator=generator) * (high - low) + low


def randint(generator: torch.Generator | None, low: int, high: int) -> int:
    """An integer in [low, high)."""
    return int(torch.randint(low, high, (), generator=generator))


def chance(generator: torch.Generator | None, p: float) -> bool:
    return bool(torch.rand((), generator=generator) < p)

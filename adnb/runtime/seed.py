"""Seeding, one way: every random draw of a method comes from an explicit ``torch.Generator``.

``generator(seed)`` makes the one a training draws its batches, noise and synthetic anomalies
from. Only the initial weights of ``nn.Module`` layers come from torch's global generator (that is
how PyTorch initialises them); ``seeded(seed)`` fixes those draws without disturbing the caller's
global random state. ``seed_everything`` is for a notebook's own demonstration cells.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch


def generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed`` (draw on the CPU, then move: the same numbers on any device)."""
    return torch.Generator().manual_seed(int(seed))


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Inside the block, torch's global generator starts from ``seed`` (e.g. for layers' initial
    weights); after it, the global random state is what it was before."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch, and return a torch generator seeded the same way."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return generator(seed)

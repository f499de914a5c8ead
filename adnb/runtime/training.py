"""A method's training as one object: what ``fit`` loops over is what ``adnb bench`` times.

A method declares ``training`` in its ``MethodSpec``: a class (or function) that takes the
method's config and its training images and does everything ``fit`` does before its loop (the
model initialised from the config's seed, pretrained weights loaded, textures, frozen features,
masks, the optimiser), leaving the model in training mode. Then

- ``step(idx)`` is one optimiser update on the images at ``idx``, returning its loss terms;
- ``batches(epoch)`` draws the index batches of one epoch in the order ``fit`` uses;
- ``epoch(epoch)`` runs them (``fit`` hands it to ``adnb.runtime.cache.train_loop``, which
  checkpoints ``state()`` after every epoch);
- ``finish()`` computes what scoring needs from the training images after the loop (a template,
  a kNN bank).

``fit`` builds one and runs its epochs; ``bench`` builds one the same way and times ``step`` on
random batches, so the number it reports is the cost of the step training runs.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from adnb.runtime.cache import CacheEntry, Stateful, train_loop


class Training(ABC):
    """One method's training loop, set up (see the module docstring)."""

    what: ClassVar[str] = ""  # the step in words, for bench's record
    detector: nn.Module  # the model being trained (bench times its ``predict`` after the steps)
    n_images: int  # how many training images ``step``'s indices point into

    @abstractmethod
    def batches(self, epoch: int) -> Iterable[torch.Tensor]:
        """The index batches of epoch ``epoch`` (0-based), in the order ``fit`` trains on them."""

    @abstractmethod
    def step(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """One optimiser update on the training images at ``idx``: the loss terms (detached, ``"loss"`` first)."""

    @abstractmethod
    def state(self) -> Mapping[str, Stateful]:
        """What an interrupted training needs to resume exactly (models, optimisers, generators)."""

    def epoch(self, epoch: int) -> dict[str, float]:
        """Every batch of epoch ``epoch``: each loss term averaged over the images, and the seconds it took.

        The terms are summed on the device and read once at the end: reading them every step would
        make a GPU wait.
        """
        start = time.perf_counter()
        totals: dict[str, torch.Tensor] = {}
        seen = 0
        for idx in self.batches(epoch):
            for name, value in self.step(idx).items():
                totals[name] = totals.get(name, 0) + value.float() * len(idx)
            seen += len(idx)
        logs = {name: float(total) / max(seen, 1) for name, total in totals.items()}
        return {**logs, "seconds": time.perf_counter() - start}

    def finish(self) -> None:
        """What scoring needs from the training images once the loop is done (nothing by default)."""

    def run(self, epochs: int, checkpoint: CacheEntry | None = None, desc: str = "training") -> list[dict[str, Any]]:
        """``epochs`` epochs through ``train_loop`` (resuming from ``checkpoint``'s last finished epoch)."""
        return train_loop(epochs, self.epoch, self.state(), checkpoint, desc=desc)

    def run_and_finish(self, epochs: int, checkpoint: CacheEntry | None = None,
                       desc: str = "training") -> tuple[list[dict[str, Any]], float]:
        """``run``, then ``finish``: the history and the training seconds, Σ epoch seconds + ``finish``'s
        (the epochs' own, so a resumed run counts the interrupted process's epochs too)."""
        history = self.run(epochs, checkpoint, desc)
        start = time.perf_counter()
        self.finish()
        return history, sum(h["seconds"] for h in history) + time.perf_counter() - start

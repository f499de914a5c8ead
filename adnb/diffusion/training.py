"""Training a denoiser ε_θ(x_t, t) on a tensor of clean samples (images or latents).

The objective is DDPM's simplified loss (Ho et al. 2020, Eq. 14):

    L = E_{x_0, t ~ U{0..T−1}, ε ~ N(0, I)} ‖ ε − ε_θ(√ᾱ_t · x_0 + √(1 − ᾱ_t) · ε, t) ‖².

``DenoiserTraining`` holds its training, a step being one mini-batch (``adnb.runtime.training``: what
a method's ``fit`` loops over and ``adnb bench`` times); ``fit_denoiser`` runs it over shuffled
mini-batches through ``adnb.runtime.cache.train_loop``, so every epoch is checkpointed and an
interrupted run resumes. Its randomness (order, t, ε) comes from one generator, which the
checkpoint saves: a resumed run continues exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adnb.diffusion.schedule import Schedule, q_sample
from adnb.runtime.cache import CacheEntry, GeneratorState
from adnb.runtime.precision import autocast, grad_scaler, optimiser_step
from adnb.runtime.training import Training

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def model_eps(model: nn.Module, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """ε_θ(x_t, t) from a denoiser that returns a tensor, or a diffusers model (``.sample``)."""
    out = model(x_t, t)
    return out.sample if hasattr(out, "sample") else out


def epsilon_loss(model: nn.Module, schedule: Schedule, x0: torch.Tensor, t_max: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """One Monte-Carlo draw of the ε-prediction MSE for the batch ``x0`` (t and ε drawn on the CPU).

    t ~ U{0 … T−1}; ``t_max`` draws t < t_max only, for a sampler that never starts above it.
    """
    t = torch.randint(0, t_max or schedule.num_steps, (x0.shape[0],), generator=generator)
    noise = torch.randn(x0.shape, dtype=x0.dtype, generator=generator).to(x0.device)
    t = t.to(x0.device)
    return F.mse_loss(model_eps(model, q_sample(schedule, x0, t, noise), t).float(), noise)


class DenoiserTraining(Training):
    """Training ``model`` on ``samples`` (N × …, on the model's device) as a ``Training``: each epoch
    visits every sample once in a random order, in batches of ``batch_size`` (the last short batch is
    kept, since anomaly-detection training sets are small); a step is ``loss`` at ``precision`` (the
    loss itself fp32) and one update of ``optimizer``."""

    what = "epsilon-prediction MSE on a batch; one optimiser update"

    def __init__(self, model: nn.Module, samples: torch.Tensor, schedule: Schedule, *, batch_size: int,
                 optimizer: torch.optim.Optimizer,
                 loss: Callable[[nn.Module, Schedule, torch.Tensor], torch.Tensor] = epsilon_loss,
                 generator: torch.Generator | None = None, precision: str = "fp32"):
        self.detector = self.model = model
        self.samples, self.schedule, self.batch_size = samples, schedule, batch_size
        self.n_images = samples.shape[0]
        self.optimizer, self.loss, self.precision = optimizer, loss, precision
        self.generator = generator or torch.Generator()
        self.scaler = grad_scaler(precision, samples.device)
        model.train()

    def batches(self, epoch: int) -> list[torch.Tensor]:
        return list(torch.randperm(self.n_images, generator=self.generator).split(self.batch_size))

    def step(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        with autocast(self.precision, self.samples.device):
            value = self.loss(self.model, self.schedule, self.samples[idx.to(self.samples.device)])
        optimiser_step(value, self.optimizer, self.scaler)
        return {"loss": value.detach()}

    def state(self) -> dict[str, Any]:
        return {"model": self.model, "optimizer": self.optimizer, "generator": GeneratorState(self.generator)}


def fit_denoiser(model: nn.Module, samples: torch.Tensor, schedule: Schedule, *, epochs: int, batch_size: int,
                 optimizer: torch.optim.Optimizer, checkpoint: CacheEntry | None = None,
                 loss: Callable[[nn.Module, Schedule, torch.Tensor], torch.Tensor] = epsilon_loss,
                 desc: str = "denoiser", generator: torch.Generator | None = None,
                 precision: str = "fp32") -> list[dict[str, float]]:
    """Train ``model`` on ``samples`` for ``epochs`` epochs (a ``DenoiserTraining`` run through ``train_loop``).

    Returns the mean loss of each epoch (and its seconds).
    """
    history = DenoiserTraining(model, samples, schedule, batch_size=batch_size, optimizer=optimizer, loss=loss,
                               generator=generator, precision=precision).run(epochs, checkpoint, desc)
    model.eval()
    return history

"""Training a denoiser ε_θ(x_t, t) on a tensor of clean samples (images or latents).

The objective is DDPM's simplified loss (Ho et al. 2020, Eq. 14):

    L = E_{x_0, t ~ U{0..T−1}, ε ~ N(0, I)} ‖ ε − ε_θ(√ᾱ_t · x_0 + √(1 − ᾱ_t) · ε, t) ‖².

``fit_denoiser`` runs it over shuffled mini-batches through ``adnb.runtime.cache.train_loop``, so
every epoch is checkpointed and an interrupted run resumes. Its randomness (order, t, ε) comes
from torch's global CPU generator, which the checkpoint saves: a resumed run continues exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from adnb.diffusion.schedule import Schedule, q_sample
from adnb.runtime.cache import CacheEntry, GeneratorState, train_loop
from adnb.runtime.precision import autocast, grad_scaler, optimiser_step

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


def fit_denoiser(model: nn.Module, samples: torch.Tensor, schedule: Schedule, *, epochs: int, batch_size: int,
                 optimizer: torch.optim.Optimizer, checkpoint: CacheEntry | None = None,
                 loss: Callable[[nn.Module, Schedule, torch.Tensor], torch.Tensor] = epsilon_loss,
                 desc: str = "denoiser", generator: torch.Generator | None = None,
                 precision: str = "fp32") -> list[dict[str, float]]:
    """Train ``model`` on ``samples`` (N × …, already on the model's device) for ``epochs`` epochs.

    Each epoch visits every sample once in a random order (the last short batch is kept, since
    anomaly-detection training sets are small). The model runs at ``precision`` (the loss is fp32).
    Returns the mean loss of each epoch.
    """
    model.train()
    n = samples.shape[0]
    generator = generator or torch.Generator()
    scaler = grad_scaler(precision, samples.device)

    def run_epoch(_: int) -> dict[str, float]:
        total = 0.0
        for idx in torch.randperm(n, generator=generator).split(batch_size):
            with autocast(precision, samples.device):
                value = loss(model, schedule, samples[idx.to(samples.device)])
            optimiser_step(value, optimizer, scaler)
            total += float(value.detach()) * len(idx)
        return {"loss": total / n}

    history = train_loop(epochs, run_epoch, state={"model": model, "optimizer": optimizer,
                                                   "generator": GeneratorState(generator)},
                         checkpoint=checkpoint, desc=desc)
    model.eval()
    return history

"""The discrete diffusion process: a β schedule and the few formulas every sampler is made of.

A schedule is the sequence β_1 … β_T (stored 0-based, ``betas[t]`` for t = 0 … T−1), with

    α_t = 1 − β_t,      ᾱ_t = ∏_{s ≤ t} α_s.

The forward process jumps straight to any step (Ho et al. 2020, Eq. 4):

    q(x_t | x_0) = N( √ᾱ_t · x_0,  (1 − ᾱ_t) · I ).

Every reverse step below is written for a pair (t, t_prev) with t_prev < t, not only t_prev = t − 1,
so the same functions run a strided ("respaced") sampler: the jump t → t_prev behaves like one
step of a process with α = ᾱ_t / ᾱ_{t_prev}. A negative t_prev means "the clean end", ᾱ = 1.

Conventions: ``t`` and ``t_prev`` are Python ints or integer tensors of shape (B,) (one step per
sample); tensors are (B, C, H, W) or any shape with the batch first. The schedule is kept in
float64 and every coefficient is cast to the dtype of the tensors it multiplies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

Timestep = int | torch.Tensor


@dataclass(frozen=True, eq=False)
class Schedule:
    """β_t for t = 0 … T−1 (float64) and the cumulative products derived from it."""

    betas: torch.Tensor
    alphas_cumprod: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        betas = torch.as_tensor(self.betas, dtype=torch.float64).flatten()
        if betas.numel() == 0 or bool(((betas <= 0) | (betas >= 1)).any()):
            raise ValueError("a diffusion schedule needs 0 < β_t < 1 for every step")
        object.__setattr__(self, "betas", betas)
        object.__setattr__(self, "alphas_cumprod", torch.cumprod(1.0 - betas, dim=0))

    @property
    def num_steps(self) -> int:
        """T, the number of diffusion steps the denoiser is trained on."""
        return int(self.betas.numel())


def linear_schedule(beta_start: float = 0.0015, beta_end: float = 0.0195, num_steps: int = 1000) -> Schedule:
    """β_t linear from ``beta_start`` to ``beta_end`` over ``num_steps`` steps.

    The defaults are latent diffusion's values, used by D3AD; Ho et al.'s DDPM (and RealNet's
    IDDPM) use ``beta_start=1e-4, beta_end=0.02``.
    """
    return Schedule(torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64))


class Step(NamedTuple):
    """One reverse step: the sample at t_prev and the clean-sample estimate x̂_0 it came from."""

    prev: torch.Tensor
    x0: torch.Tensor


def _at(values: torch.Tensor, t: Timestep, like: torch.Tensor, fill: float = 1.0) -> torch.Tensor:
    """``values[t]`` broadcast against ``like`` (batch first), with ``fill`` where t < 0."""
    t = torch.as_tensor(t, device=values.device, dtype=torch.long)
    picked = torch.where(t >= 0, values[t.clamp(min=0)], torch.full_like(values[:1], fill).squeeze(0))
    picked = picked.to(device=like.device, dtype=like.dtype)
    return picked.reshape(picked.shape + (1,) * (like.dim() - picked.dim()))


def alpha_bar(schedule: Schedule, t: Timestep, like: torch.Tensor) -> torch.Tensor:
    """ᾱ_t, shaped to broadcast against ``like``; ᾱ = 1 for t < 0 (the clean end)."""
    return _at(schedule.alphas_cumprod, t, like)


def q_sample(schedule: Schedule, x0: torch.Tensor, t: Timestep, noise: torch.Tensor, omega: float = 1.0) -> torch.Tensor:
    """x_t = √ᾱ_t · x_0 + ω · √(1 − ᾱ_t) · ε.

    ω = 1 is the forward process q(x_t | x_0). D3AD's supplement (Eq. 12) keeps only a fraction ω
    of the noise; ω = 0 is its "noiseless scaling" x_t = √ᾱ_t · x_0.
    """
    a = alpha_bar(schedule, t, x0)
    return a.sqrt() * x0 + omega * (1 - a).sqrt() * noise


def predict_x0(schedule: Schedule, x_t: torch.Tensor, t: Timestep, eps: torch.Tensor) -> torch.Tensor:
    """x̂_0 = (x_t − √(1 − ᾱ_t) · ε) / √ᾱ_t, the clean sample a noise estimate implies."""
    a = alpha_bar(schedule, t, x_t)
    return (x_t - (1 - a).sqrt() * eps) / a.sqrt()


def predict_eps(schedule: Schedule, x_t: torch.Tensor, t: Timestep, x0: torch.Tensor) -> torch.Tensor:
    """ε̂ = (x_t − √ᾱ_t · x_0) / √(1 − ᾱ_t), the noise a clean-sample estimate implies."""
    a = alpha_bar(schedule, t, x_t)
    return (x_t - a.sqrt() * x0) / (1 - a).sqrt()


def _previous(t: Timestep, t_prev: Timestep | None) -> Timestep:
    return t - 1 if t_prev is None else t_prev


def posterior(schedule: Schedule, x0: torch.Tensor, x_t: torch.Tensor, t: Timestep,
              t_prev: Timestep | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of q(x_{t_prev} | x_t, x_0) (Ho et al. Eq. 6–7), with t_prev = t − 1 by default.

    With ā = ᾱ_t, ā' = ᾱ_{t_prev}, α = ā / ā' and β = 1 − α (the jump's own β):

        μ̃ = √ā' · β / (1 − ā) · x_0 + √α · (1 − ā') / (1 − ā) · x_t,
        β̃ = (1 − ā') / (1 − ā) · β.
    """
    t_prev = _previous(t, t_prev)
    a, a_prev = alpha_bar(schedule, t, x_t), alpha_bar(schedule, t_prev, x_t)
    alpha = a / a_prev
    beta = 1 - alpha
    mean = a_prev.sqrt() * beta / (1 - a) * x0 + alpha.sqrt() * (1 - a_prev) / (1 - a) * x_t
    return mean, (1 - a_prev) / (1 - a) * beta


def learned_range_variance(schedule: Schedule, t: Timestep, v: torch.Tensor, t_prev: Timestep | None = None,
                           min_variance: float = 1e-20) -> torch.Tensor:
    """Σ = exp(v · log β + (1 − v) · log β̃), IDDPM's learned interpolation (Nichol & Dhariwal 2021, Eq. 15).

    ``v`` in [0, 1] (a model output u in [−1, 1] maps to v = (u + 1) / 2); β̃ is clamped at
    ``min_variance`` where it vanishes (the final step), as diffusers does.
    """
    t_prev = _previous(t, t_prev)
    a, a_prev = alpha_bar(schedule, t, v), alpha_bar(schedule, t_prev, v)
    beta = 1 - a / a_prev
    beta_tilde = ((1 - a_prev) / (1 - a) * beta).clamp(min=min_variance)
    return torch.exp(v * beta.log() + (1 - v) * beta_tilde.log())


def ddpm_step(schedule: Schedule, x_t: torch.Tensor, t: Timestep, eps: torch.Tensor, noise: torch.Tensor | None = None,
              *, t_prev: Timestep | None = None, variance: torch.Tensor | None = None) -> Step:
    """Ancestral sampling: x_{t_prev} = μ̃(x̂_0, x_t) + √Σ · z, z ~ N(0, I) (Ho et al. Alg. 2).

    Σ defaults to β̃ (diffusers' ``fixed_small``); pass ``variance`` for a learned or scaled one.
    No noise is added on the step that reaches the clean end (t_prev < 0), nor when ``noise`` is None
    (then the step returns the posterior mean).
    """
    t_prev = _previous(t, t_prev)
    x0 = predict_x0(schedule, x_t, t, eps)
    mean, beta_tilde = posterior(schedule, x0, x_t, t, t_prev)
    if noise is None:
        return Step(mean, x0)
    var = beta_tilde.clamp(min=1e-20) if variance is None else variance
    last = alpha_bar(schedule, t_prev, x_t) >= 1  # ᾱ = 1 only at the clean end
    return Step(mean + torch.where(last, torch.zeros_like(var), var.sqrt()) * noise, x0)


def ddim_step(schedule: Schedule, x_t: torch.Tensor, t: Timestep, t_prev: Timestep, eps: torch.Tensor,
              eta: float = 0.0, noise: torch.Tensor | None = None) -> Step:
    """DDIM (Song et al. 2021, Eq. 12): from x_t to x_{t_prev} through x̂_0.

        x_{t_prev} = √ā' · x̂_0 + √(1 − ā' − σ²) · ε + σ · z,
        σ = η · √((1 − ā') / (1 − ā)) · √(1 − ā / ā').

    η = 0 is deterministic (``noise`` is ignored); η = 1 has DDPM's variance β̃.
    """
    a, a_prev = alpha_bar(schedule, t, x_t), alpha_bar(schedule, t_prev, x_t)
    x0 = predict_x0(schedule, x_t, t, eps)
    sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
    prev = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).sqrt() * eps
    if eta > 0:
        if noise is None:
            raise ValueError("ddim_step with eta > 0 needs noise")
        prev = prev + sigma * noise
    return Step(prev, x0)

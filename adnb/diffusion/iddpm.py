"""IDDPM (Nichol & Dhariwal 2021): a learned reverse variance, the hybrid loss, and SDAS sampling.

RealNet's SDAS (supplement §B) samples from an IDDPM whose denoiser outputs two things per pixel:
the noise estimate ε_θ and a number u ∈ [−1, 1] that sets the reverse variance between the two
natural choices, in log space (Eq. S1):

    v = (u + 1) / 2,     Σ_θ(x_t, t) = exp(v · log β_t + (1 − v) · log β̃_t),
    β̃_t = (1 − ᾱ_{t−1}) / (1 − ᾱ_t) · β_t            (the posterior variance of q(x_{t−1} | x_t, x_0)).

ε_θ is trained with the usual L_simple; Σ_θ can only be trained through the variational bound,
so the loss is the hybrid (Eq. S2–S3)

    L_hybrid = L_simple + γ · L_vlb,     L_vlb = L_0 + L_1 + … + L_T,

with the mean stop-gradiented inside L_vlb (only v learns from it). As in IDDPM's and RealNet's
code, L_vlb is estimated from the one sampled t of each example, T · L_t, in bits per dimension;
γ = 0.001 at T = 1000 therefore weighs that single term by 1.

SDAS then *inflates* the reverse variance by an anomaly strength s at every step:

- IDDPM ancestral variant (the official code):  x_{t−1} = μ_θ + √((1 + s) · Σ_θ) · z;
- DDIM variant (supplement Algorithm S1):        x_{t−1} = DDIM(x_t, ε_θ) + √(s · Σ_θ) · z.

s = 0 draws ordinary (normal-looking) samples; s ∈ [0.1, 0.2] pushes them off the data manifold
into plausible anomalies. Sampling runs on a respaced schedule of a few steps (RealNet: 20).

The β schedule and the step formulas come from ``adnb.diffusion.schedule``; this module adds only
what IDDPM adds.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from adnb.diffusion.schedule import Schedule, alpha_bar, ddim_step, ddpm_step, posterior, predict_eps, predict_x0

VARIANTS = ("iddpm", "ddim")
Denoiser6 = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t) -> (B, 2C, H, W): ε and u


def respace(schedule: Schedule, steps: int) -> tuple[Schedule, torch.Tensor]:
    """A ``steps``-step schedule on the strided timesteps τ_i = i · ⌊T / steps⌋ (IDDPM §4, "ddimN").

    Its betas are β'_i = 1 − ᾱ_{τ_i} / ᾱ_{τ_{i−1}} (ᾱ_{τ_{−1}} = 1), so ᾱ'_i = ᾱ_{τ_i}: the same marginals
    in fewer, larger jumps. The denoiser is still called with the original timestep τ_i.
    """
    if not 1 <= steps <= schedule.num_steps:
        raise ValueError(f"cannot respace {schedule.num_steps} steps into {steps}")
    taus = torch.arange(0, schedule.num_steps, schedule.num_steps // steps)[:steps]
    abar = schedule.alphas_cumprod[taus]
    betas = 1 - abar / torch.cat([abar.new_ones(1), abar[:-1]])
    return Schedule(betas), taus


def posterior_log_variance(schedule: Schedule, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """log β̃_t, with IDDPM's clipping: at t = 0 (where β̃_0 = 0) it takes log β̃_1 instead."""
    t = torch.as_tensor(t, device=like.device, dtype=torch.long)
    t = torch.where(t == 0, torch.ones_like(t), t)
    a, a_prev = alpha_bar(schedule, t, like), alpha_bar(schedule, t - 1, like)
    return ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).log()


def learned_log_variance(schedule: Schedule, t: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """log Σ_θ = v · log β_t + (1 − v) · log β̃_t with v = (u + 1) / 2 (Eq. S1); ``u`` is the raw output."""
    v = (u + 1) / 2
    t = torch.as_tensor(t, device=u.device, dtype=torch.long)
    beta = 1 - alpha_bar(schedule, t, u) / alpha_bar(schedule, t - 1, u)
    return v * beta.log() + (1 - v) * posterior_log_variance(schedule, t, u)


def split_output(output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ε_θ, u) from a denoiser output with twice the image's channels."""
    eps, u = output.chunk(2, dim=1)
    return eps, u


def p_mean_variance(schedule: Schedule, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                    clip: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean μ_θ, log-variance log Σ_θ and x̂_0 of p_θ(x_{t−1} | x_t).

    μ_θ is the posterior mean at x̂_0 = (x_t − √(1 − ᾱ_t) ε_θ) / √ᾱ_t, clipped to [−1, 1] when ``clip``.
    """
    eps, u = split_output(output)
    x0 = predict_x0(schedule, x_t, t, eps)
    if clip:
        x0 = x0.clamp(-1, 1)
    mean, _ = posterior(schedule, x0, x_t, t)
    return mean, learned_log_variance(schedule, t, u), x0


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(μ₁, e^{ℓ₁}) ‖ N(μ₂, e^{ℓ₂})) = ½ (ℓ₂ − ℓ₁ + e^{ℓ₁ − ℓ₂} + (μ₁ − μ₂)² e^{−ℓ₂} − 1), elementwise, nats."""
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1)


def _std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log p(x) of 8-bit data x ∈ [−1, 1] under N(mean, e^{2·log_scale}) integrated over x's bin of width 2/255.

    The two end bins reach to ±∞ (Ho et al. 2020, §3.3): this is L_0 = −log p_θ(x_0 | x_1).
    """
    inv_std = torch.exp(-log_scale)
    cdf_plus = _std_normal_cdf(inv_std * (x - mean + 1 / 255))
    cdf_minus = _std_normal_cdf(inv_std * (x - mean - 1 / 255))
    log_cdf_plus = cdf_plus.clamp(min=1e-12).log()
    log_one_minus_cdf_minus = (1 - cdf_minus).clamp(min=1e-12).log()
    log_delta = (cdf_plus - cdf_minus).clamp(min=1e-12).log()
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_minus, log_delta))


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(dim=1)


def vlb_term(schedule: Schedule, output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """L_t per example in bits/dim: KL(q(x_{t−1} | x_t, x_0) ‖ p_θ(x_{t−1} | x_t)) for t > 0, L_0 = −log p_θ(x_0 | x_1) at t = 0."""
    true_mean, _ = posterior(schedule, x0, x_t, t)
    true_logvar = posterior_log_variance(schedule, t, x_t)
    mean, logvar, _ = p_mean_variance(schedule, output, x_t, t, clip=False)
    kl = _mean_flat(normal_kl(true_mean, true_logvar, mean, logvar)) / math.log(2.0)
    nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, mean, 0.5 * logvar)) / math.log(2.0)
    return torch.where(t == 0, nll, kl)


def hybrid_loss(schedule: Schedule, output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                noise: torch.Tensor, gamma: float = 0.001) -> dict[str, torch.Tensor]:
    """L_hybrid = L_simple + γ · T · L_t (batch means), the mean stop-gradiented in L_t.

    ``output`` is the denoiser's (ε_θ, u) at (x_t, t) with x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) · noise.
    """
    eps, u = split_output(output)
    simple = _mean_flat((noise - eps) ** 2)
    frozen = torch.cat([eps.detach(), u], dim=1)
    vlb = vlb_term(schedule, frozen, x0, x_t, t)
    loss = simple + gamma * schedule.num_steps * vlb
    return {"loss": loss.mean(), "simple": simple.mean().detach(), "vlb": vlb.mean().detach()}


def sdas_step(schedule: Schedule, output: torch.Tensor, x_t: torch.Tensor, t: int, strength: float,
              variant: str, noise: torch.Tensor) -> torch.Tensor:
    """One SDAS reverse step t → t − 1 with the variance inflated by the anomaly strength s.

    - ``"iddpm"``: x_{t−1} = μ_θ + √((1 + s) Σ_θ) · z  (RealNet's ``p_sample``);
    - ``"ddim"``:  x_{t−1} = √ᾱ_{t−1} x̂_0 + √(1 − ᾱ_{t−1}) ε̂ + √(s Σ_θ) · z  (Algorithm S1, η = 0).

    x̂_0 is clipped to [−1, 1] and ε̂ re-derived from it, as the official sampler does. No noise on the
    last step (t = 0).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown SDAS variant {variant!r}; valid: {', '.join(VARIANTS)}")
    _, logvar, x0 = p_mean_variance(schedule, output, x_t, t, clip=True)
    eps = predict_eps(schedule, x_t, t, x0)
    if variant == "iddpm":
        return ddpm_step(schedule, x_t, t, eps, noise, variance=(1 + strength) * logvar.exp()).prev
    prev = ddim_step(schedule, x_t, t, t - 1, eps).prev
    return prev + (math.sqrt(strength) * (0.5 * logvar).exp() * noise if t > 0 else 0)


@torch.no_grad()
def sdas_sample(model: Denoiser6, shape: tuple[int, ...], schedule: Schedule, *, steps: int = 20,
                strength: float = 0.0, variant: str = "iddpm", generator: torch.Generator | None = None,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """Draw samples in [−1, 1] with SDAS (strength ``strength``) on ``steps`` respaced steps.

    ``model(x_t, τ)`` returns ε and u for the original timesteps τ; noise comes from ``generator``
    (CPU), so a seed gives the same images on any device.
    """
    spaced, taus = respace(schedule, steps)
    x = torch.randn(shape, generator=generator).to(device)
    for i in reversed(range(steps)):
        t_model = taus[i].expand(shape[0]).to(device)
        output = model(x, t_model)
        noise = torch.randn(shape, generator=generator).to(device)
        x = sdas_step(spaced, output, x, i, strength, variant, noise)
    return x.clamp(-1, 1)

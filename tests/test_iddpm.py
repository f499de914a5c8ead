"""IDDPM pieces of SDAS against diffusers, torch.distributions and the definitions."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from adnb.diffusion import linear_schedule
from adnb.diffusion.iddpm import (discretized_gaussian_log_likelihood, hybrid_loss, learned_log_variance,
                                  normal_kl, posterior_log_variance, respace, sdas_sample, sdas_step)

T = 1000


@pytest.fixture(scope="module")
def schedule():
    return linear_schedule(1e-4, 0.02, T)


def _ddpm(**kw):
    return DDPMScheduler(num_train_timesteps=T, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                         variance_type="learned_range", clip_sample=True, **kw)


def test_respace_keeps_the_marginals(schedule):
    spaced, taus = respace(schedule, 20)
    assert taus.tolist() == list(range(0, 1000, 50))
    torch.testing.assert_close(spaced.alphas_cumprod, schedule.alphas_cumprod[taus])


def test_learned_variance_interpolates_beta_and_beta_tilde(schedule):
    x = torch.zeros(3, 1, 1, 1)
    t = torch.tensor([5, 300, 999])
    beta = schedule.betas[t].view(-1, 1, 1, 1).float()
    beta_tilde = posterior_log_variance(schedule, t, x).exp()
    torch.testing.assert_close(learned_log_variance(schedule, t, x + 1).exp(), beta)  # u = 1: v = 1, Σ = β
    torch.testing.assert_close(learned_log_variance(schedule, t, x - 1).exp(), beta_tilde)  # u = −1: Σ = β̃
    half = learned_log_variance(schedule, t, x).exp()  # v = 1/2: the geometric mean
    torch.testing.assert_close(half, (beta * beta_tilde).sqrt())
    # IDDPM clips log β̃ at t = 0 (where β̃ = 0) to log β̃_1
    torch.testing.assert_close(posterior_log_variance(schedule, torch.tensor([0]), x[:1]),
                               posterior_log_variance(schedule, torch.tensor([1]), x[:1]))


@pytest.mark.parametrize("t", [999, 500, 7])
def test_iddpm_step_at_strength_zero_is_diffusers_learned_range(schedule, t):
    g = torch.Generator().manual_seed(t)
    x = torch.randn(2, 3, 8, 8, generator=g)
    out = torch.cat([torch.randn(2, 3, 8, 8, generator=g), torch.rand(2, 3, 8, 8, generator=g) * 2 - 1], dim=1)
    noise_seed = 123
    ref = _ddpm().step(out, t, x, generator=torch.Generator().manual_seed(noise_seed)).prev_sample
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(noise_seed))
    ours = sdas_step(schedule, out, x, t, 0.0, "iddpm", noise)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)


def test_strength_scales_only_the_noise_by_sqrt_1_plus_s(schedule):
    g = torch.Generator().manual_seed(0)
    x, out = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 6, 8, 8, generator=g).clamp(-1, 1)
    noise = torch.randn(2, 3, 8, 8, generator=g)
    mean = sdas_step(schedule, out, x, 400, 0.0, "iddpm", torch.zeros_like(noise))
    plain = sdas_step(schedule, out, x, 400, 0.0, "iddpm", noise) - mean
    strong = sdas_step(schedule, out, x, 400, 0.15, "iddpm", noise) - mean
    torch.testing.assert_close(strong, math.sqrt(1.15) * plain)


def test_ddim_variant_is_diffusers_ddim_plus_s_sigma_noise(schedule):
    spaced, taus = respace(schedule, 20)
    ddim = DDIMScheduler(num_train_timesteps=T, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                         clip_sample=True, set_alpha_to_one=True, timestep_spacing="leading")
    ddim.set_timesteps(20)
    g = torch.Generator().manual_seed(1)
    x, out = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 6, 8, 8, generator=g).clamp(-1, 1)
    noise = torch.randn(2, 3, 8, 8, generator=g)
    i = 10  # respaced index; its model timestep is τ_i = 500
    ref = ddim.step(out[:, :3], int(taus[i]), x, eta=0.0, use_clipped_model_output=True).prev_sample
    deterministic = sdas_step(spaced, out, x, i, 0.0, "ddim", noise)
    torch.testing.assert_close(deterministic, ref, atol=1e-5, rtol=1e-4)
    s = 0.02
    sigma = (0.5 * learned_log_variance(spaced, torch.tensor(i), out[:, 3:])).exp()
    torch.testing.assert_close(sdas_step(spaced, out, x, i, s, "ddim", noise), ref + math.sqrt(s) * sigma * noise,
                               atol=1e-5, rtol=1e-4)


def test_normal_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(2)
    m1, m2, l1, l2 = (torch.randn(50, generator=g) for _ in range(4))
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * l1).exp()),
                                            torch.distributions.Normal(m2, (0.5 * l2).exp()))
    torch.testing.assert_close(normal_kl(m1, l1, m2, l2), ref)


def test_discretized_likelihood_is_the_bin_probability():
    x = torch.tensor([-1.0, -0.5, 0.0, 0.3, 1.0])
    mean, log_scale = torch.tensor([-0.9, -0.4, 0.05, 0.2, 0.9]), torch.full((5,), -2.0)
    normal = torch.distributions.Normal(mean, log_scale.exp())
    upper = torch.where(x > 0.999, torch.ones(5), normal.cdf(x + 1 / 255))
    lower = torch.where(x < -0.999, torch.zeros(5), normal.cdf(x - 1 / 255))
    torch.testing.assert_close(discretized_gaussian_log_likelihood(x, mean, log_scale), (upper - lower).log())


def test_hybrid_loss_stops_the_mean_gradient_in_the_vlb(schedule):
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    from adnb.diffusion import q_sample

    x_t = q_sample(schedule, x0, t, noise)
    eps = noise.clone().requires_grad_(True)  # a perfect ε: L_simple = 0 and its gradient vanishes
    u = torch.zeros(4, 3, 8, 8, requires_grad=True)
    terms = hybrid_loss(schedule, torch.cat([eps, u], 1), x0, x_t, t, noise)
    terms["loss"].backward()
    assert float(terms["simple"]) == 0.0
    assert eps.grad.abs().max() == 0  # the mean learns only from L_simple
    assert u.grad.abs().max() > 0  # the variance learns from L_vlb
    assert torch.isfinite(terms["vlb"])


def test_sdas_sample_is_seeded_and_bounded(schedule):
    def model(x, t):
        return torch.cat([0.5 * x, torch.zeros_like(x)], dim=1)

    a = sdas_sample(model, (2, 3, 4, 4), schedule, steps=5, strength=0.1, generator=torch.Generator().manual_seed(0))
    b = sdas_sample(model, (2, 3, 4, 4), schedule, steps=5, strength=0.1, generator=torch.Generator().manual_seed(0))
    c = sdas_sample(model, (2, 3, 4, 4), schedule, steps=5, strength=0.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    assert a.abs().max() <= 1

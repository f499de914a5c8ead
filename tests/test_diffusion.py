"""adnb.diffusion against diffusers' schedulers, closed-form identities, and a tiny training run."""

import copy

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from torch import nn

from adnb.diffusion import (Schedule, alpha_bar, ddim_step, ddpm_step, epsilon_loss, fit_denoiser,
                            learned_range_variance, linear_schedule, posterior, predict_eps, predict_x0, q_sample)
from adnb.runtime.cache import CacheEntry

D3AD = dict(beta_start=0.0015, beta_end=0.0195)
DDPM = dict(beta_start=1e-4, beta_end=0.02)


def in_float64(scheduler):
    """The diffusers scheduler with our float64 ᾱ, so a comparison tests the step formulas alone."""
    ours = Schedule(scheduler.betas.double())
    scheduler.betas = ours.betas
    scheduler.alphas = 1 - ours.betas
    scheduler.alphas_cumprod = ours.alphas_cumprod
    scheduler.one = torch.tensor(1.0, dtype=torch.float64)
    scheduler.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    return scheduler, ours


def sample(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("betas", [D3AD, DDPM])
def test_linear_schedule_matches_diffusers(betas):
    ours = linear_schedule(**betas)
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", **betas)
    assert ours.num_steps == 1000 and ours.betas.dtype == torch.float64
    torch.testing.assert_close(ours.betas, ref.betas.double(), rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod.double(), rtol=0, atol=1e-6)
    assert ours.betas[0] == pytest.approx(betas["beta_start"]) and ours.betas[-1] == pytest.approx(betas["beta_end"])


def test_schedule_rejects_impossible_betas():
    with pytest.raises(ValueError):
        Schedule(torch.tensor([0.1, 1.0]))


def test_q_sample_matches_add_noise_and_omega_scales_the_noise():
    ref, ours = in_float64(DDPMScheduler(beta_schedule="linear", **D3AD))
    x0, noise, t = sample(5, 4, 8, 8), sample(5, 4, 8, 8, seed=1), torch.tensor([0, 10, 80, 500, 999])
    torch.testing.assert_close(q_sample(ours, x0, t, noise), ref.add_noise(x0, noise, t), rtol=0, atol=1e-9)
    # ω = 0 is D3AD's noiseless scaling: no noise at all, only √ᾱ_t · x_0.
    a = ours.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(q_sample(ours, x0, t, noise, omega=0.0), a.sqrt() * x0)
    half = q_sample(ours, x0, t, noise, omega=0.5)
    torch.testing.assert_close(half - a.sqrt() * x0, 0.5 * (1 - a).sqrt() * noise)


def test_alpha_bar_is_one_before_the_first_step():
    s = linear_schedule()
    x = torch.zeros(3, 1, 1, 1)
    got = alpha_bar(s, torch.tensor([-1, 0, 999]), x).flatten()
    assert got[0] == 1 and got[1] == pytest.approx(1 - 0.0015) and got[2] == pytest.approx(float(s.alphas_cumprod[-1]))


def test_x0_and_eps_predictions_invert_each_other():
    s = linear_schedule()
    x0, eps, t = sample(4, 3, 5, 5), sample(4, 3, 5, 5, seed=2), torch.tensor([1, 50, 300, 999])
    x_t = q_sample(s, x0, t, eps)
    torch.testing.assert_close(predict_x0(s, x_t, t, eps), x0)
    torch.testing.assert_close(predict_eps(s, x_t, t, x0), eps)


@pytest.mark.parametrize("t,t_prev", [(1, 0), (400, 399), (999, 998), (400, 350), (60, 0)])
def test_posterior_is_the_product_of_the_two_gaussians(t, t_prev):
    """q(x' | x_t, x_0) ∝ q(x_t | x') q(x' | x_0): precision and mean of a product of Gaussians."""
    s = linear_schedule()
    x0, x_t = sample(2, 3, 4, 4), sample(2, 3, 4, 4, seed=3)
    a, a_prev = s.alphas_cumprod[t], s.alphas_cumprod[t_prev]
    alpha = a / a_prev
    precision = alpha / (1 - alpha) + 1 / (1 - a_prev)
    mean = (alpha.sqrt() * x_t / (1 - alpha) + a_prev.sqrt() * x0 / (1 - a_prev)) / precision
    got_mean, got_var = posterior(s, x0, x_t, t, t_prev)
    torch.testing.assert_close(got_mean, mean, rtol=0, atol=1e-9)
    assert float(got_var.flatten()[0]) == pytest.approx(float(1 / precision), rel=1e-9)


@pytest.mark.parametrize("betas", [D3AD, DDPM])
def test_ddpm_step_matches_diffusers(betas):
    ref, ours = in_float64(DDPMScheduler(beta_schedule="linear", clip_sample=False, variance_type="fixed_small", **betas))
    x_t, eps = sample(2, 4, 6, 6), sample(2, 4, 6, 6, seed=4)
    for t in (999, 500, 37, 1, 0):
        want = ref.step(eps, t, x_t, generator=torch.Generator().manual_seed(t))
        noise = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(t), dtype=x_t.dtype)
        got = ddpm_step(ours, x_t, t, eps, noise)
        torch.testing.assert_close(got.prev, want.prev_sample, rtol=0, atol=1e-9)
        torch.testing.assert_close(got.x0, want.pred_original_sample, rtol=0, atol=1e-9)


def test_strided_ddpm_step_with_learned_variance_matches_diffusers():
    """A 20-step respaced sampler with IDDPM's learned-range variance (what RealNet's SDAS runs)."""
    ref, ours = in_float64(DDPMScheduler(beta_schedule="linear", clip_sample=False, variance_type="learned_range", **DDPM))
    ref.set_timesteps(20)
    x_t, eps, u = sample(2, 3, 6, 6), sample(2, 3, 6, 6, seed=5), torch.tanh(sample(2, 3, 6, 6, seed=6))
    for t in ref.timesteps.tolist():
        t_prev = ref.previous_timestep(t)
        t_prev = int(t_prev) if not torch.is_tensor(t_prev) else int(t_prev.item())
        want = ref.step(torch.cat([eps, u], dim=1), t, x_t, generator=torch.Generator().manual_seed(t))
        noise = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(t), dtype=x_t.dtype)
        var = learned_range_variance(ours, t, (u + 1) / 2, t_prev)
        got = ddpm_step(ours, x_t, t, eps, noise, t_prev=t_prev, variance=var)
        torch.testing.assert_close(got.prev, want.prev_sample, rtol=0, atol=1e-9)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_matches_diffusers(eta):
    ref, ours = in_float64(DDIMScheduler(beta_schedule="linear", clip_sample=False, set_alpha_to_one=True, **D3AD))
    ref.set_timesteps(10)
    x_t, eps = sample(2, 4, 6, 6), sample(2, 4, 6, 6, seed=7)
    for t in ref.timesteps.tolist():
        t_prev = t - 1000 // 10
        noise = sample(2, 4, 6, 6, seed=t)
        want = ref.step(eps, t, x_t, eta=eta, variance_noise=noise if eta > 0 else None)
        got = ddim_step(ours, x_t, t, t_prev, eps, eta=eta, noise=noise)
        torch.testing.assert_close(got.prev, want.prev_sample, rtol=0, atol=1e-9)
        torch.testing.assert_close(got.x0, want.pred_original_sample, rtol=0, atol=1e-9)


def test_ddim_with_the_true_noise_walks_along_the_forward_process():
    """With ε equal to the noise that made x_t, DDIM (η = 0) lands exactly on q_sample at t_prev."""
    s = linear_schedule()
    x0, eps = sample(3, 2, 4, 4), sample(3, 2, 4, 4, seed=8)
    t, t_prev = torch.tensor([80, 500, 999]), torch.tensor([72, 0, -1])
    got = ddim_step(s, q_sample(s, x0, t, eps), t, t_prev, eps)
    torch.testing.assert_close(got.prev, q_sample(s, x0, t_prev, eps))
    torch.testing.assert_close(got.x0, x0)


def test_ddim_eta_one_has_the_ddpm_variance():
    s = linear_schedule()
    x_t, eps, z = sample(1, 1, 2, 2), sample(1, 1, 2, 2, seed=9), sample(1, 1, 2, 2, seed=10)
    t, t_prev = 300, 299
    spread = ddim_step(s, x_t, t, t_prev, eps, eta=1.0, noise=z).prev - ddim_step(s, x_t, t, t_prev, eps, eta=1.0, noise=0 * z).prev
    _, var = posterior(s, x_t, x_t, t, t_prev)
    torch.testing.assert_close(spread, var.sqrt() * z)


class TinyDenoiser(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 32), nn.SiLU(), nn.Linear(32, 2))

    def forward(self, x, t):
        return self.net(torch.cat([x, t[:, None].float() / 1000], dim=1))


def test_fit_denoiser_lowers_the_loss_and_resumes_exactly(tmp_path):
    data = torch.randn(256, 2) * 0.1 + torch.tensor([1.0, -1.0])
    schedule = linear_schedule()

    def run(epochs, model, entry=None):
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        return fit_denoiser(model, data, schedule, epochs=epochs, batch_size=32, optimizer=opt, checkpoint=entry)

    torch.manual_seed(0)
    start = TinyDenoiser()
    torch.manual_seed(1)
    straight = copy.deepcopy(start)
    history = run(6, straight)
    assert history[-1]["loss"] < 0.8 * history[0]["loss"]

    entry = CacheEntry(tmp_path / "denoiser", {"test": 1})
    torch.manual_seed(1)
    resumed = copy.deepcopy(start)
    run(3, resumed, entry)  # "interrupted" after 3 epochs: the checkpoint keeps them
    torch.manual_seed(123)  # a resumed run restores the RNG of the checkpoint, not this one
    finished = copy.deepcopy(start)
    resumed_history = run(6, finished, entry)
    assert [h["loss"] for h in resumed_history] == pytest.approx([h["loss"] for h in history])
    for a, b in zip(finished.parameters(), straight.parameters()):
        torch.testing.assert_close(a, b)


def test_epsilon_loss_of_the_true_noise_is_zero():
    class Oracle(nn.Module):
        """Knows x_0 = 0, so ε = x_t / √(1 − ᾱ_t) exactly."""

        def forward(self, x, t):
            return x / (1 - schedule.alphas_cumprod[t].float()).sqrt().view(-1, 1)

    schedule = linear_schedule()
    assert float(epsilon_loss(Oracle(), schedule, torch.zeros(64, 3))) == pytest.approx(0.0, abs=1e-8)

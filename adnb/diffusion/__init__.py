"""Denoising diffusion, shared by D3AD (latent reconstruction) and RealNet (SDAS anomaly synthesis).

- ``schedule``: the β schedule and pure step functions (forward jump, posterior, DDPM, DDIM);
- ``training``: the ε-prediction loss and a resumable training loop for any denoiser.
"""

from adnb.diffusion.schedule import (Schedule, Step, alpha_bar, ddim_step, ddpm_step, learned_range_variance,
                                     linear_schedule, posterior, predict_eps, predict_x0, q_sample)
from adnb.diffusion.training import epsilon_loss, fit_denoiser, model_eps

__all__ = ["Schedule", "Step", "alpha_bar", "ddim_step", "ddpm_step", "epsilon_loss", "fit_denoiser",
           "learned_range_variance", "linear_schedule", "model_eps", "posterior", "predict_eps", "predict_x0",
           "q_sample"]

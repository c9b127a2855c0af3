"""Diffusion objectives for a denoiser D(x, σ): EDM's denoising loss and CDM's consistency term."""

from __future__ import annotations

import torch

from .. import _validate as check
from ..losses import edm_weight
from ..schedules import rho_grid
from ..timesteps import EDM_P_MEAN, EDM_P_STD, lognormal_sigmas
from ._common import bcast, check_batch, draw_device, rand, randn_like, stats_of
from .base import Objective

__all__ = ["EDMDenoising", "ConsistentDiffusion"]


def _edm_sigma(x0, generator, p_mean, p_std):
    device = draw_device(generator, x0)
    return lognormal_sigmas(x0.shape[0], p_mean, p_std, generator=generator, device=device, dtype=torch.float64).to(
        x0.device
    )


class EDMDenoising(Objective):
    """EDM's loss (Karras et al. 2022, eq. 8 with Table 1): ln σ ~ N(P_mean, P_std²),
    λ(σ) = (σ² + σ_d²)/(σ·σ_d)², loss = λ·mean((D(y + σn, σ) − y)²) per sample.

    The mean over a sample's elements (EDM sums them) keeps losses comparable across resolutions;
    Adam-type optimizers are invariant to that constant factor, so EDM's learning rates carry over.
    """

    function = "diffusion"

    def __init__(self, *, p_mean=EDM_P_MEAN, p_std=EDM_P_STD, sigma_data=0.5):
        self.p_mean, self.p_std = float(p_mean), check.positive("p_std", p_std)
        self.sigma_data = check.positive("sigma_data", sigma_data)

    def __call__(self, denoiser, x0, *, step: int = 0, generator=None, **cond):
        x0 = check_batch(x0)
        sigma = _edm_sigma(x0, generator, self.p_mean, self.p_std)
        lam = edm_weight(sigma, self.sigma_data)
        d = denoiser(x0 + bcast(sigma, x0) * randn_like(x0, generator), sigma, **cond)
        loss = lam.to(d.dtype) * (d - x0).square().flatten(1).mean(1)
        return loss, stats_of(sigma=sigma)


class ConsistentDiffusion(Objective):
    """CDM (Daras et al. 2023): EDM loss + λ·(x̂₁ − D(x_σ, σ))·(x̂₂ − D(x_σ, σ)).

    x̂₁, x̂₂ are D(·, σ') at the ends of two independent backward-SDE chains (Euler–Maruyama,
    no grad) started from the same x_σ down to σ' = max(σ − ε, σ_min), ε ~ U[0, ε_max], on a
    ρ = 7 grid of ``chain_steps`` points. The product of two independent residuals is an unbiased
    estimate of ‖E[D(x_σ', σ') | x_σ] − D(x_σ, σ)‖² (the martingale property of the denoiser).
    As in the CDM code, gradients flow through both D(x_σ, σ) and the chain ends' denoising.
    """

    function = "diffusion"

    def __init__(
        self,
        *,
        lam: float = 2.0,
        eps_max: float = 0.05,
        chain_steps: int = 6,
        sigma_min: float = 0.002,
        rho: float = 7.0,
        p_mean=EDM_P_MEAN,
        p_std=EDM_P_STD,
        sigma_data=0.5,
    ):
        self.lam = check.non_negative("lam", lam)
        self.eps_max = check.non_negative("eps_max", eps_max)
        self.chain_steps = check.integer_at_least("chain_steps", chain_steps, 2)
        self.sigma_min = check.positive("sigma_min", sigma_min)
        self.rho = check.positive("rho", rho)
        self.edm = EDMDenoising(p_mean=p_mean, p_std=p_std, sigma_data=sigma_data)

    def __call__(self, denoiser, x0, *, step: int = 0, generator=None, **cond):
        x0 = check_batch(x0)
        edm = self.edm
        sigma = _edm_sigma(x0, generator, edm.p_mean, edm.p_std)
        lam_edm = edm_weight(sigma, edm.sigma_data)
        x_sigma = x0 + bcast(sigma, x0) * randn_like(x0, generator)
        d_init = denoiser(x_sigma, sigma, **cond)
        loss_edm = lam_edm.to(d_init.dtype) * (d_init - x0).square().flatten(1).mean(1)

        eps = rand(x0.shape[0], x0, generator) * self.eps_max
        sigma_end = torch.minimum((sigma - eps).clamp_min(self.sigma_min), sigma)
        grid = rho_grid(sigma, sigma_end, self.chain_steps, self.rho)  # [B, steps], σ → σ'
        grid2 = grid.repeat(2, 1)
        cond2 = {k: torch.cat([v, v]) if torch.is_tensor(v) else v for k, v in cond.items()}
        x = torch.cat([x_sigma, x_sigma]).detach()
        with torch.no_grad():
            for j in range(self.chain_steps - 1):
                t_cur, t_next = grid2[:, j], grid2[:, j + 1]
                d = (x - denoiser(x, t_cur, **cond2)) / bcast(t_cur, x)
                noise = randn_like(x, generator)
                x = (
                    x
                    + bcast(2 * (t_next - t_cur), x) * d
                    + bcast((2 * (t_cur - t_next).abs() * t_cur).sqrt(), x) * noise
                )
        x_hat = denoiser(x, torch.cat([sigma_end, sigma_end]), **cond2)
        x_hat1, x_hat2 = x_hat.chunk(2)
        martingale = ((x_hat1 - d_init) * (x_hat2 - d_init)).flatten(1).mean(1)
        loss = loss_edm + self.lam * martingale
        return loss, stats_of(sigma=sigma, loss_edm=loss_edm.detach(), martingale=martingale.detach())

"""Bidirectional consistency (BCM, Li et al. 2024): one network f(x, σ, σ_end) for both directions."""

from __future__ import annotations

import torch

from .. import _validate as check
from ..schedules import ict_num_scales, karras_sigmas
from ..timesteps import ICT_P_MEAN, ICT_P_STD, lognormal_index_probs
from ._common import SharedRandomness, bcast, check_batch, distance_fn, draw_device, frozen_call, randn_like, stats_of
from .base import Objective

__all__ = ["BidirectionalConsistency"]


class BidirectionalConsistency(Objective):
    """The BCM fine-tuning loss = iCT term + bidirectional ("soft") term, each weighted by 1/Δσ.

    With a σ pair (student t = σ_{i+1}, target r = σ_i) drawn as in iCT (t < σ_max) and a jump
    level s ≠ t drawn from the same lognormal probabilities:
      iCT:  d(f(x_t, t → σ_min), sg f(x_r, r → σ_min)) / |t − r|
      soft: d(f_sg(f(x_t, t → s), s → σ_min), sg f(x_r, r → σ_min)) / |s − t|
    with d = pseudo-Huber (``distance``, ``huber_c``). In the soft term the gradient flows through
    the inner jump f(x_t, t → s) and through the outer call's *input*, not its weights
    (``frozen_call``). All calls share one dropout mask. ``num_scales`` fixed (BCM fine-tunes with
    N = 321) unless ``total_steps`` selects the iCT curriculum. ``divide_by_sqrt_d`` matches the
    BCM code's extra 1/√d.
    """

    function = "bcm"

    def __init__(
        self,
        num_scales: int | None = 321,
        total_steps: int | None = None,
        *,
        p_mean=ICT_P_MEAN,
        p_std=ICT_P_STD,
        sigma_min=0.002,
        sigma_max=80.0,
        rho=7.0,
        distance="pseudo-huber",
        huber_c: float | None = None,
        divide_by_sqrt_d: bool = False,
        soft_weight: float = 1.0,
    ):
        if (num_scales is None) == (total_steps is None):
            raise ValueError("give exactly one of num_scales (fixed grid) or total_steps (iCT curriculum)")
        self.fixed = None if num_scales is None else check.integer_at_least("num_scales", num_scales, 3)
        self.total_steps = total_steps
        self.p_mean, self.p_std = float(p_mean), check.positive("p_std", p_std)
        self.sigma_min, self.sigma_max = check.sigma_range(sigma_min, sigma_max)
        self.rho = check.positive("rho", rho)
        self.distance = distance_fn(distance, huber_c, divide_by_sqrt_d=bool(divide_by_sqrt_d))
        self.soft_weight = check.non_negative("soft_weight", soft_weight)

    def num_scales(self, step: int) -> int:
        return self.fixed if self.fixed is not None else ict_num_scales(step, self.total_steps)

    def _draw(self, probs: torch.Tensor, x0: torch.Tensor, generator, exclude=None) -> torch.Tensor:
        batch = x0.shape[0]
        p = probs.expand(batch, -1).clone()
        if exclude is not None:
            p[torch.arange(batch), exclude] = 0
        device = draw_device(generator, x0)
        u = torch.rand(batch, 1, generator=generator, device=device, dtype=torch.float64).cpu()
        cdf = p.cumsum(1)
        idx = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(1)
        return idx.clamp(max=probs.numel() - 1)

    def __call__(self, f, x0, *, step: int, generator=None, **cond):
        x0 = check_batch(x0)
        sigmas = karras_sigmas(self.num_scales(step), self.sigma_min, self.sigma_max, self.rho)
        probs = lognormal_index_probs(sigmas, self.p_mean, self.p_std)
        pair_probs = probs.clone()
        pair_probs[-1] = 0  # t = σ_{i+1} never equals σ_max
        i = self._draw(pair_probs / pair_probs.sum(), x0, generator)
        k = self._draw(probs, x0, generator, exclude=i + 1)  # s = σ_k ≠ t
        dev = x0.device
        t, r, s = sigmas[i + 1].to(dev), sigmas[i].to(dev), sigmas[k].to(dev)
        noise = randn_like(x0, generator)
        x_t = x0 + bcast(t, x0) * noise
        rng = SharedRandomness(dev)
        with torch.no_grad(), rng.replay():
            target = f(x0 + bcast(r, x0) * noise, r, **cond)
        with rng.replay():
            pred = f(x_t, t, **cond)
        with rng.replay():
            jumped = f(x_t, t, s, **cond)
        with rng.replay():
            pred_soft = frozen_call(f, jumped, s, **cond)

        w_ict = 1 / (t - r).abs().clamp_min(1e-20)
        w_soft = 1 / (s - t).abs().clamp_min(1e-20)
        loss_ict = w_ict.to(pred.dtype) * self.distance(pred, target.detach())
        loss_soft = w_soft.to(pred.dtype) * self.distance(pred_soft, target.detach())
        loss = loss_ict + self.soft_weight * loss_soft
        return loss, stats_of(
            num_scales=len(sigmas), sigma=t, sigma_end=s, loss_ict=loss_ict.detach(), loss_soft=loss_soft.detach()
        )

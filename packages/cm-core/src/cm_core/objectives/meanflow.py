"""MeanFlow (Geng et al. 2025, "Mean Flows for One-step Generative Modeling").

One network learns the average velocity u(z_t, r, t) = (z_t − z_r)/(t − r) of the flow-matching
PF-ODE z_t = (1 − t)·x + t·ε (:class:`cm_core.continuous.AverageVelocityFunction`). The MeanFlow
identity u = v − (t − r)·du/dt, with du/dt = v·∂_z u + ∂_t u (a JVP along (v, 0, 1) in (z, r, t)),
gives the target

    u_tgt = sg(v − (t − r)·du_θ/dt),  v = ε − x (the conditional velocity),
    loss  = sg(w)·‖u_θ(z_t, r, t) − u_tgt‖²,  w = 1/(‖Δ‖² + c)^p  (adaptive weighting; p = 1, c = 1e-3).

(t, r): two logit-normal draws (μ = −0.4, σ = 1.0), t the larger; r = t for a fraction
1 − ``ratio_r_neq_t`` (25 % of pairs have r ≠ t, the paper's default). One step from noise:
x = ε − u(ε, 0, 1); several along chosen times (the "meanflow" sampler).
"""

from __future__ import annotations

import torch

from ..continuous import flow_sigma
from ._common import check_batch, draw_device, randn_like, stats_of
from ._jvp import check_mode, jvp
from .base import Objective

__all__ = ["MeanFlow"]


class MeanFlow(Objective):
    function = "average-velocity"

    def __init__(self, ratio_r_neq_t: float = 0.25, p_mean: float = -0.4, p_std: float = 1.0,
                 adaptive_p: float = 1.0, adaptive_c: float = 1e-3, jvp: str = "exact", fd_eps: float = 1e-3):  # fmt: skip
        if not 0 <= ratio_r_neq_t <= 1:
            raise ValueError(f"ratio_r_neq_t must be in [0, 1], got {ratio_r_neq_t}")
        if not p_std > 0:
            raise ValueError(f"p_std must be > 0, got {p_std}")
        if adaptive_p < 0 or not adaptive_c > 0:
            raise ValueError(f"adaptive_p must be >= 0 and adaptive_c > 0, got {adaptive_p}, {adaptive_c}")
        self.ratio, self.p_mean, self.p_std = float(ratio_r_neq_t), float(p_mean), float(p_std)
        self.adaptive_p, self.adaptive_c = float(adaptive_p), float(adaptive_c)
        self.jvp_mode, self.fd_eps = check_mode(jvp, fd_eps)

    def draw_times(self, n: int, x: torch.Tensor, generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(r, t) [n] in x's dtype: logit-normal pairs, t >= r, r = t for 1 − ratio of them."""
        device = draw_device(generator, x)
        a = torch.sigmoid(self.p_mean + self.p_std * torch.randn(2, n, generator=generator, device=device, dtype=torch.float64))
        t, r = a.max(0).values, a.min(0).values
        keep = torch.rand(n, generator=generator, device=device, dtype=torch.float64) < self.ratio
        r = torch.where(keep, r, t)
        return r.to(x), t.to(x)

    def residual(self, u_fn, x0, e, r, t, **cond) -> tuple[torch.Tensor, torch.Tensor]:
        """(u_θ(z_t, r, t), u_tgt) for data x0, noise e and times (r, t) [B]; u_tgt without gradient."""
        col = (-1,) + (1,) * (x0.ndim - 1)
        z = (1 - t).view(col) * x0 + t.view(col) * e
        v = e - x0

        def fn(z_, r_, t_):
            return u_fn(z_, r_, t_, **cond)

        u, dudt = jvp(fn, (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t)), self.jvp_mode, self.fd_eps)
        return u, (v - (t - r).view(col) * dudt).detach()

    def __call__(self, u_fn, x0, *, step: int, generator=None, **cond):
        x0 = check_batch(x0)
        e = randn_like(x0, generator)
        r, t = self.draw_times(x0.shape[0], x0, generator)
        u, target = self.residual(u_fn, x0, e, r, t, **cond)
        err = (u.float() - target.float()).square().flatten(1).sum(1)
        weight = 1.0 / (err.detach() + self.adaptive_c) ** self.adaptive_p
        return weight * err, stats_of(sigma=flow_sigma(t.detach().double().clamp(max=1 - 1e-6)).float(),
                                      r_neq_t=(r != t).float(), raw_loss=err.detach())  # fmt: skip

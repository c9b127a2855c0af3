"""sCM: continuous-time consistency training (sCT) and distillation (sCD) on TrigFlow (Lu & Song,
"Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models", ICLR 2025).

The function is f(x_t, t) = cos t·x_t − sin t·σ_d·F_θ(x_t/σ_d, c_noise(t))
(:class:`cm_core.continuous.TrigFlowFunction`), x_t = cos t·x0 + sin t·z, z ~ N(0, σ_d²I). Per sample:

    σ = e^τ, τ ~ N(P_mean, P_std²), t = arctan(σ/σ_d)                    (the proposal of t)
    dx_t/dt = cos t·z − sin t·x0 (sCT)   or   the teacher's PF-ODE velocity (sCD; an EDM
              denoiser D converted exactly: (cos t·x_t − D(x_t/cos t, σ_d tan t))/sin t)
    F⁻, J  = jvp(F_θ⁻, (x_t, t), (s·dx_t/dt, s)),  s = cos t·sin t           (J = s·dF⁻/dt, total derivative)
    g      = cos²t·(dx_t/dt − σ_d·F⁻) − r·(s·x_t + σ_d·J)                   (= cos t·df⁻/dt at r = 1)
    g      ← g / (‖g‖ + c)                                                   (tangent normalization, c = 0.1)
    loss   = e^{w_φ(t)}/D · ‖F_θ − F⁻ − g‖² − w_φ(t)                          (adaptive weighting head w_φ)

r = min(1, step/H) is the tangent warm-up (H = 10,000 in the paper); θ⁻ is the stop-gradient of θ
(no EMA target); w_φ is a small network on t (an "extra module" the trainer optimizes with the
network). With the exact consistency function and the exact velocity, df⁻/dt = 0 and g vanishes.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..continuous import TrigFlowVelocity
from ._common import SharedRandomness, check_batch, draw_device, randn_like, stats_of
from ._jvp import check_mode, jvp
from .base import Objective

__all__ = ["AdaptiveWeight", "SCT", "SCD"]


class AdaptiveWeight(nn.Module):
    """w_φ(t): a linear layer on Fourier features of t (sin/cos of t·2^k, k = 0 … 7), zero-initialized."""

    def __init__(self, features: int = 8):
        super().__init__()
        self.register_buffer("freqs", 2.0 ** torch.arange(features, dtype=torch.float32), persistent=False)
        self.linear = nn.Linear(2 * features, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        a = t.float()[:, None] * self.freqs[None]
        return self.linear(torch.cat([a.sin(), a.cos()], dim=1))[:, 0]


class _SCM(Objective):
    function = "trigflow"

    def __init__(self, sigma_data: float = 0.5, p_mean: float = -1.0, p_std: float = 1.4, tangent_warmup: int = 10000,
                 tangent_norm_c: float = 0.1, adaptive_weighting: bool = True, jvp: str = "exact",
                 fd_eps: float = 1e-3):  # fmt: skip
        if not sigma_data > 0 or not p_std > 0:
            raise ValueError(f"sigma_data and p_std must be > 0, got {sigma_data}, {p_std}")
        if tangent_warmup < 0 or tangent_norm_c < 0:
            raise ValueError(f"tangent_warmup and tangent_norm_c must be >= 0, got {tangent_warmup}, {tangent_norm_c}")
        self.sigma_data, self.p_mean, self.p_std = float(sigma_data), float(p_mean), float(p_std)
        self.warmup, self.norm_c = int(tangent_warmup), float(tangent_norm_c)
        self.jvp_mode, self.fd_eps = check_mode(jvp, fd_eps)
        self.weighting = AdaptiveWeight() if adaptive_weighting else None

    def extra_modules(self) -> dict[str, nn.Module]:
        return {"weighting": self.weighting} if self.weighting is not None else {}

    def warmup_ratio(self, step: int) -> float:
        return 1.0 if self.warmup == 0 else min(1.0, step / self.warmup)

    def draw_t(self, n: int, x: torch.Tensor, generator) -> torch.Tensor:
        device = draw_device(generator, x)
        tau = self.p_mean + self.p_std * torch.randn(n, generator=generator, device=device, dtype=torch.float64)
        return torch.atan(tau.exp() / self.sigma_data).to(x)

    def velocity(self, x_t, t, x0, z, **cond) -> torch.Tensor:
        raise NotImplementedError

    def tangent(self, f, x_t, t, dxdt, r: float, **cond) -> tuple[torch.Tensor, torch.Tensor]:
        """(F⁻, g before normalization) at (x_t, t) along dx_t/dt, without gradients."""
        col = (-1,) + (1,) * (x_t.ndim - 1)
        cos, sin = torch.cos(t).view(col), torch.sin(t).view(col)
        s = (torch.cos(t) * torch.sin(t)).detach()

        def F(x_, t_):
            return f.F(x_, t_, **cond)

        with torch.no_grad():
            F_minus, J = jvp(F, (x_t, t), (s.view(col) * dxdt, s), self.jvp_mode, self.fd_eps)
        sd = self.sigma_data
        g = cos**2 * (dxdt - sd * F_minus) - r * (cos * sin * x_t + sd * J)
        return F_minus.detach(), g.detach()

    def __call__(self, f, x0, *, step: int, generator=None, **cond):
        x0 = check_batch(x0)
        b = x0.shape[0]
        t = self.draw_t(b, x0, generator)
        z = randn_like(x0, generator) * self.sigma_data
        col = (-1,) + (1,) * (x0.ndim - 1)
        x_t = torch.cos(t).view(col) * x0 + torch.sin(t).view(col) * z
        dxdt = self.velocity(x_t, t, x0, z, **cond).detach()
        r = self.warmup_ratio(step)
        rng = SharedRandomness(x0.device)  # F_θ and F⁻ see the same dropout masks
        with rng.replay():
            F_minus, g = self.tangent(f, x_t, t, dxdt, r, **cond)
        gnorm = g.flatten(1).norm(dim=1).view(col)
        g = g / (gnorm + self.norm_c)
        with rng.replay():
            F = f.F(x_t, t, **cond)
        d = x0[0].numel()
        sq = (F.float() - F_minus.float() - g.float()).square().flatten(1).sum(1)
        if self.weighting is not None:
            w = self.weighting(t)
            loss = torch.exp(w) / d * sq - w
        else:
            w = torch.zeros_like(sq)
            loss = sq / d
        return loss, stats_of(sigma=self.sigma_data * torch.tan(t.detach()).double().clamp(max=1e6).float(),
                              tangent_norm=gnorm.flatten(), warmup=r, weight=w.detach())  # fmt: skip


class SCT(_SCM):
    """sCT: the tangent from the data pair, dx_t/dt = cos t·z − sin t·x0."""

    def velocity(self, x_t, t, x0, z, **cond):
        col = (-1,) + (1,) * (x0.ndim - 1)
        return torch.cos(t).view(col) * z - torch.sin(t).view(col) * x0


class SCD(_SCM):
    """sCD: the tangent from a pretrained diffusion teacher, given as an EDM denoiser D(x, σ) (e.g.
    cm_core.EDMDenoiser over an EDM checkpoint, or GaussianMixture.denoise), converted exactly."""

    needs_teacher = True

    def __init__(self, teacher, sigma_data: float = 0.5, p_mean: float = -1.0, p_std: float = 1.4,
                 tangent_warmup: int = 10000, tangent_norm_c: float = 0.1, adaptive_weighting: bool = True,
                 jvp: str = "exact", fd_eps: float = 1e-3):  # fmt: skip
        super().__init__(sigma_data, p_mean, p_std, tangent_warmup, tangent_norm_c, adaptive_weighting, jvp, fd_eps)
        self.teacher = teacher
        self.teacher_velocity = TrigFlowVelocity(teacher, self.sigma_data)

    def velocity(self, x_t, t, x0, z, **cond):
        with torch.no_grad():
            return self.teacher_velocity(x_t, t.clamp(min=1e-6, max=math.pi / 2 - 1e-6), **cond)

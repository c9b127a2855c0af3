"""Continuous-time parameterizations and their exact conversions to EDM's σ: TrigFlow (sCM; Lu &
Song, ICLR 2025) and flow matching (rectified flow; MeanFlow, Geng et al. 2025).

TrigFlow:  x_t = cos t·x0 + sin t·z, z ~ N(0, σ_d²I), t ∈ [0, π/2]. With σ = σ_d·tan t, x_t/cos t is
           EDM's x_σ = x0 + σ·ε, so an EDM denoiser D(x, σ) gives the PF-ODE velocity
           dx_t/dt = (cos t·x_t − D(x_t/cos t, σ_d tan t)) / sin t,
           and sCM's consistency function is f(x_t, t) = cos t·x_t − sin t·σ_d·F(x_t/σ_d, c_noise(t)).
Flow matching: z_t = (1 − t)·x + t·ε, t ∈ [0, 1]. With σ = t/(1 − t), z_t/(1 − t) = x_σ, so
           v(z_t, t) = dz_t/dt = (z_t − D(z_t/(1 − t), t/(1 − t))) / t, and MeanFlow's average velocity
           u(z_t, r, t) = (z_t − z_r)/(t − r) (= v at r = t) is what one network learns.

Time inputs to the networks: TrigFlow passes c_noise(t) = t ("trig", sCM's choice with positional
embeddings) or EDM's log(σ)/4 ("edm"); MeanFlow passes t as c_noise and t − r as the second time
input ``c_noise_end`` (cm-nets' BCM end-time embedding; MeanFlow's (t, t − r) conditioning).
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = [
    "HALF_PI",
    "trigflow_sigma",
    "trigflow_time",
    "flow_sigma",
    "flow_time",
    "check_trigflow_time",
    "check_flow_times",
    "SLACK",
    "TrigFlowFunction",
    "TrigFlowVelocity",
    "AverageVelocityFunction",
    "FlowVelocity",
    "sigma_consistency",
]

HALF_PI = math.pi / 2


def _t(t, x: torch.Tensor) -> torch.Tensor:
    """Per-sample times [B] in x's dtype and device (a scalar is broadcast)."""
    t = torch.as_tensor(t, dtype=x.dtype if x.is_floating_point() else torch.float64, device=x.device)
    return t.expand(x.shape[0]) if t.ndim == 0 else t


def _col(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(v.shape + (1,) * (like.ndim - v.ndim))


def trigflow_sigma(t, sigma_data: float = 0.5):
    """EDM's σ = σ_d·tan t of TrigFlow time t."""
    return sigma_data * torch.tan(torch.as_tensor(t, dtype=torch.float64))


def trigflow_time(sigma, sigma_data: float = 0.5):
    """TrigFlow time t = arctan(σ/σ_d) of EDM's σ."""
    return torch.atan(torch.as_tensor(sigma, dtype=torch.float64) / sigma_data)


def flow_sigma(t):
    """EDM's σ = t/(1 − t) of flow-matching time t."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return t / (1 - t)


def flow_time(sigma):
    """Flow-matching time t = σ/(1 + σ) of EDM's σ."""
    s = torch.as_tensor(sigma, dtype=torch.float64)
    return s / (1 + s)


# The functions accept times this far outside their range: a finite-difference JVP probes t ± ε.
SLACK = 1e-2


def check_trigflow_time(t, name: str = "t", slack: float = 1e-6) -> torch.Tensor:
    """``t`` as a tensor, refusing values outside [0, π/2] (± ``slack``), naming the argument."""
    t = torch.as_tensor(t)
    ok = torch.isfinite(t) & (t >= -slack) & (t <= HALF_PI + slack)
    if not bool(ok.all()):
        raise ValueError(f"{name} must lie in [0, π/2] (TrigFlow time), got {t[~ok].flatten()[0].item()}")
    return t


def check_flow_times(r, t, slack: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(r, t) as tensors, refusing times outside [0, 1] or r > t (± ``slack``), naming the argument."""
    r, t = torch.as_tensor(r), torch.as_tensor(t)
    for name, v in (("t", t), ("r", r)):
        ok = torch.isfinite(v) & (v >= -slack) & (v <= 1 + slack)
        if not bool(ok.all()):
            raise ValueError(f"{name} must lie in [0, 1] (flow-matching time), got {v[~ok].flatten()[0].item()}")
    if bool((r > t + slack).any()):
        raise ValueError("r must be <= t (MeanFlow's average velocity runs from the later time t to r)")
    return r, t


class TrigFlowFunction(nn.Module):
    """sCM's consistency function f(x_t, t) = cos t·x_t − sin t·σ_d·F(x_t/σ_d, c_noise(t)), with
    f(x, 0) = x exactly. :meth:`F` is sCM's F_θ.

    ``c_noise="trig"``: F = net(x_t/σ_d, t) (sCM's choice). ``c_noise="edm"``: the network is read
    as EDM's raw network F_edm with EDM's inputs, which TrigFlow's coincide with (c_in(σ)·x_σ =
    x_t/σ_d, c_noise = log(σ)/4 at σ = σ_d tan t), and F = −F_edm: TrigFlow's velocity is −σ_d·F_edm,
    so a network initialized from an EDM checkpoint starts at f(x_t, t) = D(x_t/cos t, σ_d tan t)
    exactly (the teacher's one-step denoised estimate).
    """

    def __init__(self, net: nn.Module, sigma_data: float = 0.5, c_noise: str = "trig", sigma_max: float = 80.0):
        super().__init__()
        if c_noise not in ("trig", "edm"):
            raise ValueError(f"c_noise must be 'trig' (c = t) or 'edm' (log(σ_d tan t)/4), got {c_noise!r}")
        self.net, self.sigma_data, self.c_noise_kind = net, float(sigma_data), c_noise
        self.sigma_max = float(sigma_max)

    def c_noise(self, t: torch.Tensor) -> torch.Tensor:
        """"trig": t. "edm": log(σ)/4 with σ = σ_d·tan t held at σ_max (80, EDM's) above it: an EDM
        network never saw larger σ, and at t = π/2 (σ = ∞, where sampling starts) x_t/σ_d is pure noise."""
        if self.c_noise_kind == "trig":
            return t
        sigma = (self.sigma_data * torch.tan(t)).clamp(1e-20, self.sigma_max)
        return torch.log(sigma) / 4

    def F(self, x_t: torch.Tensor, t, **cond) -> torch.Tensor:
        """F_θ(x_t/σ_d, c_noise(t)): the network on the scaled input."""
        t = _t(t, x_t)
        out = self.net(x_t / self.sigma_data, self.c_noise(t), **cond)
        return -out if self.c_noise_kind == "edm" else out

    def forward(self, x_t: torch.Tensor, t, **cond) -> torch.Tensor:
        t = check_trigflow_time(_t(t, x_t), "t", SLACK)
        c, s = _col(torch.cos(t), x_t), _col(torch.sin(t), x_t)
        return c * x_t - s * self.sigma_data * self.F(x_t, t, **cond)


class TrigFlowVelocity(nn.Module):
    """The TrigFlow PF-ODE velocity dx_t/dt of an EDM denoiser D(x, σ) (e.g. cm_core.EDMDenoiser or
    GaussianMixture.denoise): (cos t·x_t − D(x_t/cos t, σ_d tan t))/sin t; sCD's teacher. t ∈ (0, π/2)."""

    def __init__(self, denoiser, sigma_data: float = 0.5):
        super().__init__()
        self.denoiser, self.sigma_data = denoiser, float(sigma_data)

    def forward(self, x_t: torch.Tensor, t, **cond) -> torch.Tensor:
        t = _t(t, x_t)
        c, s = _col(torch.cos(t), x_t), _col(torch.sin(t), x_t)
        sigma = self.sigma_data * torch.tan(t)
        return (c * x_t - self.denoiser(x_t / c, sigma, **cond)) / s


class FlowVelocity(nn.Module):
    """The flow-matching PF-ODE velocity dz_t/dt of an EDM denoiser: (z_t − D(z_t/(1 − t), t/(1 − t)))/t."""

    def __init__(self, denoiser):
        super().__init__()
        self.denoiser = denoiser

    def forward(self, z: torch.Tensor, t, **cond) -> torch.Tensor:
        t = _t(t, z)
        tc = _col(t, z)
        return (z - self.denoiser(z / (1 - tc), t / (1 - t), **cond)) / tc


class AverageVelocityFunction(nn.Module):
    """MeanFlow's u(z_t, r, t) = net(z_t, c_noise = t, c_noise_end = t − r): the average velocity over
    [r, t]; one step from noise is x = ε − u(ε, 0, 1), and z_r = z_t − (t − r)·u(z_t, r, t)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        if getattr(net, "bcm", None) is False:
            raise ValueError(
                "MeanFlow's average velocity needs a network with a second time input: build it with bcm=True "
                "(model.overrides = {bcm = true}: the end-time embedding carries t − r)"
            )
        self.net = net

    def forward(self, z: torch.Tensor, r, t, **cond) -> torch.Tensor:
        r, t = check_flow_times(_t(r, z), _t(t, z), SLACK)
        return self.net(z, t, c_noise_end=t - r, **cond)


class _SigmaConsistency(nn.Module):
    """A continuous-time model as a consistency function of EDM's σ, f(x_σ, σ) (the editors and the
    σ-based samplers take it): TrigFlow at t = arctan(σ/σ_d) on x_t = cos t·x_σ; MeanFlow's one jump
    to r = 0 at t = σ/(1 + σ) on z_t = (1 − t)·x_σ. Exact re-parameterizations, no approximation."""

    def __init__(self, f: nn.Module):
        super().__init__()
        self.f = f

    def forward(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        s = s.expand(x.shape[0]) if s.ndim == 0 else s
        if isinstance(self.f, TrigFlowFunction):
            t = torch.atan(s / self.f.sigma_data)
            return self.f(_col(torch.cos(t), x) * x, t, **cond)
        t = s / (1 + s)
        z = _col(1 - t, x) * x
        return z - _col(t, x) * self.f(z, torch.zeros_like(t), t, **cond)


def sigma_consistency(f: nn.Module) -> nn.Module:
    """``f`` as a consistency function f(x_σ, σ) of EDM's σ: TrigFlow and MeanFlow functions are
    re-parameterized exactly; any other function is returned as it is."""
    if isinstance(f, (TrigFlowFunction, AverageVelocityFunction)):
        return _SigmaConsistency(f)
    return f

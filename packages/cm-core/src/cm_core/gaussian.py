"""Exact ground truth: a mixture of isotropic Gaussians in R^d under the EDM forward process.

x_σ = x_0 + σ·n with x_0 ~ Σ_k w_k N(m_k, s_k² I). Every quantity a consistency model
approximates is known here: the denoiser E[x_0 | x_σ], the score, the PF-ODE velocity
dx/dσ = (x − D(x, σ))/σ, its flow between any two noise levels, and so the exact consistency
function. Used as a toy dataset and as the oracle of the test suite.
"""

from __future__ import annotations

import math

import torch

from . import _validate as check

__all__ = ["GaussianMixture"]


class GaussianMixture:
    """Σ_k w_k N(m_k, s_k² I) in R^d; all computations in float64.

    Args:
        means: [K, d] component means.
        stds: [K] (or a scalar) component standard deviations s_k > 0.
        weights: [K] non-negative weights (normalized here); default uniform.
    """

    def __init__(self, means, stds, weights=None, *, tol: float = 1e-9):
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim == 1:
            means = means[None]
        if means.ndim != 2 or means.shape[0] == 0 or means.shape[1] == 0:
            raise ValueError(f"means must have shape [K, d] with K, d >= 1, got {tuple(means.shape)}")
        k = means.shape[0]
        stds = torch.as_tensor(stds, dtype=torch.float64)
        if stds.ndim == 0:
            stds = stds.expand(k).clone()
        if stds.shape != (k,):
            raise ValueError(f"stds must be a scalar or have shape [K] = [{k}], got {tuple(stds.shape)}")
        if not torch.isfinite(stds).all() or (stds <= 0).any():
            raise ValueError(f"stds must be finite and > 0, got {stds.tolist()}")
        if weights is None:
            weights = torch.full((k,), 1.0 / k, dtype=torch.float64)
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (k,):
            raise ValueError(f"weights must have shape [K] = [{k}], got {tuple(weights.shape)}")
        if not torch.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"weights must be finite, >= 0 and not all zero, got {weights.tolist()}")
        self.means, self.stds, self.weights = means, stds, weights / weights.sum()
        # Local error tolerance of the mixture flow integrator (relative to 1 + |x|).
        self.tol = check.positive("tol", tol)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    # ---- sampling -------------------------------------------------------------------------
    def sample(self, n: int, generator=None, *, return_labels: bool = False):
        """n data samples [n, d] (and their component labels if asked)."""
        n = check.integer_at_least("n", n, 1)
        labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x = self.means[labels] + self.stds[labels, None] * noise
        return (x, labels) if return_labels else x

    def sample_marginal(self, n: int, sigma: float, generator=None) -> torch.Tensor:
        """Exact samples of x_σ = x_0 + σ·n."""
        sigma = check.non_negative("sigma", sigma)
        x0 = self.sample(n, generator)
        return x0 + sigma * torch.randn(x0.shape, generator=generator, dtype=torch.float64)

    def marginal_moments(self, sigma: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean [d] and covariance [d, d] of x_σ."""
        sigma = check.non_negative("sigma", sigma)
        var = self.stds**2 + sigma**2
        mean = self.weights @ self.means
        second = torch.einsum("k,ki,kj->ij", self.weights, self.means, self.means)
        second = second + (self.weights @ var) * torch.eye(self.dim, dtype=torch.float64)
        return mean, second - torch.outer(mean, mean)

    # ---- the exact functions --------------------------------------------------------------
    def _prep(self, x, sigma):
        x = torch.as_tensor(x)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape [B, {self.dim}], got {tuple(x.shape)}")
        out_dtype = x.dtype if x.is_floating_point() else torch.float64
        x64 = x.to(torch.float64)
        s = check.sigma_tensor("sigma", sigma).to(device=x.device, dtype=torch.float64)
        if s.ndim == 0:
            s = s.expand(x.shape[0])
        if s.shape != (x.shape[0],):
            raise ValueError(f"sigma must be a scalar or have shape [B] = [{x.shape[0]}], got {tuple(s.shape)}")
        return x64, s, out_dtype

    def _posterior(self, x64: torch.Tensor, s: torch.Tensor):
        """Responsibilities r [B, K] and per-component variances v [B, K] of x_σ."""
        means, stds, weights = (t.to(x64.device) for t in (self.means, self.stds, self.weights))
        var = stds[None] ** 2 + s[:, None] ** 2
        sq = (x64[:, None, :] - means[None]).square().sum(-1)
        logits = weights.log()[None] - 0.5 * self.dim * torch.log(2 * math.pi * var) - sq / (2 * var)
        return torch.softmax(logits, dim=1), var, means, stds

    def log_prob(self, x, sigma=0.0) -> torch.Tensor:
        """log p_σ(x) [B]."""
        x64, s, _ = self._prep(x, sigma)
        means = self.means.to(x64.device)
        var = self.stds.to(x64.device)[None] ** 2 + s[:, None] ** 2
        sq = (x64[:, None, :] - means[None]).square().sum(-1)
        logits = (
            self.weights.to(x64.device).log()[None] - 0.5 * self.dim * torch.log(2 * math.pi * var) - sq / (2 * var)
        )
        return torch.logsumexp(logits, dim=1)

    def denoise(self, x, sigma) -> torch.Tensor:
        """The exact denoiser D(x, σ) = E[x_0 | x_σ = x]."""
        x64, s, dtype = self._prep(x, sigma)
        r, var, means, stds = self._posterior(x64, s)
        gain = stds[None] ** 2 / var  # [B, K]: posterior mean of component k is m_k + gain·(x − m_k)
        d = torch.einsum("bk,kd->bd", r * (1 - gain), means) + (r * gain).sum(1, keepdim=True) * x64
        return d.to(dtype)

    def score(self, x, sigma) -> torch.Tensor:
        """∇_x log p_σ(x) = Σ_k r_k (m_k − x)/v_k (finite at σ = 0 since s_k > 0)."""
        x64, s, dtype = self._prep(x, sigma)
        return self._score64(x64, s).to(dtype)

    def _score64(self, x64, s):
        r, var, means, _ = self._posterior(x64, s)
        w = r / var
        return torch.einsum("bk,kd->bd", w, means) - w.sum(1, keepdim=True) * x64

    def velocity(self, x, sigma) -> torch.Tensor:
        """PF-ODE velocity dx/dσ = −σ·∇log p_σ(x) = (x − D(x, σ))/σ (EDM eq. 4 with σ(t) = t)."""
        x64, s, dtype = self._prep(x, sigma)
        return (-s[:, None] * self._score64(x64, s)).to(dtype)

    def flow(self, x, sigma_from, sigma_to, *, tol: float | None = None) -> torch.Tensor:
        """The exact PF-ODE map x_{σ_from} ↦ x_{σ_to} (either direction; scalars or per-sample [B]).

        One component: closed form x_to = m + √((s² + σ_to²)/(s² + σ_from²))·(x − m).
        Mixtures: adaptive Dormand–Prince 5(4) in u = ln σ (dx/du = −σ²·score, smooth in u) with
        relative tolerance ``tol`` (default: the mixture's own ``tol``).
        """
        x64, s_from, dtype = self._prep(x, sigma_from)
        _, s_to, _ = self._prep(x, sigma_to)
        tol = self.tol if tol is None else check.positive("tol", tol)
        if self.num_components == 1:
            m, s2 = self.means[0].to(x64.device), self.stds[0].item() ** 2
            ratio = ((s2 + s_to**2) / (s2 + s_from**2)).sqrt()[:, None]
            return (m + ratio * (x64 - m)).to(dtype)
        if (s_from <= 0).any() or (s_to <= 0).any():
            raise ValueError("flow of a mixture needs σ > 0 at both ends (it integrates in ln σ)")
        return self._integrate(x64, s_from.log(), s_to.log(), tol).to(dtype)

    # Dormand–Prince 5(4) tableau (Dormand & Prince 1980).
    _A = (
        (),
        (1 / 5,),
        (3 / 40, 9 / 40),
        (44 / 45, -56 / 15, 32 / 9),
        (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
        (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
        (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
    )
    _C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
    _B5 = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
    _B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)

    def _integrate(self, y, u0, u1, tol):
        """Adaptive Dormand–Prince in normalized time τ ∈ [0, 1], u = u0 + τ·(u1 − u0).

        All samples share the τ steps; the error of the worst sample controls the step size.
        """
        span = (u1 - u0)[:, None]
        if span.abs().max() == 0:
            return y

        def rate(yy, tau):
            u = u0 + tau * (u1 - u0)
            s = u.exp()
            return span * (-(s**2)[:, None] * self._score64(yy, s))

        tau, h = 0.0, min(0.05, 1.0)
        k_first = rate(y, torch.zeros_like(u0))
        while tau < 1.0:
            h = min(h, 1.0 - tau)
            ks = [k_first]
            for i in range(1, 7):
                yi = y + h * sum(a * k for a, k in zip(self._A[i], ks) if a != 0.0)
                ks.append(rate(yi, torch.full_like(u0, tau + self._C[i] * h)))
            y5 = y + h * sum(b * k for b, k in zip(self._B5, ks) if b != 0.0)
            y4 = y + h * sum(b * k for b, k in zip(self._B4, ks) if b != 0.0)
            scale = tol * (1 + torch.maximum(y.abs(), y5.abs()))
            err = ((y5 - y4) / scale).square().mean(1).sqrt().max().item()
            if err <= 1.0:
                tau, y, k_first = tau + h, y5, ks[6]
            h = h * min(5.0, max(0.2, 0.9 * max(err, 1e-16) ** -0.2))
            if h < 1e-12:
                raise RuntimeError("the PF-ODE integrator's step size collapsed; the mixture may be degenerate")
        return y

    def consistency(self, x, sigma, sigma_min: float = 0.002) -> torch.Tensor:
        """The exact consistency function f*(x, σ) = flow(x, σ → σ_min)."""
        return self.flow(x, sigma, check.non_negative("sigma_min", sigma_min))

    def inverse_consistency(self, x, sigma, sigma_min: float = 0.002) -> torch.Tensor:
        """Its inverse: flow(x, σ_min → σ)."""
        return self.flow(x, check.non_negative("sigma_min", sigma_min), sigma)

    # ---- the continuous-time parameterizations (cm_core.continuous) --------------------------
    _TINY_SIGMA = 1e-12  # a mixture's flow integrates in ln σ: σ = 0 is taken as this

    def _flow_to(self, x, s_from, s_to):
        if self.num_components > 1:
            s_from, s_to = (torch.as_tensor(s, dtype=torch.float64).clamp_min(self._TINY_SIGMA) for s in (s_from, s_to))
        return self.flow(x, s_from, s_to)

    @staticmethod
    def _times(t, x, name: str, low: float, high: float, open_high: bool) -> torch.Tensor:
        x = torch.as_tensor(x)
        t = torch.as_tensor(t, dtype=torch.float64, device=x.device)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        bad = (t < low) | ((t >= high) if open_high else (t > high)) | ~torch.isfinite(t)
        if bool(bad.any()):
            end = ")" if open_high else "]"
            raise ValueError(f"{name} must lie in [{low:g}, {high:g}{end}, got {t[bad][0].item()}")
        return t

    def trigflow_flow(self, x, t_from, t_to, sigma_data: float = 0.5) -> torch.Tensor:
        """The exact TrigFlow PF-ODE map x_{t_from} ↦ x_{t_to} (t ∈ [0, π/2)): EDM's flow of x/cos t
        between σ = σ_d·tan t, scaled back by cos t."""
        a = self._times(t_from, x, "t_from", 0.0, math.pi / 2, True)
        b = self._times(t_to, x, "t_to", 0.0, math.pi / 2, True)
        x = torch.as_tensor(x)
        out = self._flow_to(x.to(torch.float64) / torch.cos(a)[:, None], sigma_data * torch.tan(a), sigma_data * torch.tan(b))
        return (out * torch.cos(b)[:, None]).to(x.dtype if x.is_floating_point() else torch.float64)

    def trigflow_consistency(self, x, t, sigma_data: float = 0.5) -> torch.Tensor:
        """The exact TrigFlow consistency function f*(x_t, t) = the PF-ODE solution at t = 0."""
        return self.trigflow_flow(x, t, 0.0, sigma_data)

    def trigflow_velocity(self, x, t, sigma_data: float = 0.5) -> torch.Tensor:
        """The exact TrigFlow velocity dx_t/dt = (cos t·x_t − D(x_t/cos t, σ_d tan t))/sin t, t ∈ (0, π/2)."""
        t = self._times(t, x, "t", 0.0, math.pi / 2, True)
        if bool((t == 0).any()):
            raise ValueError("t must be > 0 for the TrigFlow velocity (it divides by sin t)")
        x = torch.as_tensor(x)
        x64 = x.to(torch.float64)
        c, s = torch.cos(t)[:, None], torch.sin(t)[:, None]
        d = self.denoise(x64 / c, sigma_data * torch.tan(t))
        return ((c * x64 - d) / s).to(x.dtype if x.is_floating_point() else torch.float64)

    def flow_matching_flow(self, z, t, r) -> torch.Tensor:
        """The exact flow-matching PF-ODE map z_t ↦ z_r (times in [0, 1)): (1 − r)·EDM's flow of
        z/(1 − t) from σ = t/(1 − t) to r/(1 − r)."""
        t = self._times(t, z, "t", 0.0, 1.0, True)
        r = self._times(r, z, "r", 0.0, 1.0, True)
        z = torch.as_tensor(z)
        out = self._flow_to(z.to(torch.float64) / (1 - t)[:, None], t / (1 - t), r / (1 - r))
        return (out * (1 - r)[:, None]).to(z.dtype if z.is_floating_point() else torch.float64)

    def flow_matching_velocity(self, z, t) -> torch.Tensor:
        """The exact instantaneous velocity v(z_t, t) = (z_t − D(z_t/(1 − t), t/(1 − t)))/t, t ∈ (0, 1)."""
        t = self._times(t, z, "t", 0.0, 1.0, True)
        if bool((t == 0).any()):
            raise ValueError("t must be > 0 for the flow-matching velocity (it divides by t)")
        z = torch.as_tensor(z)
        z64 = z.to(torch.float64)
        d = self.denoise(z64 / (1 - t)[:, None], t / (1 - t))
        return ((z64 - d) / t[:, None]).to(z.dtype if z.is_floating_point() else torch.float64)

    def average_velocity(self, z, r, t) -> torch.Tensor:
        """MeanFlow's exact average velocity u(z_t, r, t) = (z_t − z_r)/(t − r) over the PF-ODE
        (the instantaneous velocity where r = t); 0 <= r <= t < 1."""
        t = self._times(t, z, "t", 0.0, 1.0, True)
        r = self._times(r, z, "r", 0.0, 1.0, True)
        if bool((r > t).any()):
            raise ValueError("r must be <= t (the average velocity runs from the later time t to r)")
        z = torch.as_tensor(z)
        z64 = z.to(torch.float64)
        same = r == t
        out = torch.empty_like(z64)
        if bool(same.any()):
            out[same] = self.flow_matching_velocity(z64[same], t[same])
        if bool((~same).any()):
            zr = self.flow_matching_flow(z64[~same], t[~same], r[~same])
            out[~same] = (z64[~same] - zr) / (t[~same] - r[~same])[:, None]
        return out.to(z.dtype if z.is_floating_point() else torch.float64)

    # ---- adapters with the signatures the samplers and objectives expect ---------------------
    def as_denoiser(self):
        """A callable D(x, σ, **cond) for solvers and distillation objectives."""
        return lambda x, sigma, **cond: self.denoise(x, sigma)

    def as_consistency_function(self, sigma_min: float = 0.002):
        """A callable f(x, σ, **cond) = exact consistency function, for the samplers."""
        return lambda x, sigma, **cond: self.consistency(x, sigma, sigma_min)

    def as_bidirectional_function(self, sigma_min: float = 0.002):
        """A callable f(x, σ, σ_end=σ_min) = exact PF-ODE jump, for the BCM samplers."""

        def f(x, sigma, sigma_end=None, **cond):
            return self.flow(x, sigma, sigma_min if sigma_end is None else sigma_end)

        return f

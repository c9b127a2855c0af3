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

"""Noise-level grids and discretization curricula.

Conventions: σ grids are ascending (index 0 = σ_min), as in the iCT/BCM code; the openai
code indexes from σ_max down. ``step`` is the optimizer step k, ``total_steps`` is K.
"""

from __future__ import annotations

import math

import torch

from . import _validate as check

__all__ = [
    "karras_sigmas",
    "rho_grid",
    "edm_sampling_sigmas",
    "ct_num_scales",
    "ict_num_scales",
    "ect_stage",
    "ect_r",
    "ECT_Q_CIFAR10",
    "ECT_Q_IMAGENET",
]


def karras_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """The Karras et al. (2022) grid, ascending, float64, length ``n``.

    σ_i = (σ_min^{1/ρ} + i/(n−1)·(σ_max^{1/ρ} − σ_min^{1/ρ}))^ρ  (EDM eq. 5, reversed).
    """
    n = check.integer_at_least("n", n, 2)
    sigma_min, sigma_max = check.sigma_range(sigma_min, sigma_max)
    rho = check.positive("rho", rho)
    ramp = torch.arange(n, dtype=torch.float64) / (n - 1)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (lo + ramp * (hi - lo)) ** rho
    # Pin the ends: the boundary condition f(x, σ_min) = x needs σ_0 == σ_min exactly.
    sigmas[0], sigmas[-1] = sigma_min, sigma_max
    return sigmas


def rho_grid(start: torch.Tensor, end, num: int, rho: float = 7.0) -> torch.Tensor:
    """Per-sample ρ-spaced grids, float64 [B, num], from ``start`` [B] to ``end`` (a number or [B]),
    both included: (s^{1/ρ} + u·(e^{1/ρ} − s^{1/ρ}))^ρ for u = 0 … 1 — EDM's spacing of solver
    steps (eq. 5) between two noise levels of each sample (Direct CM's teacher solve, CDM's chains)."""
    num = check.integer_at_least("num", num, 2)
    ramp = torch.linspace(0, 1, num, dtype=torch.float64, device=start.device)
    a = start.to(torch.float64) ** (1 / rho)
    b = end ** (1 / rho)
    b = b[:, None] if torch.is_tensor(b) else b
    return (a[:, None] + ramp[None] * (b - a[:, None])) ** rho


def edm_sampling_sigmas(
    num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0
) -> torch.Tensor:
    """EDM's sampler time steps: descending Karras grid of ``num_steps`` values plus a final 0."""
    sigmas = karras_sigmas(num_steps, sigma_min, sigma_max, rho).flip(0)
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def ct_num_scales(step: int, total_steps: int, s0: int = 2, s1: int = 150) -> int:
    """N(k) of consistency training (Song et al. 2023, Appendix C; eq. for N(k)).

    N(k) = ⌈√(k/K·((s1+1)² − s0²) + s0²) − 1⌉ + 1, growing from s0 at k=0 to s1+1 at k=K.
    ImageNet-64 uses s0=2, s1=200; CIFAR-10 s0=2, s1=150.
    """
    step = check.integer_at_least("step", step, 0)
    total_steps = check.integer_at_least("total_steps", total_steps, 1)
    s0 = check.integer_at_least("s0", s0, 1)
    s1 = check.integer_at_least("s1", s1, s0)
    frac = min(step, total_steps) / total_steps
    value = math.sqrt(frac * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1
    # Guard against 2.0000000001 − 1 rounding up: round to 12 digits before the ceiling.
    return int(math.ceil(round(value, 12))) + 1


def ict_num_scales(step: int, total_steps: int, s0: int = 10, s1: int = 1280) -> int:
    """N(k) of improved consistency training (Song & Dhariwal 2023, eq. 8).

    K' = ⌊K / (log2(s1/s0) + 1)⌋, N(k) = min(s0·2^⌊k/K'⌋, s1) + 1.
    With K = 800k: N = 11, 21, 41, …, 1281.
    """
    step = check.integer_at_least("step", step, 0)
    total_steps = check.integer_at_least("total_steps", total_steps, 1)
    s0 = check.integer_at_least("s0", s0, 1)
    s1 = check.integer_at_least("s1", s1, s0)
    k_prime = math.floor(total_steps / (math.log2(s1 / s0) + 1))
    if k_prime < 1:
        raise ValueError(
            f"total_steps={total_steps} is too small for the iCT curriculum s0={s0}, s1={s1}: "
            f"it needs at least {math.ceil(math.log2(s1 / s0) + 1)} steps"
        )
    doublings = min(step // k_prime, 62)
    return min(s0 * 2**doublings, s1) + 1


ECT_Q_CIFAR10 = 2.0
ECT_Q_IMAGENET = 4.0


def ect_stage(step: int, double_steps: int) -> int:
    """ECT's stage counter: Δt shrinks by a factor q every ``double_steps`` steps."""
    step = check.integer_at_least("step", step, 0)
    double_steps = check.integer_at_least("double_steps", double_steps, 1)
    return step // double_steps


def ect_r(t: torch.Tensor, stage: int, q: float = ECT_Q_CIFAR10, k: float = 8.0, b: float = 1.0) -> torch.Tensor:
    """ECT's second noise level r(t) < t (Geng et al. 2024, eq. 12 with the sigmoid n(t)).

    r = max(0, t·(1 − q^{−(stage+1)}·(1 + k·sigmoid(−b·t)))). As the stage grows, Δt = t − r → 0
    and the objective moves from diffusion pre-training (r = 0) toward consistency.
    """
    q = check.positive("q", q)
    if q <= 1:
        raise ValueError(f"q must be > 1 so that Δt shrinks with the stage, got {q}")
    stage = check.integer_at_least("stage", stage, 0)
    t = check.sigma_tensor("t", t)
    decay = q ** (-(stage + 1))
    ratio = 1 - decay * (1 + k * torch.sigmoid(-b * t))
    return (t * ratio).clamp(min=0)

"""Exponential-moving-average rules: the decay to use at a step, and the in-place update.

The trainer owns the EMA weights; these functions only say how fast they move.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch

from . import _validate as check
from .schedules import ct_num_scales

__all__ = [
    "ct_target_ema",
    "ICT_TARGET_EMA",
    "sigma_rel_to_gamma",
    "gamma_to_sigma_rel",
    "power_function_ema",
    "ema_update_",
]

# iCT drops the EMA teacher: the target is the stop-gradient of the online network,
# i.e. an EMA with decay 0 (Song & Dhariwal 2023, Sec. 3.2).
ICT_TARGET_EMA = 0.0


def ct_target_ema(
    step: int,
    total_steps: int,
    s0: int = 2,
    s1: int = 150,
    mu0: float = 0.95,
    variant: str = "paper",
) -> float:
    """Target-network EMA decay μ(k) of consistency training (Song et al. 2023, Appendix C).

    ``"paper"``: μ(k) = exp(s0·ln μ0 / N(k)) (0.95 at k=0; also Kinyugo's code).
    ``"openai"``: μ(k) = exp(s0·ln μ0 / (N(k) − 1)) (0.9025 at k=0; openai/consistency_models).
    """
    mu0 = float(mu0)
    if not 0 < mu0 < 1:
        raise ValueError(f"mu0 must lie in (0, 1), got {mu0}")
    n = ct_num_scales(step, total_steps, s0, s1)
    if variant == "paper":
        return math.exp(s0 * math.log(mu0) / n)
    if variant == "openai":
        return math.exp(s0 * math.log(mu0) / (n - 1))
    raise ValueError(f"variant must be 'paper' or 'openai', got {variant!r}")


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """EDM2's power-function EMA exponent γ for a relative width σ_rel (Karras et al. 2024, eq. 3).

    σ_rel² = (γ+1) / ((γ+2)²·(γ+3)), solved for the largest real root.
    """
    sigma_rel = check.positive("sigma_rel", sigma_rel)
    if sigma_rel >= 1 / math.sqrt(12):
        raise ValueError(f"sigma_rel must be < 1/sqrt(12) ≈ 0.2887, got {sigma_rel}")
    inv = sigma_rel**-2
    roots = np.roots([1.0, 7.0, 16.0 - inv, 12.0 - inv])
    return float(roots.real.max())


def gamma_to_sigma_rel(gamma: float) -> float:
    gamma = float(gamma)
    if gamma <= -1:
        raise ValueError(f"gamma must be > -1, got {gamma}")
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def power_function_ema(step: int, gamma: float, *, step_size: int = 1) -> float:
    """EDM2's power-function EMA decay β at optimizer step ``step`` (counted from 1 after the update).

    The EMA after t steps averages the weights with density ∝ τ^γ over τ ∈ [0, t]; the update from
    t − Δ to t uses β = (1 − Δ/t)^{γ+1}. ``step_size`` is Δ (e.g. images per step for EDM2's nimg clock).
    """
    step = check.integer_at_least("step", step, 0)
    if step == 0:
        return 0.0
    return (1 - step_size / step) ** (gamma + 1) if step >= step_size else 0.0


@torch.no_grad()
def ema_update_(ema_params: Iterable[torch.Tensor], params: Iterable[torch.Tensor], decay: float) -> None:
    """ema ← decay·ema + (1 − decay)·params, in place (decay 0 copies the online weights)."""
    decay = float(decay)
    if not 0 <= decay <= 1:
        raise ValueError(f"decay must lie in [0, 1], got {decay}")
    ema_params, params = list(ema_params), list(params)
    if len(ema_params) != len(params):
        raise ValueError(f"EMA has {len(ema_params)} tensors but the model has {len(params)}")
    for e, p in zip(ema_params, params):
        if e.shape != p.shape:
            raise ValueError(f"EMA tensor shape {tuple(e.shape)} != model tensor {tuple(p.shape)}")
        e.lerp_(p.detach().to(e.dtype), 1 - decay)

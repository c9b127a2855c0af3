"""Argument checks shared by the public functions: each raises with the argument's name."""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch


def positive(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return value


def non_negative(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return value


def integer_at_least(name: str, value: int, low: int) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    try:
        value = operator.index(value)  # int, numpy and 0-d torch integers
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r}") from None
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


def sigma_range(sigma_min: float, sigma_max: float) -> tuple[float, float]:
    sigma_min = positive("sigma_min", sigma_min)
    sigma_max = positive("sigma_max", sigma_max)
    if sigma_min >= sigma_max:
        raise ValueError(f"sigma_min must be < sigma_max, got sigma_min={sigma_min} >= sigma_max={sigma_max}")
    return sigma_min, sigma_max


def sigma_tensor(name: str, sigma, like: torch.Tensor | None = None) -> torch.Tensor:
    """σ as a tensor (a scalar, or one value per sample); negative or non-finite → error."""
    if not torch.is_tensor(sigma):
        # Python numbers become float64, never x's half dtype (bf16 would turn 2.4 into 2.40625).
        device = like.device if like is not None else None
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=device)
    if not sigma.is_floating_point():
        sigma = sigma.to(torch.get_default_dtype())
    if sigma.numel() and (not torch.isfinite(sigma).all() or (sigma < 0).any()):
        raise ValueError(f"{name} must be finite and >= 0, got {sigma.flatten()[:8].tolist()}")
    return sigma


def sigma_list(name: str, sigmas: Sequence[float] | torch.Tensor, *, decreasing: bool) -> list[float]:
    values = [float(s) for s in (sigmas.tolist() if torch.is_tensor(sigmas) else sigmas)]
    if len(values) == 0:
        raise ValueError(f"{name} must hold at least one σ value")
    for s in values:
        if not math.isfinite(s) or s < 0:
            raise ValueError(f"{name} must hold finite σ values >= 0, got {values}")
    if decreasing and any(b >= a for a, b in zip(values, values[1:])):
        raise ValueError(f"{name} must be strictly decreasing for sampling (noise → data), got {values}")
    return values


def bcast(v: torch.Tensor, x: torch.Tensor, *, cast: bool = True) -> torch.Tensor:
    """Per-sample values v [B] as [B, 1, …, 1] against x [B, …], in x's dtype unless ``cast=False``."""
    v = v.reshape([-1] + [1] * (x.ndim - 1))
    return v.to(x.dtype) if cast else v


def per_sample(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Broadcast σ (scalar or [B]) against x [B, ...] as [B, 1, ..., 1] in x's dtype."""
    sigma = sigma.to(device=x.device, dtype=x.dtype)
    if sigma.ndim == 0:
        return sigma.reshape([1] * x.ndim)
    if sigma.ndim == 1 and sigma.shape[0] == x.shape[0]:
        return sigma.reshape([-1] + [1] * (x.ndim - 1))
    if sigma.shape == x.shape:
        return sigma
    raise ValueError(
        f"sigma must be a scalar, shape [B]=[{x.shape[0]}] or x's shape {tuple(x.shape)}; "
        f"got shape {tuple(sigma.shape)}"
    )

"""Noise-level samplers used by the training objectives.

Discrete samplers return an index i into an ascending σ grid of N points: the student sees
σ_{i+1}, the target σ_i (so i ∈ {0, …, N−2}). Continuous samplers return σ values.
"""

from __future__ import annotations

import math

import torch

from . import _validate as check

__all__ = [
    "uniform_indices",
    "lognormal_index_probs",
    "lognormal_indices",
    "lognormal_sigmas",
    "ICT_P_MEAN",
    "ICT_P_STD",
    "EDM_P_MEAN",
    "EDM_P_STD",
]

ICT_P_MEAN, ICT_P_STD = -1.1, 2.0  # iCT (Song & Dhariwal 2023, Sec. 3.5) and ECT
EDM_P_MEAN, EDM_P_STD = -1.2, 1.2  # EDM training distribution of ln σ


def _draw_uniform(batch: int, generator, device) -> torch.Tensor:
    return torch.rand(batch, generator=generator, device=device, dtype=torch.float64)


def uniform_indices(num_scales: int, batch: int, *, generator=None, device=None) -> torch.Tensor:
    """i ~ U{0, …, N−2}: the CT/CD choice (Song et al. 2023, Algorithms 2-3)."""
    num_scales = check.integer_at_least("num_scales", num_scales, 2)
    batch = check.integer_at_least("batch", batch, 1)
    return torch.randint(0, num_scales - 1, (batch,), generator=generator, device=device)


def lognormal_index_probs(sigmas: torch.Tensor, p_mean: float = ICT_P_MEAN, p_std: float = ICT_P_STD) -> torch.Tensor:
    """iCT's discretized lognormal: p(i) ∝ erf((ln σ_{i+1} − P_mean)/(√2 P_std)) − erf((ln σ_i − P_mean)/(√2 P_std)).

    ``sigmas`` is the ascending grid (length N); returns N−1 probabilities (float64) summing to 1.
    """
    p_std = check.positive("p_std", p_std)
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be a 1-D grid of at least 2 values, got shape {tuple(sigmas.shape)}")
    if (sigmas <= 0).any() or (sigmas[1:] <= sigmas[:-1]).any():
        raise ValueError("sigmas must be positive and strictly ascending")
    cdf = torch.erf((sigmas.log() - p_mean) / (math.sqrt(2) * p_std))
    mass = cdf[1:] - cdf[:-1]
    return mass / mass.sum()


def lognormal_indices(
    sigmas: torch.Tensor,
    batch: int,
    p_mean: float = ICT_P_MEAN,
    p_std: float = ICT_P_STD,
    *,
    generator=None,
    device=None,
) -> torch.Tensor:
    """Draw i with the iCT probabilities of :func:`lognormal_index_probs`."""
    batch = check.integer_at_least("batch", batch, 1)
    probs = lognormal_index_probs(sigmas, p_mean, p_std)
    # Inverse-CDF sampling with our own uniforms: reproducible under a given generator.
    cdf = probs.cumsum(0)
    u = _draw_uniform(batch, generator, device).cpu() * cdf[-1]
    idx = torch.searchsorted(cdf, u, right=True).clamp(max=probs.numel() - 1)
    return idx.to(device) if device is not None else idx


def lognormal_sigmas(
    batch: int,
    p_mean: float = ICT_P_MEAN,
    p_std: float = ICT_P_STD,
    *,
    generator=None,
    device=None,
    dtype=torch.float32,
) -> torch.Tensor:
    """Continuous ln σ ~ N(P_mean, P_std²): ECT's t (−1.1, 2.0) and EDM's σ (−1.2, 1.2)."""
    batch = check.integer_at_least("batch", batch, 1)
    p_std = check.positive("p_std", p_std)
    n = torch.randn(batch, generator=generator, device=device, dtype=dtype)
    return (p_mean + p_std * n).exp()

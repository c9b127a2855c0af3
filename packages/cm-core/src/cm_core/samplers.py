"""Samplers for consistency functions f(x, σ) and BCM's bidirectional f(x, σ, σ_end).

All take explicit σ lists (descending for generation) and tensors of any shape [B, ...].
Noise is drawn as ``torch.randn(x.shape, generator=generator)`` once per re-noising, in order,
so a seeded generator reproduces a run exactly. ``randn_like=`` (a callable x → noise shaped like
x, as EDM's sampler takes) replaces those draws, one call per re-noising in the same order: e.g.
cm_eval's one generator per image. :mod:`cm_core.sampling` registers these samplers by name.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from . import _validate as check
from ._random import NoiseSource, noise_source

__all__ = [
    "onestep_sample",
    "multistep_sample",
    "bcm_ancestral_sample",
    "bcm_zigzag_sample",
    "bcm_mixture_sample",
    "bcm_invert",
    "bcm_reconstruct",
    "RENOISE_RULES",
    "BCM_ANCESTRAL_SIGMAS",
    "BCM_ZIGZAG",
    "BCM_MIXTURE_SIGMAS",
    "BCM_MIXTURE_ZIGZAG",
    "BCM_INVERT_SIGMAS",
]

# BCM's recipes (Li & He 2024, ImageNet-64): ancestral 2 NFE; zigzag 3 NFE (one jump σ_max → σ_min,
# then one round); mixture 4 NFE (a 2-jump chain, then one round); inversion 2 jumps up.
BCM_ANCESTRAL_SIGMAS = (80.0, 2.4, 0.002)
BCM_ZIGZAG = ((0.1, 1.2),)
BCM_MIXTURE_SIGMAS = (80.0, 3.0, 0.002)
BCM_MIXTURE_ZIGZAG = ((0.12, 0.4),)
BCM_INVERT_SIGMAS = (0.07, 15.0, 80.0)

ConsistencyFn = Callable[..., torch.Tensor]


def _check_z(z, name: str = "z") -> torch.Tensor:
    if not torch.is_tensor(z) or z.ndim < 1 or z.shape[0] == 0 or not z.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor of shape [B, ...] with B >= 1")
    return z


def _check_end(ts: list[float], sigma_min: float) -> None:
    # Below σ_min the shifted boundary scalings turn negative (c_out(0) = −σ_min) and c_noise(0)
    # is −inf: end the list at σ_min (a list ending in 0 is EDM's, not a consistency model's).
    if ts[-1] < sigma_min or ts[-1] <= 0:
        raise ValueError(
            f"sigmas must end at or above sigma_min={sigma_min} and above 0, got last value {ts[-1]}; "
            "drop a trailing 0 (EDM-style lists) or lower sigma_min"
        )


def _clip(x: torch.Tensor, clip):
    return x if clip is None else x.clamp(-clip, clip)


def onestep_sample(f: ConsistencyFn, z: torch.Tensor, sigma_max: float = 80.0, *, clip=None, **cond):
    """x = f(σ_max·z, σ_max) (Song et al. 2023, Algorithm 1 with one step)."""
    z = _check_z(z)
    sigma_max = check.positive("sigma_max", sigma_max)
    return _clip(f(sigma_max * z, sigma_max, **cond), clip)


def _renoise_cm(sigma: float, sigma_min: float) -> float:
    return math.sqrt(max(sigma**2 - sigma_min**2, 0.0))


def _renoise_ect(sigma: float, sigma_min: float) -> float:
    return sigma


RENOISE_RULES = {"cm": _renoise_cm, "ect": _renoise_ect}


def renoise_rule(name: str):
    try:
        return RENOISE_RULES[name]
    except KeyError:
        raise ValueError(f"renoise must be one of {sorted(RENOISE_RULES)}, got {name!r}") from None


def multistep_sample(
    f: ConsistencyFn,
    z: torch.Tensor,
    sigmas: Sequence[float] | torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    randn_like: NoiseSource | None = None,
    clip: float | None = None,
    sigma_min: float = 0.002,
    renoise: str = "cm",
    **cond,
) -> torch.Tensor:
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1; openai, diffusers).

    x = f(σ_0·z, σ_0); then for each next σ: x ← f(x + s(σ)·ε, σ) with s(σ) = √(σ² − σ_min²)
    (``renoise="cm"``) or s(σ) = σ (``"ect"``, as ECT's sampler). ``clip`` clamps every
    denoised estimate to [−clip, clip] (openai clamps images to [−1, 1]). ε comes from
    ``randn_like(x)`` when given, else from ``generator``.
    """
    z = _check_z(z)
    ts = check.sigma_list("sigmas", sigmas, decreasing=True)
    sigma_min = check.non_negative("sigma_min", sigma_min)
    _check_end(ts, sigma_min)
    rule = renoise_rule(renoise)
    eps = noise_source(generator, randn_like)
    x = _clip(f(ts[0] * z, ts[0], **cond), clip)
    for sigma in ts[1:]:
        x = x + rule(sigma, sigma_min) * eps(x)
        x = _clip(f(x, sigma, **cond), clip)
    return x


def _jump_chain(f, x, ts, clip, **cond):
    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        x = f(x, t_cur, t_next, **cond)
    return _clip(x, clip)


def bcm_ancestral_sample(
    f: ConsistencyFn,
    z: torch.Tensor,
    sigmas: Sequence[float] = BCM_ANCESTRAL_SIGMAS,
    *,
    clip=None,
    **cond,
) -> torch.Tensor:
    """BCM ancestral sampling: deterministic jumps σ_0 → σ_1 → … along the PF-ODE.

    x = σ_0·z, then x ← f(x, σ_i, σ_{i+1}). The BCM recipe for 2 NFE is 80 → 2.4 → 0.002.
    """
    z = _check_z(z)
    ts = check.sigma_list("sigmas", sigmas, decreasing=True)
    if len(ts) < 2:
        raise ValueError(f"sigmas must hold at least a start and an end, got {ts}")
    return _jump_chain(f, ts[0] * z, ts, clip, **cond)


def bcm_mixture_sample(
    f: ConsistencyFn,
    z: torch.Tensor,
    sigmas: Sequence[float] = BCM_MIXTURE_SIGMAS,
    zigzag: Sequence[tuple[float, float]] = BCM_MIXTURE_ZIGZAG,
    *,
    generator: torch.Generator | None = None,
    randn_like: NoiseSource | None = None,
    clip=None,
    **cond,
) -> torch.Tensor:
    """BCM mixture sampling: an ancestral chain, then zigzag rounds.

    Each round (σ_noise, σ_up): x ← x + σ_noise·ε, x ← f(x, σ_noise, σ_up) (BCM amplifies the
    small added noise by jumping *up* the ODE), x ← f(x, σ_up, σ_end). The BCM 4-NFE recipe is
    80 → 3.0 → 0.002, then (0.12, 0.4). ε: ``randn_like(x)`` when given, else ``generator``'s.
    """
    z = _check_z(z)
    ts = check.sigma_list("sigmas", sigmas, decreasing=True)
    if len(ts) < 2:
        raise ValueError(f"sigmas must hold at least a start and an end, got {ts}")
    sigma_end = ts[-1]
    eps = noise_source(generator, randn_like)
    x = _jump_chain(f, ts[0] * z, ts, clip, **cond)
    for i, pair in enumerate(zigzag):
        if len(pair) != 2:
            raise ValueError(f"zigzag[{i}] must be a pair (sigma_noise, sigma_up), got {pair!r}")
        s_noise, s_up = check.positive("sigma_noise", pair[0]), check.positive("sigma_up", pair[1])
        if not sigma_end < s_noise < s_up:
            raise ValueError(
                f"zigzag[{i}] must satisfy sigma_end < sigma_noise < sigma_up, got {sigma_end} < {s_noise} < {s_up}"
            )
        x = x + s_noise * eps(x)
        x = _jump_chain(f, x, [s_noise, s_up, sigma_end], clip, **cond)
    return x


def bcm_zigzag_sample(
    f: ConsistencyFn,
    z: torch.Tensor,
    zigzag: Sequence[tuple[float, float]] = BCM_ZIGZAG,
    *,
    sigma_max: float = 80.0,
    sigma_min: float = 0.002,
    generator: torch.Generator | None = None,
    randn_like: NoiseSource | None = None,
    clip=None,
    **cond,
) -> torch.Tensor:
    """BCM zigzag sampling: one jump σ_max → σ_min, then zigzag rounds (3-NFE recipe: (0.1, 1.2))."""
    return bcm_mixture_sample(
        f, z, (sigma_max, sigma_min), zigzag, generator=generator, randn_like=randn_like, clip=clip, **cond
    )


def bcm_invert(
    f: ConsistencyFn,
    x: torch.Tensor,
    sigmas: Sequence[float] = BCM_INVERT_SIGMAS,
    *,
    add_noise: bool = True,
    generator: torch.Generator | None = None,
    randn_like: NoiseSource | None = None,
    **cond,
) -> torch.Tensor:
    """BCM inversion, image → noise: x ← x + σ_0·ε (if ``add_noise``), then jumps σ_0 → σ_1 → … up.

    Returns the latent at the last σ (80 by default); divide by it for a unit-variance noise.
    ε: ``randn_like(x)`` when given (e.g. one generator per image), else ``generator``'s.
    """
    x = _check_z(x, "x")
    ts = [float(s) for s in sigmas]
    if len(ts) < 2 or any(b <= a for a, b in zip(ts, ts[1:])) or ts[0] <= 0:
        raise ValueError(f"sigmas must be positive and strictly increasing for inversion, got {ts}")
    eps = noise_source(generator, randn_like)
    if add_noise:
        x = x + ts[0] * eps(x)
    return _jump_chain(f, x, ts, None, **cond)


def bcm_reconstruct(
    f: ConsistencyFn, latent: torch.Tensor, sigmas: Sequence[float] = (80.0, 0.002), *, clip=None, **cond
) -> torch.Tensor:
    """Reconstruction from an inverted latent (already at sigmas[0]): jumps down to sigmas[-1]."""
    latent = _check_z(latent, "latent")
    ts = check.sigma_list("sigmas", sigmas, decreasing=True)
    if len(ts) < 2:
        raise ValueError(f"sigmas must hold at least a start and an end, got {ts}")
    return _jump_chain(f, latent, ts, clip, **cond)

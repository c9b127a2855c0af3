"""Zero-shot editing with a consistency function (Song et al. 2023, Algorithm 4).

Each editing task is an invertible linear operator A and a mask in A's space that says which
coefficients are *known* (taken from the reference y) and which are generated. After every
denoising step the known part is put back: x ← A⁻¹(A(y)·known + A(x)·(1 − known)).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from . import _validate as check
from ._random import NoiseSource, noise_source
from .samplers import _check_end, _check_z, _clip, multistep_sample, renoise_rule

__all__ = [
    "LinearOperator",
    "Identity",
    "Colorization",
    "SuperResolution",
    "LUMA",
    "edit",
    "inpaint",
    "colorize",
    "super_resolve",
    "stroke_edit",
    "slerp",
    "interpolate",
]

LUMA = (0.2989, 0.5870, 0.1140)  # ITU-R 601 luma weights, as in the CM paper's colorization


def _orthogonal_with_first_column(v: torch.Tensor) -> torch.Tensor:
    """An orthogonal matrix whose first column is v/‖v‖ (QR of [v | I_rest], sign fixed)."""
    n = v.numel()
    m = torch.eye(n, dtype=torch.float64)
    m[:, 0] = v / v.norm()
    q, _ = torch.linalg.qr(m)
    if q[:, 0].sum() < 0:
        q = -q
    return q


class LinearOperator:
    """An orthogonal (so trivially invertible) linear map A acting on [B, ...] tensors."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def known_mask(self, like: torch.Tensor) -> torch.Tensor:
        """The default mask in A's space for this task (1 = known)."""
        raise NotImplementedError

    def replace(self, y: torch.Tensor, x: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
        ay, ax = self.forward(y), self.forward(x)
        return self.inverse(ay * known + ax * (1 - known))


class Identity(LinearOperator):
    """A = I: inpainting, with a pixel mask (1 = known pixel)."""

    def forward(self, x):
        return x

    def inverse(self, x):
        return x

    def known_mask(self, like):
        raise ValueError("inpainting needs an explicit mask (1 = known pixel, 0 = to generate)")


class Colorization(LinearOperator):
    """Channels rotated so the first one is the luma direction; that channel is known."""

    def __init__(self, luma: Sequence[float] = LUMA):
        luma = torch.as_tensor(luma, dtype=torch.float64)
        if luma.shape != (3,) or (luma <= 0).any():
            raise ValueError(f"luma must be three positive channel weights, got {luma.tolist()}")
        self.q = _orthogonal_with_first_column(luma)

    def _check(self, x):
        if x.ndim < 2 or x.shape[1] != 3:
            raise ValueError(f"colorization needs images [B, 3, ...], got shape {tuple(x.shape)}")

    def forward(self, x):
        self._check(x)
        return torch.einsum("bc...,cd->bd...", x, self.q.to(x))

    def inverse(self, x):
        self._check(x)
        return torch.einsum("bd...,cd->bc...", x, self.q.to(x))

    def known_mask(self, like):
        mask = torch.zeros_like(like)
        mask[:, 0] = 1
        return mask

    def grayscale(self, x: torch.Tensor) -> torch.Tensor:
        """The known part only: luma replicated so the image looks gray."""
        return self.replace(x, torch.zeros_like(x), self.known_mask(x))


class SuperResolution(LinearOperator):
    """Per-channel p×p patches in an orthogonal basis whose first vector is the patch mean."""

    def __init__(self, patch_size: int = 8):
        self.p = check.integer_at_least("patch_size", patch_size, 2)
        self.q = _orthogonal_with_first_column(torch.ones(self.p * self.p, dtype=torch.float64))

    def _patches(self, x):
        if x.ndim != 4 or x.shape[2] % self.p or x.shape[3] % self.p:
            raise ValueError(
                f"super-resolution needs images [B, C, H, W] with H and W divisible by "
                f"patch_size={self.p}, got shape {tuple(x.shape)}"
            )
        b, c, h, w = x.shape
        p = self.p
        return x.reshape(b, c, h // p, p, w // p, p).permute(0, 1, 2, 4, 3, 5).reshape(b, c, -1, p * p)

    def _unpatch(self, x, shape):
        b, c, h, w = shape
        p = self.p
        return x.reshape(b, c, h // p, w // p, p, p).permute(0, 1, 2, 4, 3, 5).reshape(shape)

    def forward(self, x):
        return self._unpatch(torch.einsum("bcnd,de->bcne", self._patches(x), self.q.to(x)), x.shape)

    def inverse(self, x):
        return self._unpatch(torch.einsum("bcne,de->bcnd", self._patches(x), self.q.to(x)), x.shape)

    def known_mask(self, like):
        mask = torch.zeros(
            like.shape[0],
            like.shape[1],
            like.shape[2] * like.shape[3] // self.p**2,
            self.p**2,
            dtype=like.dtype,
            device=like.device,
        )
        mask[..., 0] = 1
        return self._unpatch(mask, like.shape)

    def downsample(self, x: torch.Tensor) -> torch.Tensor:
        """The known part only: every patch replaced by its mean (a blocky low-resolution image)."""
        return self.replace(x, torch.zeros_like(x), self.known_mask(x))


def edit(
    f,
    y: torch.Tensor,
    operator: LinearOperator,
    sigmas: Sequence[float] | torch.Tensor,
    known: torch.Tensor | None = None,
    *,
    z: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    randn_like: NoiseSource | None = None,
    clip: float | None = None,
    sigma_min: float = 0.002,
    renoise: str = "cm",
    start: str = "known",
    **cond,
) -> torch.Tensor:
    """Algorithm 4 of the CM paper: multistep sampling with the known part replaced each step.

    ``known`` is a mask in the operator's space (1 = keep y's coefficient); defaults to the
    operator's own. The start point: ``"known"`` (the paper) y's known part + σ_0·z;
    ``"noise"`` σ_0·z alone (openai's code); ``"reference"`` all of y + σ_0·z (stroke-guided
    editing, SDEdit-style). Noise (z when not given, then one ε per step after the first) comes
    from ``randn_like(x)`` when given, else from ``generator``.
    """
    y = _check_z(y, "y")
    ts = check.sigma_list("sigmas", sigmas, decreasing=True)
    _check_end(ts, check.non_negative("sigma_min", sigma_min))
    if known is None:
        known = operator.known_mask(y)
    known = torch.as_tensor(known, dtype=y.dtype, device=y.device)
    try:
        known = known.expand_as(y)
    except RuntimeError:
        raise ValueError(f"mask shape {tuple(known.shape)} does not match the image shape {tuple(y.shape)}") from None
    if ((known != 0) & (known != 1)).any():
        raise ValueError("mask must hold only 0 (generate) and 1 (known)")
    if start not in ("known", "noise", "reference"):
        raise ValueError(f"start must be 'known', 'noise' or 'reference', got {start!r}")
    rule = renoise_rule(renoise)
    eps = noise_source(generator, randn_like)
    if z is None:
        z = eps(y)
    elif z.shape != y.shape:
        raise ValueError(f"z shape {tuple(z.shape)} must equal y's shape {tuple(y.shape)}")
    y_known = operator.replace(y, torch.zeros_like(y), known)
    x = ts[0] * z + {"known": y_known, "noise": 0, "reference": y}[start]
    for i, sigma in enumerate(ts):
        if i > 0:
            x = x + rule(sigma, sigma_min) * eps(x)
        x = _clip(f(x, sigma, **cond), clip)
        x = operator.replace(y_known, x, known)
    return x


def inpaint(f, y, mask, sigmas, **kw):
    """Fill the pixels where ``mask`` is 0 (1 = known pixel, broadcastable to y)."""
    mask = torch.as_tensor(mask, dtype=y.dtype, device=y.device)
    if mask.ndim > y.ndim:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match the image shape {tuple(y.shape)}")
    return edit(f, y, Identity(), sigmas, mask, **kw)


def colorize(f, y, sigmas, **kw):
    """Colorize: keep y's luma, generate the two chroma channels."""
    return edit(f, y, Colorization(), sigmas, **kw)


def super_resolve(f, y, sigmas, patch_size: int = 8, **kw):
    """Super-resolve: keep every p×p patch mean of y, generate the detail."""
    return edit(f, y, SuperResolution(patch_size), sigmas, **kw)


def stroke_edit(f, y, sigmas, **kw):
    """Stroke-guided generation: start from the stroke painting plus noise, keep nothing fixed."""
    known = torch.zeros_like(y)
    return edit(f, y, Identity(), sigmas, known, start="reference", **kw)


def slerp(z1: torch.Tensor, z2: torch.Tensor, alpha: float) -> torch.Tensor:
    """Spherical interpolation per sample between two noise tensors [B, ...]."""
    if z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must have the same shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    alpha = float(alpha)
    a, b = z1.flatten(1), z2.flatten(1)
    cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    theta = torch.arccos(cos.clamp(-1, 1))
    sin = torch.sin(theta)
    # Nearly parallel inputs: slerp degenerates to lerp.
    safe = sin.abs() > 1e-6
    w1 = torch.where(safe, torch.sin((1 - alpha) * theta) / torch.where(safe, sin, 1), 1 - alpha)
    w2 = torch.where(safe, torch.sin(alpha * theta) / torch.where(safe, sin, 1), alpha)
    shape = [-1] + [1] * (z1.ndim - 1)
    return w1.reshape(shape) * z1 + w2.reshape(shape) * z2


def interpolate(
    f,
    z1: torch.Tensor,
    z2: torch.Tensor,
    alphas: Sequence[float],
    sigmas,
    *,
    generator: torch.Generator | None = None,
    randn_like: NoiseSource | None = None,
    **kw,
) -> torch.Tensor:
    """Samples along the slerp path between two noises: [len(alphas), B, ...], by
    :func:`~cm_core.multistep_sample` (``kw``: its options and the network's cond).

    Every α uses the same re-noising ε (drawn for the first α from ``randn_like`` or ``generator``,
    then replayed), so the path varies only through the noise z.
    """
    if len(alphas) == 0:
        raise ValueError("alphas must hold at least one value in [0, 1]")
    for a in alphas:
        if not 0 <= float(a) <= 1 or math.isnan(float(a)):
            raise ValueError(f"alphas must lie in [0, 1], got {list(alphas)}")
    eps = noise_source(generator, randn_like)
    drawn: list[torch.Tensor] = []

    def draw_and_keep(x: torch.Tensor) -> torch.Tensor:
        drawn.append(eps(x))
        return drawn[-1]

    def replay() -> NoiseSource:
        kept = iter(drawn)
        return lambda x: next(kept)

    out = [
        multistep_sample(f, slerp(z1, z2, a), sigmas, randn_like=draw_and_keep if i == 0 else replay(), **kw)
        for i, a in enumerate(alphas)
    ]
    return torch.stack(out)

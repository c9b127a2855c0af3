"""Building blocks shared by the networks: noise embeddings, float32 GroupNorm, label embedding,
pixel normalization for sCM's adaptive double normalization."""

from __future__ import annotations

import math

import torch
from torch import nn


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and returned in the input dtype (openai ``GroupNorm32``):
    half-precision statistics over 32 groups of up to 768·4096 values lose too many bits. A float64
    network computes it in float64 (``x.float()`` met float64 weights and raised)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.to(torch.promote_types(x.dtype, torch.float32))).to(x.dtype)


# The AdaGN variants of ADMUNet / SongUNet (constructor argument ``ada_norm``).
ADA_NORM_MODES = ("plain", "double")


def check_ada_norm(ada_norm: str) -> str:
    if ada_norm not in ADA_NORM_MODES:
        raise ValueError(f"ada_norm must be one of {ADA_NORM_MODES}, got {ada_norm!r}")
    return ada_norm


def pixel_norm(x: torch.Tensor, dim: int = 1, eps: float = 1e-8) -> torch.Tensor:
    """Pixel normalization (Karras et al. 2018, ProGAN): ``x / sqrt(mean(x², dim) + eps)``, i.e. unit
    RMS over the channel dimension, eps inside the root. The sCM paper's ``pnorm`` (Lu & Song 2025,
    §4.1, adaptive double normalization). The statistics are computed in at least float32 and the
    result returned in ``x``'s dtype; plain differentiable ops, so ``torch.func.jvp`` goes through."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    return (xf * torch.rsqrt(xf.square().mean(dim=dim, keepdim=True) + eps)).to(x.dtype)


def sinusoidal_embedding(
    c_noise: torch.Tensor, dim: int, max_period: float = 10000.0, endpoint: bool = False, flip: bool = False
) -> torch.Tensor:
    """[cos(c·f_i), sin(c·f_i)] with f_i = max_period^(−i/(half − endpoint)), i < half = dim/2.

    ``endpoint=False`` is openai's ``timestep_embedding`` (ADM, CM, iCT, BCM); ``endpoint=True``
    is EDM's ``PositionalEmbedding(endpoint=True)`` (DDPM++), whose output EDM's ``SongUNet`` then
    swaps to [sin, cos] (``flip=True`` gives that order directly). Computed in float32."""
    if c_noise.dim() != 1:
        raise ValueError(f"c_noise must be a 1-D per-sample tensor [B], got shape {tuple(c_noise.shape)}")
    half = dim // 2
    i = torch.arange(half, dtype=torch.float32, device=c_noise.device)
    freqs = torch.exp(-math.log(max_period) * i / (half - (1 if endpoint else 0)))
    args = c_noise.float()[:, None] * freqs[None]
    parts = [args.sin(), args.cos()] if flip else [args.cos(), args.sin()]
    emb = torch.cat(parts, dim=-1)
    if dim % 2:
        emb = torch.cat([emb, emb.new_zeros(emb.shape[0], 1)], dim=-1)
    return emb


class FourierEmbedding(nn.Module):
    """Random Fourier features [cos(2π f c), sin(2π f c)], f ~ N(0, scale²) (NCSN++, EDM)."""

    def __init__(self, num_channels: int, scale: float = 16.0):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        args = c_noise.float()[:, None] * (2 * math.pi * self.freqs.float())[None]
        return torch.cat([args.cos(), args.sin()], dim=1)


def embed_labels(weight: torch.Tensor, class_labels: torch.Tensor | None, batch: int, num_classes: int) -> torch.Tensor:
    """Rows of an embedding table for integer labels [B], or ``one_hot @ table`` for float
    labels [B, num_classes] (EDM's convention; an all-zero row is "no class")."""
    if class_labels is None:
        raise ValueError(
            f"class_labels is required: this network is class-conditional with {num_classes} classes "
            "(pass integer labels [B] or one-hot [B, num_classes])"
        )
    if class_labels.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
        if class_labels.shape != (batch,):
            raise ValueError(f"integer class_labels must have shape [B] = ({batch},), got {tuple(class_labels.shape)}")
        return weight[class_labels.long()]
    if class_labels.shape != (batch, num_classes):
        raise ValueError(
            f"float class_labels must have shape [B, num_classes] = ({batch}, {num_classes}), "
            f"got {tuple(class_labels.shape)}"
        )
    return class_labels.to(weight.dtype) @ weight


def check_c_noise(c_noise: torch.Tensor, batch: int, name: str = "c_noise") -> torch.Tensor:
    if not isinstance(c_noise, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [B], got {type(c_noise).__name__}")
    if c_noise.dim() == 0:
        c_noise = c_noise.expand(batch)
    c_noise = c_noise.reshape(-1)
    if c_noise.shape[0] != batch:
        raise ValueError(f"{name} must have one value per sample ({batch}), got {c_noise.shape[0]}")
    return c_noise

"""Pure-PyTorch reference implementations: the specification the kernels must match.

Differentiable with ordinary autograd, any dtype and device (float64 included), no compiled code.
Also the fallback used when the compiled extension cannot be loaded.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "normalize_heads",
    "normalized_attention",
    "normalized_attention_qkv",
    "pseudo_huber_loss",
    "vector_norm_fp32",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _reduce(per_sample: torch.Tensor, weight: torch.Tensor | None, reduction: str) -> torch.Tensor:
    if weight is not None:
        per_sample = per_sample * weight
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample


def pseudo_huber_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    c: float,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
    *,
    accumulate_in_float32: bool = True,
) -> torch.Tensor:
    """Pseudo-Huber loss per sample (iCT, Song & Dhariwal 2023, eq. 7):
    d(x, y) = sqrt(||x - y||_2^2 + c^2) - c over all non-batch dims, optionally times
    ``weight[B]``, then reduced over the batch ("mean" | "sum" | "none" -> [B]).

    Computed as s / (sqrt(s + c^2) + c), s = ||x - y||^2: the same value without the cancellation
    of the first form when s << c^2 (the kernels compute it so too). Half inputs are widened to
    float32 before the difference and return float32, like the kernel, unless
    ``accumulate_in_float32=False``, which computes in the input precision (the baseline that the
    low-precision tests compare the kernel's error against). ``cm_core.pseudo_huber_reference`` is this.
    """
    if accumulate_in_float32 and pred.dtype in _LOW_PRECISION:
        pred, target = pred.float(), target.float()
    diff = pred - target
    sq = diff.reshape(diff.shape[0], -1).square().sum(dim=1)
    per_sample = sq / (torch.sqrt(sq + c * c) + c)
    return _reduce(per_sample, weight, reduction)


def vector_norm_fp32(x: torch.Tensor, dim, keepdim: bool = True) -> torch.Tensor:
    """||x|| over ``dim`` accumulated in at least float32: half inputs are widened, float64 stays
    float64 (torch >= 2.14 refuses a narrowing ``dtype=`` in ``vector_norm``)."""
    return torch.linalg.vector_norm(x, dim=dim, keepdim=keepdim, dtype=torch.promote_types(x.dtype, torch.float32))


def normalize_heads(x: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """x / (eps + ||x|| / sqrt(d)) over the last dim: each head vector divided by its RMS plus eps
    (EDM2, Karras et al. 2024, eq. 14 `normalize`; iCT-BCM QKV normalization). The norm is
    accumulated in at least float32; the result has x's dtype. ``cm_nets``' attention uses this."""
    norm = vector_norm_fp32(x, dim=-1)
    return x / (eps + norm / math.sqrt(x.shape[-1])).to(x.dtype)


def normalized_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    normalize: str = "qkv",
    eps: float = 1e-4,
) -> torch.Tensor:
    """softmax(q_hat k_hat^T * scale) v_hat on [B, H, N, d] tensors; q_hat, k_hat normalized for
    "qk" and "qkv", v_hat too for "qkv"; default scale 1/sqrt(d)."""
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if normalize in ("qk", "qkv"):
        q, k = normalize_heads(q, eps), normalize_heads(k, eps)
    if normalize == "qkv":
        v = normalize_heads(v, eps)
    logits = torch.matmul(q, k.transpose(-1, -2)) * scale
    return torch.matmul(torch.softmax(logits, dim=-1), v)


def split_qkv(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, 3*H*d, N] with openai's QKVAttention channel order (three, heads, d) -> q, k, v views
    of shape [B, H, N, d]."""
    B, C, N = qkv.shape
    d = C // (3 * num_heads)
    q, k, v = qkv.reshape(B, 3, num_heads, d, N).transpose(-1, -2).unbind(1)
    return q, k, v


def normalized_attention_qkv(
    qkv: torch.Tensor,
    num_heads: int,
    scale: float | None = None,
    normalize: str = "qkv",
    eps: float = 1e-4,
) -> torch.Tensor:
    """ADM channels-first layout: qkv [B, 3*H*d, N] -> out [B, H*d, N] (openai's QKVAttention
    order), computed as ``normalized_attention`` on the [B, H, N, d] views."""
    B, C, N = qkv.shape
    q, k, v = split_qkv(qkv, num_heads)
    out = normalized_attention(q, k, v, scale=scale, normalize=normalize, eps=eps)
    return out.transpose(-1, -2).reshape(B, C // 3, N)

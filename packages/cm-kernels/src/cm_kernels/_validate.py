"""Argument checks shared by the public wrappers: clear ValueError/TypeError naming the problem."""

from __future__ import annotations

import math
import numbers

import torch

KERNEL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# Head dims with compiled CUDA instantiations; the CPU kernels accept the same set so a model
# that runs on CPU also runs on GPU.
SUPPORTED_HEAD_DIMS = (16, 32, 64, 96, 128)
NORMALIZE_MODES = ("none", "qk", "qkv")
REDUCTIONS = ("mean", "sum", "none")


def _tensor(name: str, x: object, fn: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in KERNEL_DTYPES:
        kinds = "float32, float64, float16, bfloat16"
        raise TypeError(f"{fn}: {name} has dtype {x.dtype}; supported dtypes are {kinds}")
    if x.device.type == "cuda" and x.dtype == torch.float64:
        raise TypeError(f"{fn}: float64 is supported on CPU only; {name} is a float64 CUDA tensor")
    return x


def positive_float(name: str, x: object, fn: str) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{fn}: {name} must be a Python float, got {type(x).__name__}")
    x = float(x)
    if not (x > 0 and math.isfinite(x)):
        raise ValueError(f"{fn}: {name} must be a finite number > 0, got {x}")
    return x


def check_pseudo_huber(pred, target, c, weight, reduction) -> float:
    fn = "cm_kernels.pseudo_huber_loss"
    _tensor("pred", pred, fn)
    _tensor("target", target, fn)
    if pred.dtype != target.dtype:
        raise TypeError(f"{fn}: pred ({pred.dtype}) and target ({target.dtype}) dtypes differ")
    if pred.device != target.device:
        raise ValueError(f"{fn}: pred on {pred.device} but target on {target.device}")
    if pred.shape != target.shape:
        raise ValueError(f"{fn}: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    if pred.dim() == 0:
        raise ValueError(f"{fn}: pred needs a leading batch dim, got a 0-d tensor")
    if pred.shape[0] == 0:
        raise ValueError(f"{fn}: empty batch (pred shape {tuple(pred.shape)})")
    if pred.numel() == 0:
        raise ValueError(f"{fn}: samples are empty (pred shape {tuple(pred.shape)})")
    c = positive_float("c", c, fn)
    if reduction not in REDUCTIONS:
        raise ValueError(f"{fn}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if weight is not None:
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"{fn}: weight must be a torch.Tensor or None, got {type(weight).__name__}")
        if not weight.is_floating_point():
            raise TypeError(f"{fn}: weight must be a floating tensor, got {weight.dtype}")
        if weight.shape != (pred.shape[0],):
            raise ValueError(f"{fn}: weight must have shape [B] = ({pred.shape[0]},), got {tuple(weight.shape)}")
        if weight.device != pred.device:
            raise ValueError(f"{fn}: weight on {weight.device} but pred on {pred.device}")
    return c


def _head_dim(d: int, fn: str) -> None:
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"{fn}: unsupported head dim {d}; supported head dims are {SUPPORTED_HEAD_DIMS}")


def _scale_eps(scale, eps, normalize, d, fn) -> tuple[float, float]:
    if normalize not in NORMALIZE_MODES:
        raise ValueError(f"{fn}: normalize must be one of {NORMALIZE_MODES}, got {normalize!r}")
    scale = 1.0 / math.sqrt(d) if scale is None else positive_float("scale", scale, fn)
    return scale, positive_float("eps", eps, fn)


def check_attention(q, k, v, scale, normalize, eps) -> tuple[float, float]:
    fn = "cm_kernels.normalized_attention"
    for name, x in (("q", q), ("k", k), ("v", v)):
        _tensor(name, x, fn)
        if x.dim() != 4:
            raise ValueError(f"{fn}: {name} must be [B, H, N, d], got shape {tuple(x.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{fn}: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{fn}: q, k, v on different devices ({q.device}, {k.device}, {v.device})")
    if k.shape != v.shape:
        raise ValueError(f"{fn}: k {tuple(k.shape)} and v {tuple(v.shape)} differ in shape")
    if (q.shape[0], q.shape[1], q.shape[3]) != (k.shape[0], k.shape[1], k.shape[3]):
        raise ValueError(f"{fn}: q {tuple(q.shape)} and k {tuple(k.shape)} must agree in B, H and d")
    if q.shape[0] == 0:
        raise ValueError(f"{fn}: empty batch (q shape {tuple(q.shape)})")
    if q.numel() == 0 or k.numel() == 0:
        raise ValueError(f"{fn}: empty heads or sequence (q {tuple(q.shape)}, k {tuple(k.shape)})")
    _head_dim(q.shape[3], fn)
    return _scale_eps(scale, eps, normalize, q.shape[3], fn)


def check_attention_qkv(qkv, num_heads, scale, normalize, eps) -> tuple[int, float, float]:
    fn = "cm_kernels.normalized_attention_qkv"
    _tensor("qkv", qkv, fn)
    if qkv.dim() != 3:
        raise ValueError(f"{fn}: qkv must be [B, 3*H*d, N], got shape {tuple(qkv.shape)}")
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads <= 0:
        raise ValueError(f"{fn}: num_heads must be a positive int, got {num_heads!r}")
    B, C, N = qkv.shape
    if B == 0:
        raise ValueError(f"{fn}: empty batch (qkv shape {tuple(qkv.shape)})")
    if N == 0 or C == 0:
        raise ValueError(f"{fn}: empty channels or sequence (qkv shape {tuple(qkv.shape)})")
    if C % (3 * num_heads):
        raise ValueError(f"{fn}: channels {C} not divisible by 3 * num_heads = {3 * num_heads}")
    d = C // (3 * num_heads)
    _head_dim(d, fn)
    scale, eps = _scale_eps(scale, eps, normalize, d, fn)
    return d, scale, eps

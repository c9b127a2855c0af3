"""cm_kernels: fused pseudo-Huber loss and normalized ("cosine") attention for consistency models.

Public API: ``pseudo_huber_loss``, ``normalized_attention``, ``normalized_attention_qkv``,
``backends``, ``fused_jvp`` (whether a JVP of the attention runs a fused kernel), the CPU settings ``cpu_isa``/``set_cpu_isa``/``tune_cpu_allocator`` (``cm_kernels.cpu``),
the CUDA setting ``cuda_tensor_cores``/``set_cuda_tensor_cores`` (``cm_kernels.cuda``)
and the pure-PyTorch ``reference`` module (the specification of both ops).
The compiled ops live in the ``torch.ops.cm_kernels`` namespace; only these wrappers are public.

Dtypes: float32, float64 (CPU only), float16 and bfloat16. Half-precision inputs accumulate in
float32; ``pseudo_huber_loss`` then returns float32, attention returns the input dtype.

Both modes of AD: reverse (fused backward kernels) and forward (torch.func.jvp / jacfwd,
torch.autograd.forward_ad; a fused CPU kernel for the attention's tangent), also under
torch.compile; double backward and forward-over-reverse raise (README, "Forward-mode AD").
"""

from __future__ import annotations

import warnings

import torch

from . import reference
from ._loader import ExtState, KernelFallbackWarning, load_extension
from ._validate import SUPPORTED_HEAD_DIMS, check_attention, check_attention_qkv, check_pseudo_huber
from .cpu import cpu_isa, set_cpu_isa, tune_cpu_allocator
from .cuda import cuda_tensor_cores, set_cuda_tensor_cores

__version__ = "0.1.0"
# Every op differentiates in forward mode (the compiled ops through _ops' forward-AD kernels, the
# reference fallback as plain torch ops): cm_nets keeps the fused attention backend under a JVP.
FORWARD_AD = True
__all__ = [
    "FORWARD_AD",
    "SUPPORTED_HEAD_DIMS",
    "KernelFallbackWarning",
    "backends",
    "cpu_isa",
    "cuda_tensor_cores",
    "fused_jvp",
    "normalized_attention",
    "normalized_attention_qkv",
    "pseudo_huber_loss",
    "reference",
    "set_cpu_isa",
    "set_cuda_tensor_cores",
    "tune_cpu_allocator",
]

_STATE: ExtState = load_extension()
if _STATE.loaded:
    from . import _ops  # noqa: F401  registers autograd and fake implementations

_OPS = ("pseudo_huber_loss", "normalized_attention", "normalized_attention_qkv")
_warned_devices: set[str] = set()


def _use_ext(x: torch.Tensor) -> bool:
    """Compiled kernels for this tensor's device? (CPU, meta/fake, or CUDA when built.)"""
    if not _STATE.loaded:
        return False
    if x.device.type == "cuda" and not _STATE.with_cuda:
        if "cuda" not in _warned_devices:
            _warned_devices.add("cuda")
            warnings.warn(
                f"cm_kernels: {_STATE.reason}; CUDA tensors use the pure-PyTorch reference",
                KernelFallbackWarning,
                stacklevel=3,
            )
        return False
    return x.device.type in ("cpu", "cuda", "meta")


def _slower_than_eager(x: torch.Tensor) -> bool:
    """float16 on a CPU without F16C (the baseline build converts halves bit by bit): the kernel
    measured 0.7x the eager reference there (bench/RESULTS.md), so the reference runs instead."""
    return x.dtype == torch.float16 and x.device.type == "cpu" and cpu_isa() == "base"


def pseudo_huber_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    c: float,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Pseudo-Huber loss sqrt(||pred - target||^2 + c^2) - c per sample over all non-batch dims
    (iCT, Song & Dhariwal 2023, eq. 7), times ``weight[B]`` if given, reduced over the batch:
    "mean" | "sum" -> scalar, "none" -> [B]. One fused pass forward, one backward; gradients flow
    to pred, target (= -grad pred) and weight. Returns float32 for float16/bfloat16 inputs."""
    c = check_pseudo_huber(pred, target, c, weight, reduction)
    if _use_ext(pred) and not _slower_than_eager(pred):
        per_sample = torch.ops.cm_kernels.pseudo_huber_fwd(pred, target, c)
    else:
        per_sample = reference.pseudo_huber_loss(pred, target, c, reduction="none")
    return reference._reduce(per_sample, weight, reduction)


def normalized_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    normalize: str = "qkv",
    eps: float = 1e-4,
) -> torch.Tensor:
    """softmax(q_hat k_hat^T * scale) v_hat for [B, H, N, d] q and [B, H, Nk, d] k, v, where
    x_hat = x / (eps + ||x|| / sqrt(d)) per head vector (EDM2 / iCT-BCM normalization) for q, k
    ("qk") and also v ("qkv"); "none" is plain attention. Default scale 1/sqrt(d). Head dims:
    ``SUPPORTED_HEAD_DIMS``. Returns [B, H, N, d] in the input dtype."""
    scale, eps = check_attention(q, k, v, scale, normalize, eps)
    if _use_ext(q):
        return torch.ops.cm_kernels.normalized_attention_fwd(q, k, v, scale, normalize, eps)[0]
    return reference.normalized_attention(q, k, v, scale=scale, normalize=normalize, eps=eps)


def normalized_attention_qkv(
    qkv: torch.Tensor,
    num_heads: int,
    scale: float | None = None,
    normalize: str = "qkv",
    eps: float = 1e-4,
) -> torch.Tensor:
    """``normalized_attention`` on ADM's channels-first fused layout: qkv [B, 3*H*d, N] with
    openai's QKVAttention channel order (three, heads, d) -> [B, H*d, N]. The kernels read q, k, v
    through strides (no transposing copy) and write the gradient straight into qkv's layout."""
    _, scale, eps = check_attention_qkv(qkv, num_heads, scale, normalize, eps)
    if _use_ext(qkv):
        return torch.ops.cm_kernels.normalized_attention_qkv_fwd(qkv, num_heads, scale, normalize, eps)[0]
    return reference.normalized_attention_qkv(qkv, num_heads, scale=scale, normalize=normalize, eps=eps)


def fused_jvp(x: torch.Tensor) -> bool:
    """Whether forward-mode AD of ``normalized_attention`` on tensors like ``x`` (its device, dtype
    and head dim) runs a fused JVP kernel (the CPU one; the CUDA one when the CUDA kernels are
    built), rather than the torch-op formula of ``cm_kernels._forward_ad`` (exact too, N x N
    temporaries)."""
    if not _STATE.loaded or (x.device.type == "cuda" and not _STATE.with_cuda):
        return False
    from ._ops import _fused_jvp

    return _fused_jvp(x)


def backends() -> dict[str, dict[str, str]]:
    """{op: {"backend": "cuda-ext" | "cpu-ext" | "reference", "reason": why, "cpu_isa": the CPU
    kernels' instruction set when built}} for each public op.
    "cuda-ext" means CUDA tensors run the CUDA kernels (CPU tensors always use the CPU kernels
    when the extension is loaded)."""
    if not _STATE.loaded:
        entry = {"backend": "reference", "reason": _STATE.reason}
    elif _STATE.with_cuda and torch.cuda.is_available():
        entry = {"backend": "cuda-ext", "reason": f"{_STATE.reason}; GPU visible; CPU tensors use the CPU kernels"}
    elif _STATE.with_cuda:
        entry = {"backend": "cpu-ext", "reason": f"{_STATE.reason}, but no GPU is visible"}
    else:
        entry = {"backend": "cpu-ext", "reason": f"{_STATE.reason} ({_STATE.source} build loaded)"}
    if _STATE.loaded:
        entry["cpu_isa"] = cpu_isa()
    return {op: dict(entry) for op in _OPS}

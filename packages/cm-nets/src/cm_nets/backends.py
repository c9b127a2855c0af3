"""Multi-head attention with pluggable backends.

Every network in ``cm_nets`` calls :func:`attention` on ``[B, H, N, d]`` tensors (or
:func:`attention_qkv` on ADM's fused channels-first ``[B, 3·H·d, N]`` tensor), so one
argument, ``attention_backend``, picks the implementation everywhere:

``math``      explicit einsum + softmax in float32 (the specification; always available)
``sdpa``      ``torch.nn.functional.scaled_dot_product_attention`` (always available)
``fused``     ``cm_kernels.normalized_attention`` (cm-kernels, a dependency of cm-nets); fwd+bwd
              in one kernel, normalization ("cosine" q/k/v) fused in
``flash``     ``flash_attn.flash_attn_func`` (``pip install flash-attn``); CUDA, fp16/bf16
``xformers``  ``xformers.ops.memory_efficient_attention`` (``pip install xformers``); CUDA
``auto``      the fastest of the above that is installed and supports the call's device,
              dtype and head dim; the choice and the reason are logged once per situation.

Normalization ``normalize="qkv"`` divides each of q, k, v by ``eps + ‖·‖/√d`` per head
vector (EDM2 eq. 66's ``normalize``; iCT/BCM "cosine attention"), ``"qk"`` only q and k;
the other backends normalize with ``cm_kernels.reference.normalize_heads``, the fused kernel's spec.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math

import torch
import torch.nn.functional as F
from cm_kernels.reference import normalize_heads  # the spec the fused kernel matches

logger = logging.getLogger("cm_nets")

BACKENDS = ("auto", "math", "sdpa", "fused", "flash", "xformers")
NORMALIZE_MODES = ("none", "qk", "qkv")
_PIP = {
    "fused": "cm-kernels (a dependency of cm-nets: pip install cm-nets)",
    "flash": "flash-attn (pip install flash-attn)",
    "xformers": "xformers (pip install xformers)",
}
_FLASH_HEAD_DIMS = 256
_logged: set[tuple] = set()


@functools.cache
def _installed(backend: str) -> bool:
    if backend in ("math", "sdpa"):
        return True
    module = {"fused": "cm_kernels", "flash": "flash_attn", "xformers": "xformers"}[backend]
    return importlib.util.find_spec(module) is not None


def available_backends() -> list[str]:
    """Backends whose package is installed (device/dtype support is checked per call)."""
    return [b for b in BACKENDS[1:] if _installed(b)]


def check_backend(name: str) -> str:
    """Validate a backend name; raise if unknown or if its package is missing."""
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"attention_backend must be one of {BACKENDS}, got {name!r}")
    if name != "auto" and not _installed(name):
        raise ValueError(
            f"attention_backend={name!r} needs {_PIP[name]}, which is not installed; "
            f"installed backends: {available_backends()}"
        )
    return name


def _unsupported(backend: str, q: torch.Tensor) -> str | None:
    """Why ``backend`` cannot run this call, or None if it can."""
    d = q.shape[-1]
    if backend == "fused":
        import cm_kernels

        if d not in cm_kernels.SUPPORTED_HEAD_DIMS:
            return f"head dim {d} not in cm_kernels.SUPPORTED_HEAD_DIMS {cm_kernels.SUPPORTED_HEAD_DIMS}"
        if q.device.type == "cpu" and q.dtype == torch.float16:
            return "float16 on CPU"
        return None
    if backend in ("flash", "xformers"):
        if q.device.type != "cuda":
            return f"{backend} runs on CUDA only (tensor on {q.device.type})"
        if backend == "flash" and q.dtype not in (torch.float16, torch.bfloat16):
            return f"flash-attn needs float16/bfloat16, got {q.dtype}"
        if backend == "flash" and (d > _FLASH_HEAD_DIMS or d % 8):
            return f"flash-attn head dim must be a multiple of 8 up to {_FLASH_HEAD_DIMS}, got {d}"
    return None


def resolve_backend(backend: str, q: torch.Tensor, normalize: str = "none") -> str:
    """The concrete backend ``backend`` ("auto" or a name) uses for a query tensor like ``q``."""
    if backend != "auto":
        why = _unsupported(backend, q)
        if why is not None:
            raise ValueError(f"attention_backend={backend!r} cannot run this call: {why}")
        return backend
    key = (q.device.type, q.dtype, q.shape[-1], normalize)
    # Preference: the fused kernel when it normalizes for free (one pass instead of three
    # extra elementwise kernels) or when nothing faster is on CUDA; flash, then xformers on
    # CUDA; SDPA everywhere else (it dispatches to PyTorch's own flash/mem-efficient kernels).
    if q.device.type == "cuda":
        order = (
            ["flash", "xformers", "fused", "sdpa"] if normalize == "none" else ["fused", "flash", "xformers", "sdpa"]
        )
    else:
        # On CPU the fused kernel beats normalize+SDPA ~3x fwd+bwd (bench/RESULTS.md, cm-kernels);
        # for plain attention SDPA's own CPU flash kernel is the better default.
        order = ["fused", "sdpa"] if normalize != "none" else ["sdpa", "fused"]
    skipped = []
    for name in order:
        why = "not installed" if not _installed(name) else _unsupported(name, q)
        if why is None:
            if key not in _logged:
                _logged.add(key)
                reason = "; ".join(f"{n}: {w}" for n, w in skipped) or "first choice"
                logger.info(
                    "cm_nets attention auto -> %s for %s %s head dim %d normalize=%s (%s)",
                    name,
                    q.device.type,
                    q.dtype,
                    q.shape[-1],
                    normalize,
                    reason,
                )
            return name
        skipped.append((name, why))
    raise AssertionError("sdpa is always usable")  # pragma: no cover


def _math(q, k, v, scale):
    # Logits and softmax in float32 (openai's QKVAttention, EDM's AttentionOp), result in q's dtype.
    w = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float() * scale).softmax(dim=-1)
    return torch.einsum("bhqk,bhkd->bhqd", w, v.float()).to(q.dtype)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    backend: str = "auto",
    normalize: str = "none",
    scale: float | None = None,
    eps: float = 1e-4,
) -> torch.Tensor:
    """softmax(q̂ k̂ᵀ·scale) v̂ on ``[B, H, N, d]`` tensors; default scale 1/√d."""
    if normalize not in NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {normalize!r}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    name = resolve_backend(check_backend(backend), q, normalize)
    if name == "fused":
        import cm_kernels

        return cm_kernels.normalized_attention(q, k, v, scale=scale, normalize=normalize, eps=eps)
    if normalize != "none":
        q, k = normalize_heads(q, eps), normalize_heads(k, eps)
        if normalize == "qkv":
            v = normalize_heads(v, eps)
    if name == "math":
        return _math(q, k, v, scale)
    if name == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    if name == "flash":
        from flash_attn import flash_attn_func

        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale)
        return out.transpose(1, 2)
    from xformers.ops import memory_efficient_attention

    out = memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2)


QKV_LAYOUTS = ("three_heads_d", "heads_d_three")


def attention_qkv(
    qkv: torch.Tensor,
    num_heads: int,
    *,
    layout: str = "three_heads_d",
    backend: str = "auto",
    normalize: str = "none",
    eps: float = 1e-4,
) -> torch.Tensor:
    """Self-attention on a fused channels-first ``qkv [B, 3·H·d, N]`` → ``[B, H·d, N]``.

    ``layout`` is the channel order of the 3·H·d axis: ``"three_heads_d"`` is openai's
    ``QKVAttention``/flash order (what openai, iCT and BCM checkpoints hold);
    ``"heads_d_three"`` is EDM's and EDM2's (``reshape(B·H, d, 3, N)``). Scale 1/√d (openai
    applies 1/√√d to both q and k: the same product)."""
    if layout not in QKV_LAYOUTS:
        raise ValueError(f"layout must be one of {QKV_LAYOUTS}, got {layout!r}")
    B, C3, N = qkv.shape
    if C3 % (3 * num_heads):
        raise ValueError(f"qkv has {C3} channels, not divisible by 3·num_heads = {3 * num_heads}")
    d = C3 // (3 * num_heads)
    if layout == "three_heads_d":
        if backend in ("auto", "fused"):
            probe = qkv.new_empty((1, 1, 1, d))
            if check_backend(backend) == "fused" or resolve_backend(backend, probe, normalize) == "fused":
                import cm_kernels

                return cm_kernels.normalized_attention_qkv(qkv, num_heads, normalize=normalize, eps=eps)
        q, k, v = qkv.view(B, 3, num_heads, d, N).transpose(-1, -2).unbind(1)
    else:
        q, k, v = qkv.view(B, num_heads, d, 3, N).permute(3, 0, 1, 4, 2).unbind(0)
    out = attention(q, k, v, backend=backend, normalize=normalize, eps=eps)  # [B, H, N, d]
    return out.transpose(-1, -2).reshape(B, num_heads * d, N)

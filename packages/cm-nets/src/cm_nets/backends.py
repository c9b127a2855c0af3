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
``auto``      the measured-fastest of the above that is installed and supports the call's
              device, dtype and head dim (:func:`auto_choice`: a rule per device, CPU
              instruction set, dtype and normalization, each entry backed by
              ``tools/bench/kernels.py`` figures in bench/RESULTS.md); the choice and the reason
              are logged once per situation and listed by ``cm info``.

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
    return _unsupported_for(backend, q.device.type, q.dtype, q.shape[-1])


def _unsupported_for(backend: str, device_type: str, dtype: torch.dtype, d: int) -> str | None:
    if backend == "fused":
        import cm_kernels

        if d not in cm_kernels.SUPPORTED_HEAD_DIMS:
            return f"head dim {d} not in cm_kernels.SUPPORTED_HEAD_DIMS {cm_kernels.SUPPORTED_HEAD_DIMS}"
        return None
    if backend in ("flash", "xformers"):
        if device_type != "cuda":
            return f"{backend} runs on CUDA only (tensor on {device_type})"
        if backend == "flash" and dtype not in (torch.float16, torch.bfloat16):
            return f"flash-attn needs float16/bfloat16, got {dtype}"
        if backend == "flash" and (d > _FLASH_HEAD_DIMS or d % 8):
            return f"flash-attn head dim must be a multiple of 8 up to {_FLASH_HEAD_DIMS}, got {d}"
    return None


# Where the fused kernel is measured faster than normalize + SDPA on the CPU, per instruction set
# of the cm_kernels CPU build in use (cm_kernels.cpu_isa()) and dtype, for (normalized, plain)
# attention. Figures: bench/RESULTS.md, "cm-kernels" (fwd+bwd, B*H*N = 8192, N 64..1024, d 32..128;
# the AVX2 and baseline builds were run on the AVX-512 machine with CM_KERNELS_ISA, i.e. against an
# SDPA that used AVX-512, so their entries are conservative). float64 always takes SDPA (the fused
# kernel's float64 path is the plain one that exists for exactness, not speed).
_CPU_FUSED_FASTER = {
    # isa: {dtype: (normalized, plain)}
    "avx512": {torch.float32: (True, True), torch.bfloat16: (True, True), torch.float16: (True, True)},
    "avx2": {torch.float32: (True, False), torch.bfloat16: (False, False), torch.float16: (True, True)},
    "base": {torch.float32: (False, False), torch.bfloat16: (False, False), torch.float16: (True, True)},
}
_CPU_FIGURES = {
    ("avx512", True): "1.7-5.7x fwd+bwd",
    ("avx512", False): "1.8x fwd+bwd on plain attention",
    ("avx2", True): "float32 1.2-1.8x, bfloat16 1.0-3.2x, float16 3.5-8.6x fwd+bwd, against SDPA using AVX-512",
    ("avx2", False): "plain attention: float32 0.9x against SDPA using AVX-512; float16 5x",
    ("base", True): "float32 0.5-0.9x, bfloat16 0.3-1.5x, float16 2.1-3.2x fwd+bwd (SSE2 build)",
    ("base", False): "plain attention: float32/bfloat16 0.4x, float16 2x (SSE2 build)",
}


def _cpu_isa() -> str:
    try:
        import cm_kernels

        return cm_kernels.cpu_isa()
    except Exception:  # noqa: BLE001  a broken build: the reference, never faster
        return "reference"


def _fused_cpu_verdict(dtype: torch.dtype, head_dim: int, normalize: str) -> str | None:
    """None when the fused kernel is the measured-faster CPU choice for this call, else why not."""
    import cm_kernels

    isa = _cpu_isa()
    if isa == "reference":
        return "cm_kernels' compiled extension is not loaded (pure-PyTorch reference only)"
    if dtype == torch.float64:
        return "float64: the fused kernel's float64 path is the exact, unblocked one"
    if head_dim not in cm_kernels.SUPPORTED_HEAD_DIMS or head_dim % 16:
        return f"head dim {head_dim}: no blocked CPU kernel (multiples of 16 in {cm_kernels.SUPPORTED_HEAD_DIMS})"
    faster = _CPU_FUSED_FASTER.get(isa, {}).get(dtype)
    if faster is None:
        return f"{dtype} not measured on CPU"
    normalized = normalize != "none"
    if not faster[0 if normalized else 1]:
        return f"not faster with the {isa} CPU kernels here ({_CPU_FIGURES[(isa, normalized)]})"
    return None


def auto_choice(device_type: str, dtype: torch.dtype, head_dim: int, normalize: str = "none") -> tuple[str, str]:
    """(backend, reason) that ``auto`` picks for a call on ``device_type`` ("cpu" | "cuda") with
    this dtype, head dim and normalization. The fused kernel is chosen only where it is measured
    faster than the alternative (see _CPU_FUSED_FASTER); on CUDA flash-attn, xformers, then SDPA
    (PyTorch's flash/memory-efficient kernels): the fused CUDA kernel has not been measured
    against them on a GPU yet, so auto does not pick it (``attention_backend="fused"`` still can)."""
    if device_type == "cuda":
        skipped = ["fused: not yet measured faster than flash/SDPA on a GPU (tools/gpu_check.sh)"]
        for name in ("flash", "xformers"):
            why = "not installed" if not _installed(name) else _unsupported_for(name, "cuda", dtype, head_dim)
            if why is None:
                return name, "; ".join(skipped) or "first choice"
            skipped.append(f"{name}: {why}")
        return "sdpa", "; ".join(skipped)
    if device_type == "cpu":
        why = "not installed" if not _installed("fused") else _fused_cpu_verdict(dtype, head_dim, normalize)
        if why is None:
            figures = _CPU_FIGURES.get((_cpu_isa(), normalize != "none"), "")
            return "fused", f"measured faster than SDPA with the {_cpu_isa()} CPU kernels ({figures})"
        return "sdpa", f"fused: {why}"
    return "sdpa", f"{device_type}: SDPA is the portable choice"


def resolve_backend(backend: str, q: torch.Tensor, normalize: str = "none") -> str:
    """The concrete backend ``backend`` ("auto" or a name) uses for a query tensor like ``q``."""
    if backend != "auto":
        why = _unsupported(backend, q)
        if why is not None:
            raise ValueError(f"attention_backend={backend!r} cannot run this call: {why}")
        return backend
    key = (q.device.type, q.dtype, q.shape[-1], normalize)
    name, reason = auto_choice(q.device.type, q.dtype, q.shape[-1], normalize)
    if key not in _logged:
        _logged.add(key)
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


def forward_ad_active(x: torch.Tensor) -> bool:
    """True inside ``torch.func`` transforms (``jvp`` among them) or on a forward-mode dual tensor."""
    from torch._C import _functorch

    if _functorch.is_functorch_wrapped_tensor(x):
        return True
    import torch.autograd.forward_ad as fwAD

    return fwAD.unpack_dual(x).tangent is not None


def _has_forward_ad(name: str) -> bool:
    """Whether a backend differentiates in forward mode: math is plain torch ops; the fused kernel has
    its own forward-mode rule (cm_kernels.FORWARD_AD); SDPA's fused CPU/CUDA kernels, flash-attn and
    xformers have none (pytorch#128971, flash-attention#1672)."""
    if name == "math":
        return True
    if name == "fused":
        import cm_kernels

        return bool(getattr(cm_kernels, "FORWARD_AD", False))
    return False


def _fused_jvp_here(q: torch.Tensor) -> bool:
    """The fused kernel's one-pass CPU JVP covers this call (``cm_kernels.fused_jvp``): measured
    3.35x/3.75x faster than torch.func.jvp of normalize + math attention with 19x less memory
    (bench/RESULTS.md, "JVP"). CUDA keeps math until tools/gpu_check.sh has measured the CUDA JVP kernel."""
    if q.device.type != "cpu" or not _installed("fused") or _unsupported("fused", q) is not None:
        return False
    import cm_kernels

    return bool(getattr(cm_kernels, "FORWARD_AD", False)) and cm_kernels.fused_jvp(q)


def _forward_ad_backend(name: str, q: torch.Tensor) -> str:
    """``name``, or a backend with a forward-mode rule when a JVP runs through attention and
    ``name`` has none: the fused kernel where its fused CPU JVP covers the call, else math (said
    once per backend and replacement)."""
    if _has_forward_ad(name) or not forward_ad_active(q):
        return name
    instead = "fused" if _fused_jvp_here(q) else "math"
    key = ("forward-ad", name, instead)
    if key not in _logged:
        _logged.add(key)
        logger.warning(
            "cm_nets attention: forward-mode AD (a JVP) runs through attention and backend %s has no forward-mode "
            "rule; using %s for these calls",
            name,
            "fused (cm_kernels' one-pass JVP kernel)" if instead == "fused" else "math (explicit softmax)",
        )
    return instead


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
    name = _forward_ad_backend(resolve_backend(check_backend(backend), q, normalize), q)
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
            chosen = "fused" if check_backend(backend) == "fused" else resolve_backend(backend, probe, normalize)
            if _forward_ad_backend(chosen, qkv) == "fused":
                import cm_kernels

                return cm_kernels.normalized_attention_qkv(qkv, num_heads, normalize=normalize, eps=eps)
        q, k, v = qkv.view(B, 3, num_heads, d, N).transpose(-1, -2).unbind(1)
    else:
        q, k, v = qkv.view(B, num_heads, d, 3, N).permute(3, 0, 1, 4, 2).unbind(0)
    out = attention(q, k, v, backend=backend, normalize=normalize, eps=eps)  # [B, H, N, d]
    return out.transpose(-1, -2).reshape(B, num_heads * d, N)

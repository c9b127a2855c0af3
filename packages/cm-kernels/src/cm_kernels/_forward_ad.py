"""Forward-mode AD (Jacobian-vector products) of the cm_kernels ops, in torch ops.

The exact tangent formulas, differentiated by hand from ``cm_kernels.reference`` (the spec):

    x_hat = x f,  f = 1 / (eps + rms),  rms = ||x|| / sqrt(d)                          (EDM2 eq. 14)
    d(x_hat) = f dx - f^2 (x . dx) / (d rms) x         (the second term 0 at x = 0, the subgradient
                                                        torch.linalg.vector_norm takes there)
    S = scale q_hat k_hat^T,  p = softmax(S),  O = p v_hat
    dS = scale (d(q_hat) k_hat^T + q_hat d(k_hat)^T)
    dO = p d(v_hat) + (p o (dS - rowsum(p o dS))) v_hat
    pseudo-Huber l = sqrt(||x - y||^2 + c^2) - c:  dl = (x - y) . (dx - dy) / (l + c)

These run where the fused CPU kernel does not (float64, CUDA, head dims not a multiple of 16) and
for second-order forward mode (a JVP of a JVP), where torch differentiates them once more. Also
the helpers that find forward-mode tangents on an op's inputs inside its Autograd kernel
(``_ops.py``); both torch.func.jvp (functorch wrappers) and torch.autograd.forward_ad dual
tensors carry them at dual level 0, the only one torch supports (no nested forward-AD levels).
"""

from __future__ import annotations

import math

import torch
import torch.autograd.forward_ad as fwAD

from .reference import split_qkv

_LEVEL = 0  # torch has one forward-AD level ("Nested forward mode AD is not supported")


def forward_ad_possible(*xs: torch.Tensor) -> bool:
    """Cheap test whether any of xs may carry a tangent: a dual level entered from Python
    (forward_ad.dual_level, torch.func.jvp), functorch transforms, or tensor subclasses (fake and
    functional tensors while torch.compile traces, where levels are entered without Python's
    bookkeeping). The exact test (``tangents``) costs ~5 us per tensor, so it runs only then."""
    if not torch._C._is_fwd_grad_enabled():
        return False
    if forward_ad_level_active() or torch._C._are_functorch_transforms_active():
        return True
    return any(type(x) is not torch.Tensor for x in xs if isinstance(x, torch.Tensor))


def forward_ad_level_active() -> bool:
    """A dual level entered from Python is open (torch.autograd.forward_ad.dual_level, torch.func.jvp)."""
    return fwAD._current_level >= 0


def tangents(*xs: torch.Tensor) -> list[torch.Tensor | None] | None:
    """The forward-mode tangents of xs (None where a tensor has none), or None if none has one."""
    if not forward_ad_possible(*xs):
        return None
    ts = [torch._VF._unpack_dual(x, level=_LEVEL)[1] for x in xs]
    return ts if any(t is not None for t in ts) else None


def primals(*xs: torch.Tensor) -> list[torch.Tensor]:
    """xs without their tangents (views that keep reverse-mode history)."""
    return [torch._VF._unpack_dual(x, level=_LEVEL)[0] for x in xs]


def dense_tangents(ts: list[torch.Tensor | None], ps: list[torch.Tensor]) -> list[torch.Tensor]:
    """Missing (or efficient-zero) tangents as zeros, every tangent in its primal's dtype."""
    out = []
    for t, p in zip(ts, ps):
        if t is None or t._is_zerotensor():
            t = torch.zeros_like(p)
        out.append(t.to(p.dtype))
    return out


def with_tangent(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch._VF._make_dual(x, t, level=_LEVEL)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def normalize_heads_jvp(x: torch.Tensor, t: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_hat, d(x_hat)) for ``reference.normalize_heads`` in x's precision (callers widen halves)."""
    d = x.shape[-1]
    rms = torch.linalg.vector_norm(x, dim=-1, keepdim=True) / math.sqrt(d)
    f = 1.0 / (eps + rms)
    safe = torch.where(rms > 0, rms, torch.ones_like(rms))  # no 0/0 in the branch where() drops
    coef = torch.where(rms > 0, f * f * (x * t).sum(-1, keepdim=True) / (d * safe), torch.zeros_like(rms))
    return x * f, f * t - coef * x


def attention_jvp(q, k, v, tq, tk, tv, scale: float, normalize: str, eps: float):
    """(out, logsumexp, tangent of out) of ``reference.normalized_attention`` on [B, H, N, d]:
    the formula of the module docstring, accumulated in float32 (float64 for float64); out and its
    tangent in the input dtype, the logsumexp in the accumulation dtype (as the forward op's)."""
    dtype, acc = q.dtype, _acc(q.dtype)
    q, k, v, tq, tk, tv = (x.to(acc) for x in (q, k, v, tq, tk, tv))
    if normalize in ("qk", "qkv"):
        q, tq = normalize_heads_jvp(q, tq, eps)
        k, tk = normalize_heads_jvp(k, tk, eps)
    if normalize == "qkv":
        v, tv = normalize_heads_jvp(v, tv, eps)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1))
    out = torch.matmul(p, v)
    ds = (torch.matmul(tq, k.transpose(-1, -2)) + torch.matmul(q, tk.transpose(-1, -2))) * scale
    pds = p * ds
    tout = torch.matmul(p, tv) + torch.matmul(pds, v) - pds.sum(-1, keepdim=True) * out
    return out.to(dtype), lse, tout.to(dtype)


def _channels_first(x: torch.Tensor) -> torch.Tensor:
    """[B, H, N, d] -> [B, H*d, N] (openai's QKVAttention output layout)."""
    B, H, N, d = x.shape
    return x.transpose(-1, -2).reshape(B, H * d, N)


def attention_qkv_jvp(qkv, tqkv, num_heads: int, scale: float, normalize: str, eps: float):
    """``attention_jvp`` on ADM's channels-first [B, 3*H*d, N] layout -> out, lse, tangent [B, H*d, N]."""
    out, lse, tout = attention_jvp(*split_qkv(qkv, num_heads), *split_qkv(tqkv, num_heads), scale, normalize, eps)
    return _channels_first(out), lse, _channels_first(tout)


def pseudo_huber_jvp(pred, target, loss, tpred, ttarget, c: float) -> torch.Tensor:
    """Tangent of the per-sample loss [B] (float32 for half inputs, as the loss)."""
    acc = loss.dtype
    diff = (pred.to(acc) - target.to(acc)).flatten(1)
    return (diff * (tpred.to(acc) - ttarget.to(acc)).flatten(1)).sum(1) / (loss + c)

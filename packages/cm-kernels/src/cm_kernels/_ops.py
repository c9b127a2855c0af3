"""Autograd and fake (meta) registrations for the C++ ops declared in csrc/ops.cpp, so they
work under torch.compile and pass torch.library.opcheck. Imported only once the ops exist."""

from __future__ import annotations

import torch

_ops = torch.ops.cm_kernels


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- fake implementations: shapes, dtypes and (contiguous) strides of the real outputs ----


@torch.library.register_fake("cm_kernels::pseudo_huber_fwd")
def _(pred, target, c):
    return pred.new_empty((pred.shape[0],), dtype=_acc(pred.dtype))


@torch.library.register_fake("cm_kernels::pseudo_huber_bwd")
def _(grad_loss, pred, target, loss, c):
    return pred.new_empty(pred.shape)


@torch.library.register_fake("cm_kernels::normalized_attention_fwd")
def _(q, k, v, scale, normalize, eps):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=_acc(q.dtype))


@torch.library.register_fake("cm_kernels::normalized_attention_bwd")
def _(grad_out, q, k, v, out, lse, scale, normalize, eps):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@torch.library.register_fake("cm_kernels::normalized_attention_qkv_fwd")
def _(qkv, num_heads, scale, normalize, eps):
    B, C, N = qkv.shape
    return qkv.new_empty((B, C // 3, N)), qkv.new_empty((B, num_heads, N), dtype=_acc(qkv.dtype))


@torch.library.register_fake("cm_kernels::normalized_attention_qkv_bwd")
def _(grad_out, qkv, out, lse, num_heads, scale, normalize, eps):
    return qkv.new_empty(qkv.shape)


# ---- autograd: forward saves inputs plus the small per-row statistic, backward is one op ----


def _ph_setup(ctx, inputs, output):
    pred, target, c = inputs
    ctx.save_for_backward(pred, target, output)  # output = per-sample loss: the only statistic
    ctx.c = c


def _ph_backward(ctx, grad_loss):
    pred, target, loss = ctx.saved_tensors
    grad = _ops.pseudo_huber_bwd(grad_loss, pred, target, loss, ctx.c)
    grad_pred = grad if ctx.needs_input_grad[0] else None
    grad_target = -grad if ctx.needs_input_grad[1] else None  # d/d target = -d/d pred
    return grad_pred, grad_target, None


def _attn_setup(ctx, inputs, output):
    q, k, v, scale, normalize, eps = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.args = (scale, normalize, eps)


def _attn_backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _ops.normalized_attention_bwd(grad_out, q, k, v, out, lse, *ctx.args)
    need = ctx.needs_input_grad
    return (dq if need[0] else None, dk if need[1] else None, dv if need[2] else None, None, None, None)


def _qkv_setup(ctx, inputs, output):
    qkv, num_heads, scale, normalize, eps = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(qkv, out, lse)
    ctx.args = (num_heads, scale, normalize, eps)


def _qkv_backward(ctx, grad_out, _grad_lse):
    qkv, out, lse = ctx.saved_tensors
    return _ops.normalized_attention_qkv_bwd(grad_out, qkv, out, lse, *ctx.args), None, None, None, None


torch.library.register_autograd("cm_kernels::pseudo_huber_fwd", _ph_backward, setup_context=_ph_setup)
torch.library.register_autograd("cm_kernels::normalized_attention_fwd", _attn_backward, setup_context=_attn_setup)
torch.library.register_autograd("cm_kernels::normalized_attention_qkv_fwd", _qkv_backward, setup_context=_qkv_setup)

"""Autograd and fake (meta) registrations for the C++ ops declared in csrc/ops.cpp, so they
work under torch.compile and pass torch.library.opcheck. Imported only once the ops exist.

Each op's Autograd kernel handles both modes of AD:
  reverse   the kernel ``torch.library.register_autograd`` would install (torch's
            ``make_autograd_impl``): the forward saves its inputs and the per-row statistic, the
            backward is one fused op.
  forward   (torch.func.jvp, torch.autograd.forward_ad) the tangent rule. register_autograd's
            kernel alone cannot do this: it takes the autograd path only for inputs that require
            grad, so forward-mode tangents were dropped and came out as silent zeros. Here the
            kernel looks for tangents first; the attention ops then run their JVP (the fused CPU
            or CUDA kernel, or the torch-op formula of ``_forward_ad``) and return the output as a dual
            tensor; pseudo_huber_fwd adds its tangent in torch ops; the backward ops refuse with an
            error that names them (forward-over-reverse is not implemented).
The tangent rules sit in the kernels rather than in autograd.Function.jvp on the Python wrappers
because Dynamo cannot trace an autograd.Function with a custom jvp (a graph break under
fullgraph=True), while ops with Python Autograd kernels compile as before, and under
torch.func.jvp of a compiled function too.
"""

from __future__ import annotations

import torch
from torch._library.autograd import Info, make_autograd_impl  # the kernel register_autograd builds

from . import _forward_ad as fad

_ops = torch.ops.cm_kernels
_LIB = torch.library.Library("cm_kernels", "IMPL")  # keeps the Autograd kernels registered


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


@torch.library.register_fake("cm_kernels::normalized_attention_jvp")
def _(q, k, v, tq, tk, tv, scale, normalize, eps):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32), q.new_empty(q.shape)


@torch.library.register_fake("cm_kernels::normalized_attention_qkv_jvp")
def _(qkv, tqkv, num_heads, scale, normalize, eps):
    B, C, N = qkv.shape
    out = (B, C // 3, N)
    return qkv.new_empty(out), qkv.new_empty((B, num_heads, N), dtype=torch.float32), qkv.new_empty(out)


# ---- reverse mode: forward saves inputs plus the small per-row statistic, backward is one op ----


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


# The JVP ops return (out, lse, tangent). out's gradient is the attention backward (one fused op);
# the tangent's (rarely wanted: sCM and MeanFlow stop gradients at the tangent) comes from
# differentiating the torch-op formula, recomputed only when some loss uses the tangent.


def _vjp(fn, primals, cotangent):
    return torch.func.vjp(fn, *primals)[1](cotangent)


def _add(a, b):
    return [y if x is None else x if y is None else x + y for x, y in zip(a, b)]


def _refuse_forward_over_reverse(name: str) -> None:
    """The JVP paths save primals stripped of their tangents, so a backward that builds a graph
    (create_graph=True) inside a forward-AD dual level, i.e. forward-over-reverse, would drop the
    tangents' contribution silently: refuse it instead."""
    if torch.is_grad_enabled() and fad.forward_ad_level_active():
        raise RuntimeError(
            f"cm_kernels.{name}: forward-over-reverse AD (a backward with create_graph=True inside a "
            "forward-mode dual level, e.g. a Hessian-vector product) is not implemented; first-order "
            f"forward and reverse mode are. Use cm_kernels.reference.{name} (plain torch ops) for it."
        )


def _jvp_setup(ctx, inputs, output):
    *tensors, scale, normalize, eps = inputs
    out, lse, _ = output
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # None (not zeros) for an unused output: skip its part
    ctx.save_for_backward(*tensors, out, lse)
    ctx.args = (scale, normalize, eps)


def _jvp_backward(ctx, grad_out, _grad_lse, grad_tout):
    _refuse_forward_over_reverse("normalized_attention")
    q, k, v, tq, tk, tv, out, lse = ctx.saved_tensors
    grads = [None] * 6
    if grad_out is not None:
        grads[:3] = _ops.normalized_attention_bwd(grad_out, q, k, v, out, lse, *ctx.args)
    if grad_tout is not None:
        tangent = lambda *x: fad.attention_jvp(*x, *ctx.args)[2]  # noqa: E731
        grads = _add(grads, _vjp(tangent, (q, k, v, tq, tk, tv), grad_tout))
    return (*(g if need else None for g, need in zip(grads, ctx.needs_input_grad)), None, None, None)


def _qkv_jvp_setup(ctx, inputs, output):
    qkv, tqkv, num_heads, scale, normalize, eps = inputs
    out, lse, _ = output
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(qkv, tqkv, out, lse)
    ctx.args = (num_heads, scale, normalize, eps)


def _qkv_jvp_backward(ctx, grad_out, _grad_lse, grad_tout):
    _refuse_forward_over_reverse("normalized_attention_qkv")
    qkv, tqkv, out, lse = ctx.saved_tensors
    grads = [None, None]
    if grad_out is not None:
        grads[0] = _ops.normalized_attention_qkv_bwd(grad_out, qkv, out, lse, *ctx.args)
    if grad_tout is not None:
        tangent = lambda *x: fad.attention_qkv_jvp(*x, *ctx.args)[2]  # noqa: E731
        grads = _add(grads, _vjp(tangent, (qkv, tqkv), grad_tout))
    return (*(g if need else None for g, need in zip(grads, ctx.needs_input_grad)), None, None, None, None)


def _ph_backward_in_jvp(ctx, grad_loss):
    _refuse_forward_over_reverse("pseudo_huber_loss")
    return _ph_backward(ctx, grad_loss)


def _reverse(name, backward, setup_context):
    return make_autograd_impl(getattr(_ops, name).default, Info(backward, setup_context))


# ---- the Autograd kernels: forward-mode tangents first, else reverse mode as above ----


_CUDA_HEAD_DIMS = (16, 32, 64, 96, 128)  # csrc/cuda/attention.cu: cmk_attn_head_dim_supported


def _fused_jvp(x: torch.Tensor) -> bool:
    """A fused JVP kernel covers this input (else the torch-op formula runs): the CPU one for head
    dims a multiple of 16, the CUDA one (reached only when the CUDA kernels are built: the Python
    wrappers send CUDA tensors here only then) for the forward's head dims; neither for float64."""
    if x.dtype == torch.float64:
        return False
    if x.device.type == "cpu":
        return x.shape[-1] % 16 == 0
    return x.device.type == "cuda" and x.shape[-1] in _CUDA_HEAD_DIMS


_ph_reverse = _reverse("pseudo_huber_fwd", _ph_backward, _ph_setup)
_ph_reverse_in_jvp = _reverse("pseudo_huber_fwd", _ph_backward_in_jvp, _ph_setup)
_attn_reverse = _reverse("normalized_attention_fwd", _attn_backward, _attn_setup)
_qkv_reverse = _reverse("normalized_attention_qkv_fwd", _qkv_backward, _qkv_setup)
_jvp_reverse = _reverse("normalized_attention_jvp", _jvp_backward, _jvp_setup)
_qkv_jvp_reverse = _reverse("normalized_attention_qkv_jvp", _qkv_jvp_backward, _qkv_jvp_setup)


def _pseudo_huber_kernel(keyset, pred, target, c):
    ts = fad.tangents(pred, target)
    if ts is None:
        return _ph_reverse(keyset, pred, target, c)
    ps = fad.primals(pred, target)
    loss = _ph_reverse_in_jvp(keyset, *ps, c)  # reverse mode at this level, if any, as above
    return fad.with_tangent(loss, fad.pseudo_huber_jvp(*ps, loss, *fad.dense_tangents(ts, ps), c))


def _attention_kernel(keyset, q, k, v, scale, normalize, eps):
    ts = fad.tangents(q, k, v)
    if ts is None:
        return _attn_reverse(keyset, q, k, v, scale, normalize, eps)
    ps = fad.primals(q, k, v)
    ts = fad.dense_tangents(ts, ps)
    if _fused_jvp(ps[0]):
        out, lse, tout = _ops.normalized_attention_jvp(*ps, *ts, scale, normalize, eps)
    else:
        out, lse, tout = fad.attention_jvp(*ps, *ts, scale, normalize, eps)
    return fad.with_tangent(out, tout), lse.detach()


def _attention_qkv_kernel(keyset, qkv, num_heads, scale, normalize, eps):
    ts = fad.tangents(qkv)
    if ts is None:
        return _qkv_reverse(keyset, qkv, num_heads, scale, normalize, eps)
    (p,) = fad.primals(qkv)
    (t,) = fad.dense_tangents(ts, [p])
    jvp = _ops.normalized_attention_qkv_jvp if _fused_jvp(p) else fad.attention_qkv_jvp
    out, lse, tout = jvp(p, t, num_heads, scale, normalize, eps)
    return fad.with_tangent(out, tout), lse.detach()


def _attention_jvp_kernel(keyset, q, k, v, tq, tk, tv, scale, normalize, eps):
    if fad.tangents(q, k, v, tq, tk, tv) is not None:  # a JVP of the JVP: torch differentiates the formula
        out, lse, tout = fad.attention_jvp(q, k, v, tq, tk, tv, scale, normalize, eps)
        return out, lse.detach(), tout
    return _jvp_reverse(keyset, q, k, v, tq, tk, tv, scale, normalize, eps)


def _attention_qkv_jvp_kernel(keyset, qkv, tqkv, num_heads, scale, normalize, eps):
    if fad.tangents(qkv, tqkv) is not None:
        out, lse, tout = fad.attention_qkv_jvp(qkv, tqkv, num_heads, scale, normalize, eps)
        return out, lse.detach(), tout
    return _qkv_jvp_reverse(keyset, qkv, tqkv, num_heads, scale, normalize, eps)


def _backward_op_kernel(name: str, of: str):
    """The backward ops: no forward-mode rule and no backward of their own; both refuse by name
    (before this kernel, forward mode gave zeros and a double backward zeros with a warning)."""
    ref = f"cm_kernels.reference.{of}"

    def double_backward(ctx, *grads):
        raise RuntimeError(
            f"cm_kernels::{name} (the backward of cm_kernels.{of}) has no backward formula: double backward "
            f"(gradients of gradients) through cm_kernels.{of} is not implemented; use {ref} (plain torch ops) "
            "where second derivatives are needed"
        )

    reverse = _reverse(name, double_backward, None)

    def kernel(keyset, *args):
        if fad.tangents(*(a for a in args if isinstance(a, torch.Tensor))) is not None:
            raise RuntimeError(
                f"cm_kernels::{name} (the backward of cm_kernels.{of}) has no forward-mode AD rule: "
                "forward-over-reverse derivatives (a JVP of a gradient, Hessian-vector products) are not "
                f"implemented; use {ref} (plain torch ops) for them. Forward mode of cm_kernels.{of} itself "
                "(torch.func.jvp, torch.autograd.forward_ad) is supported."
            )
        return reverse(keyset, *args)

    return kernel


for _name, _kernel in {
    "pseudo_huber_fwd": _pseudo_huber_kernel,
    "normalized_attention_fwd": _attention_kernel,
    "normalized_attention_qkv_fwd": _attention_qkv_kernel,
    "normalized_attention_jvp": _attention_jvp_kernel,
    "normalized_attention_qkv_jvp": _attention_qkv_jvp_kernel,
    "pseudo_huber_bwd": _backward_op_kernel("pseudo_huber_bwd", "pseudo_huber_loss"),
    "normalized_attention_bwd": _backward_op_kernel("normalized_attention_bwd", "normalized_attention"),
    "normalized_attention_qkv_bwd": _backward_op_kernel("normalized_attention_qkv_bwd", "normalized_attention_qkv"),
}.items():
    # compiler.disable: when torch.compile falls back to eager around an op (e.g. for dual-tensor
    # inputs, which it refuses to trace), Dynamo would otherwise compile this Python kernel as a
    # frame of its own, tracing tensors that have lost their tangents.
    _LIB.impl(_name, torch.compiler.disable(_kernel), "Autograd", with_keyset=True)

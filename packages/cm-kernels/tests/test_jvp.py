"""Forward-mode AD (JVPs) of the cm_kernels ops against torch.func.jvp of the float64 reference.

Continuous-time consistency objectives (sCM, MeanFlow) differentiate networks with torch.func.jvp;
before issue 16 every op here returned an all-zero tangent there (an op registered with
torch.library.register_autograd drops forward-mode tangents). The truth is always
``torch.func.jvp`` of ``cm_kernels.reference`` (plain torch ops) evaluated in float64.
"""

import math

import cm_kernels
import pytest
import torch
import torch.autograd.forward_ad as fwAD
from cm_kernels import reference

MODES = ["none", "qk", "qkv"]
ISAS = ["avx512", "avx2", "base"]

pytestmark = pytest.mark.skipif(
    cm_kernels.backends()["normalized_attention"]["backend"] == "reference",
    reason="compiled cm_kernels extension not loaded (the reference is differentiated by torch itself)",
)


@pytest.fixture(params=ISAS)
def isa(request):
    """Run the CPU kernels with one ISA (skipped where the CPU lacks it), then back to "auto"."""
    try:
        assert cm_kernels.set_cpu_isa(request.param) == request.param
    except ValueError as e:
        cm_kernels.set_cpu_isa("auto")
        pytest.skip(f"this CPU cannot run the {request.param} kernels: {e}")
    try:
        yield request.param
    finally:
        cm_kernels.set_cpu_isa("auto")


def _draw(B, H, Nq, Nk, d, seed):
    """q, k, v and their tangents tq, tk, tv in float64."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Nq, d, generator=g, dtype=torch.float64) * 2
    k = torch.randn(B, H, Nk, d, generator=g, dtype=torch.float64) * 2
    v = torch.randn(B, H, Nk, d, generator=g, dtype=torch.float64)
    tangents = [torch.randn(x.shape, generator=g, dtype=torch.float64) for x in (q, k, v)]
    return (q, k, v), tuple(tangents)


def _jvp(fn, primals, tangents):
    return torch.func.jvp(fn, tuple(primals), tuple(tangents))


def _attn(impl, **kw):
    return lambda q, k, v: impl(q, k, v, **kw)


def _truth(primals, tangents, **kw):
    """torch.func.jvp of the reference in float64 on the (already rounded) inputs."""
    fn = _attn(reference.normalized_attention, **kw)
    return _jvp(fn, [x.double() for x in primals], [t.double() for t in tangents])


def _dual_forward(fn, primals, tangents):
    """fn on torch.autograd.forward_ad dual tensors -> (primal out, tangent out)."""
    with fwAD.dual_level():
        out = fn(*(fwAD.make_dual(p, t) for p, t in zip(primals, tangents)))
        primal, tangent = fwAD.unpack_dual(out)
        return primal.clone(), tangent.clone()


FP32 = dict(rtol=2e-4, atol=2e-5)  # as tests/test_attention.py and test_isa.py
FP64 = dict(rtol=1e-9, atol=1e-11)


def _assert_matches(got, truth, dtype, baseline=None, what=""):
    """fp32/fp64: tolerances above. Halves: the error against the float64 truth at most twice
    that of torch.func.jvp of the reference run in the same half dtype (``baseline``)."""
    for name, a, t in zip(("out", "tangent"), got, truth):
        assert a.dtype == dtype, (what, name, a.dtype)
        if dtype in (torch.float32, torch.float64):
            tol = FP32 if dtype == torch.float32 else FP64
            torch.testing.assert_close(a.double(), t, **tol, msg=lambda m, n=name: f"{what} {n}: {m}")
    if dtype in (torch.float16, torch.bfloat16):
        for name, a, r, t in zip(("out", "tangent"), got, baseline, truth):
            err, err_ref = (a.double() - t).abs().max().item(), (r.double() - t).abs().max().item()
            assert err <= 2 * err_ref + 1e-6, (what, name, err, err_ref)


# --------------------------------------------------------------------------------------------
# The bug this fixes


def test_tangent_is_no_longer_silently_zero():
    (q, k, v), (tq, tk, tv) = _draw(1, 2, 8, 8, 16, seed=0)
    q, k, v, tq, tk, tv = (x.float() for x in (q, k, v, tq, tk, tv))
    _, tangent = _jvp(cm_kernels.normalized_attention, (q, k, v), (tq, tk, tv))
    assert tangent.abs().max() > 0.1
    _, truth = _truth((q, k, v), (tq, tk, tv))
    torch.testing.assert_close(tangent.double(), truth, **FP32)
    with fwAD.dual_level():
        out = cm_kernels.normalized_attention(fwAD.make_dual(q, tq), k, v)
        assert fwAD.unpack_dual(out).tangent is not None  # was None: the tangent was dropped
    p, t = torch.randn(3, 5), torch.randn(3, 5)
    _, dloss = _jvp(lambda a: cm_kernels.pseudo_huber_loss(a, t, 0.1, reduction="none"), (p,), (torch.randn(3, 5),))
    assert dloss.abs().min() > 0  # was all zeros


# --------------------------------------------------------------------------------------------
# Attention: the grid (shapes, normalize modes, dtypes) against the float64 reference's JVP

SHAPES = [  # B, H, Nq, Nk, d: tails of the 16/32/64-key tiles and of the 48-row strip, Nq != Nk
    (1, 1, 1, 7, 16),
    (2, 3, 37, 37, 32),
    (1, 2, 65, 100, 64),
    (2, 1, 49, 130, 96),
    (1, 1, 100, 33, 128),
    (1, 1, 50, 256, 32),  # key padding a multiple of 256: the strips' padded row stride
    (2, 1, 130, 1, 64),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_attention_jvp_matches_reference(shape, mode, dtype):
    primals, tangents = _draw(*shape, seed=sum(shape))
    primals, tangents = [x.to(dtype) for x in primals], [t.to(dtype) for t in tangents]
    got = _jvp(_attn(cm_kernels.normalized_attention, normalize=mode), primals, tangents)
    _assert_matches(got, _truth(primals, tangents, normalize=mode), dtype, what=f"[{shape} {mode}]")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("d", [32, 64])
def test_attention_jvp_low_precision_within_twice_torch_error(dtype, mode, d):
    primals, tangents = _draw(2, 2, 40, 70, d, seed=12 + d)
    primals, tangents = [x.to(dtype) for x in primals], [t.to(dtype) for t in tangents]
    got = _jvp(_attn(cm_kernels.normalized_attention, normalize=mode), primals, tangents)
    baseline = _jvp(_attn(reference.normalized_attention, normalize=mode), primals, tangents)
    _assert_matches(got, _truth(primals, tangents, normalize=mode), dtype, baseline, f"[{dtype} {mode} d={d}]")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
def test_attention_forward_ad_dual_tensors(mode, dtype):
    primals, tangents = _draw(2, 2, 33, 65, 64, seed=3)
    primals, tangents = [x.to(dtype) for x in primals], [t.to(dtype) for t in tangents]
    got = _dual_forward(_attn(cm_kernels.normalized_attention, normalize=mode), primals, tangents)
    baseline = None
    if dtype == torch.bfloat16:
        baseline = _jvp(_attn(reference.normalized_attention, normalize=mode), primals, tangents)
    _assert_matches(got, _truth(primals, tangents, normalize=mode), dtype, baseline, f"[forward_ad {mode}]")


def test_attention_jvp_some_inputs_without_tangent():
    (q, k, v), (tq, tk, tv) = _draw(2, 2, 20, 30, 32, seed=4)
    q, k, v, tq, tv = (x.float() for x in (q, k, v, tq, tv))
    got = _jvp(lambda a, c: cm_kernels.normalized_attention(a, k, c, scale=0.3), (q, v), (tq, tv))
    truth = _jvp(lambda a, c: reference.normalized_attention(a, k.double(), c, scale=0.3), (q.double(), v.double()),
                 (tq.double(), tv.double()))  # fmt: skip
    _assert_matches(got, truth, torch.float32)
    with fwAD.dual_level():  # only k dual
        out = cm_kernels.normalized_attention(q, fwAD.make_dual(k.float(), tk.float()), v)
        tangent = fwAD.unpack_dual(out).tangent
    truth_k = _jvp(lambda b: reference.normalized_attention(q.double(), b, v.double()), (k.double(),), (tk,))[1]
    torch.testing.assert_close(tangent.double(), truth_k, **FP32)


@pytest.mark.parametrize("d,scale", [(16, 3.0), (64, 40.0 / 64), (32, 0.05)])
def test_attention_jvp_logit_bound_and_true_max(d, scale):
    # d*scale = 48 > 40: the true row max (not the bound) for normalized q, k; 40 exactly: the
    # bound at its edge; keys parallel and anti-parallel to the queries put logits at +-bound.
    g = torch.Generator().manual_seed(d)
    u = torch.randn(1, 1, 1, d, generator=g, dtype=torch.float64) * 100
    signs = torch.tensor([1.0, -1.0, -1.0, 1.0, -1.0], dtype=torch.float64).view(1, 1, 5, 1)
    q = torch.cat([u, -u, u * 1e-3], dim=2)
    k = u * signs + 0.1 * torch.randn(1, 1, 5, d, generator=g, dtype=torch.float64)
    v = torch.randn(1, 1, 5, d, generator=g, dtype=torch.float64)
    tangents = [torch.randn(x.shape, generator=g, dtype=torch.float64) for x in (q, k, v)]
    for mode in ("qk", "qkv"):
        got = _jvp(_attn(cm_kernels.normalized_attention, scale=scale, normalize=mode), [x.float() for x in (q, k, v)],
                   [t.float() for t in tangents])  # fmt: skip
        truth = _truth((q, k, v), tangents, scale=scale, normalize=mode)
        for a, t in zip(got, truth):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a.double(), t, rtol=1e-4, atol=1e-4 * t.abs().max().item())


def test_attention_jvp_zero_head_vector():
    # x = 0: rms is not differentiable there; the tangent takes torch.linalg.vector_norm's
    # subgradient (the x-term vanishes), d(x_hat) = dx / eps, as the reference's JVP does.
    (q, k, v), (tq, tk, tv) = _draw(1, 1, 4, 6, 32, seed=5)
    q[0, 0, 1] = 0
    k[0, 0, 2] = 0
    primals = [x.float() for x in (q, k, v)]
    tangents = [t.float() * 1e-4 for t in (tq, tk, tv)]  # 1/eps = 1e4 amplifies them
    got = _jvp(cm_kernels.normalized_attention, primals, tangents)
    _assert_matches(got, _truth(primals, tangents), torch.float32)


# --------------------------------------------------------------------------------------------
# ADM's channels-first qkv entry point


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
def test_attention_qkv_jvp(mode, dtype):
    B, H, d, N = 2, 3, 32, 50
    g = torch.Generator().manual_seed(6)
    qkv = torch.randn(B, 3 * H * d, N, generator=g, dtype=torch.float64).to(dtype)
    tqkv = torch.randn(B, 3 * H * d, N, generator=g, dtype=torch.float64).to(dtype)
    fn = lambda x: cm_kernels.normalized_attention_qkv(x, H, normalize=mode)  # noqa: E731
    ref = lambda x: reference.normalized_attention_qkv(x, H, normalize=mode)  # noqa: E731
    truth = _jvp(ref, (qkv.double(),), (tqkv.double(),))
    baseline = _jvp(ref, (qkv,), (tqkv,)) if dtype == torch.bfloat16 else None
    _assert_matches(_jvp(fn, (qkv,), (tqkv,)), truth, dtype, baseline, f"[qkv {mode}]")
    _assert_matches(_dual_forward(fn, (qkv,), (tqkv,)), truth, dtype, baseline, f"[qkv forward_ad {mode}]")


def test_attention_qkv_jvp_non_contiguous():
    B, H, d, N = 2, 2, 64, 31
    g = torch.Generator().manual_seed(7)
    qkv = torch.randn(B, N, 3 * H * d, generator=g).transpose(1, 2)  # [B, 3Hd, N], N the slow dim
    tqkv = torch.randn(B, 3 * H * d, N, generator=g)
    got = _jvp(lambda x: cm_kernels.normalized_attention_qkv(x, H), (qkv,), (tqkv,))
    truth = _jvp(lambda x: reference.normalized_attention_qkv(x, H), (qkv.double(),), (tqkv.double(),))
    _assert_matches(got, truth, torch.float32)


# --------------------------------------------------------------------------------------------
# Every CPU instruction set of the fused kernel (csrc/cpu/isa_core.h attn_jvp_rows)

ISA_SHAPES = [(1, 1, 1, 7, 16), (2, 1, 7, 33, 32), (1, 2, 33, 65, 64), (1, 1, 65, 100, 96), (1, 1, 100, 130, 128),
              (1, 1, 50, 256, 32), (1, 1, 49, 17, 16)]  # fmt: skip


@pytest.mark.parametrize("shape", ISA_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode", MODES)
def test_fused_jvp_every_isa(isa, shape, mode):
    primals, tangents = _draw(*shape, seed=sum(shape) + 1)
    primals, tangents = [x.float() for x in primals], [t.float() for t in tangents]
    d = shape[-1]
    out, lse, tout = torch.ops.cm_kernels.normalized_attention_jvp(*primals, *tangents, 1 / math.sqrt(d), mode, 1e-4)
    truth = _truth(primals, tangents, normalize=mode)
    _assert_matches((out, tout), truth, torch.float32, what=f"[{isa} {shape} {mode}]")
    p = [x.double() for x in primals[:2]]
    if mode != "none":
        p = [reference.normalize_heads(x) for x in p]
    ref_lse = torch.logsumexp(p[0] @ p[1].transpose(-1, -2) / math.sqrt(d), dim=-1)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("mode", ["none", "qkv"])
def test_fused_jvp_every_isa_low_precision(isa, dtype, mode):
    primals, tangents = _draw(2, 2, 40, 70, 64, seed=13)
    primals, tangents = [x.to(dtype) for x in primals], [t.to(dtype) for t in tangents]
    got = _jvp(_attn(cm_kernels.normalized_attention, normalize=mode), primals, tangents)
    baseline = _jvp(_attn(reference.normalized_attention, normalize=mode), primals, tangents)
    _assert_matches(got, _truth(primals, tangents, normalize=mode), dtype, baseline, f"[{isa} {dtype} {mode}]")


@pytest.mark.parametrize("BH", [1, 3])
@pytest.mark.parametrize("Nq", [200, 77])
def test_fused_jvp_split_tasks(isa, two_threads, BH, Nq):
    # batch*heads < 4*threads: each head's query rows are cut into ranges run as separate tasks.
    primals, tangents = _draw(1, BH, Nq, 200, 64, seed=100 + BH + Nq)
    primals, tangents = [x.float() for x in primals], [t.float() for t in tangents]
    got = _jvp(cm_kernels.normalized_attention, primals, tangents)
    _assert_matches(got, _truth(primals, tangents), torch.float32, what=f"[{isa} BH={BH} Nq={Nq}]")


def test_fused_jvp_refuses_float64_and_bad_tangents():
    x = torch.randn(1, 1, 4, 16, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        torch.ops.cm_kernels.normalized_attention_jvp(x, x, x, x, x, x, 0.25, "qkv", 1e-4)
    x = x.float()
    with pytest.raises(ValueError, match="tangent of k"):
        torch.ops.cm_kernels.normalized_attention_jvp(x, x, x, x, x[..., :2, :], x, 0.25, "qkv", 1e-4)


def test_opcheck_jvp_ops():
    (q, k, v), (tq, tk, tv) = _draw(2, 2, 9, 7, 32, seed=14)
    args = [x.float().requires_grad_() for x in (q, k, v, tq, tk, tv)]
    torch.library.opcheck(torch.ops.cm_kernels.normalized_attention_jvp.default, (*args, 0.2, "qkv", 1e-4))
    qkv, tqkv = torch.randn(2, 3 * 2 * 32, 9, requires_grad=True), torch.randn(2, 3 * 2 * 32, 9, requires_grad=True)
    torch.library.opcheck(torch.ops.cm_kernels.normalized_attention_qkv_jvp.default, (qkv, tqkv, 2, 0.2, "qk", 1e-4))


# --------------------------------------------------------------------------------------------
# With reverse mode, nested, and under torch.compile


def _meanflow_grads(attn, primals, tangents):
    """MeanFlow-style: the JVP's primal output feeds a loss that is backpropagated (to q, v
    here, as to a network's parameters); the tangent enters it without a gradient."""
    q, k, v = (x.detach().clone().requires_grad_(i != 1) for i, x in enumerate(primals))
    out, tangent = torch.func.jvp(lambda a, c: attn(a, k, c), (q, v), (tangents[0], tangents[2]))
    (out - tangent.detach()).square().sum().backward()
    return q.grad, v.grad


def _grads_through_tangent(attn, primals, tangents):
    q, k, v = (x.detach().clone().requires_grad_() for x in primals)
    out, tangent = torch.func.jvp(lambda a: attn(a, k, v), (q,), (tangents[0],))
    (out.square().sum() + (tangent * tangent.detach().sin()).sum()).backward()
    return q.grad, k.grad, v.grad


@pytest.mark.parametrize("how", [_meanflow_grads, _grads_through_tangent], ids=["meanflow", "through-tangent"])
def test_reverse_mode_through_the_jvp(how):
    primals, tangents = _draw(2, 2, 24, 40, 32, seed=15)
    got = how(cm_kernels.normalized_attention, [x.float() for x in primals], [t.float() for t in tangents])
    truth = how(reference.normalized_attention, primals, tangents)
    for a, t in zip(got, truth):
        torch.testing.assert_close(a.double(), t, **FP32)


def test_forward_ad_and_reverse_mode_at_one_level():
    primals, tangents = _draw(1, 2, 24, 40, 32, seed=16)
    q, k, v = (x.float().requires_grad_() for x in primals)
    with fwAD.dual_level():
        out = cm_kernels.normalized_attention(fwAD.make_dual(q, tangents[0].float()), k, v)
        primal, tangent = fwAD.unpack_dual(out)
        (primal.square().sum() + tangent.square().sum()).backward()
    truth = _grads_through_tangent_sq(primals, tangents)
    for a, t in zip((q.grad, k.grad, v.grad), truth):
        torch.testing.assert_close(a.double(), t, **FP32)


def _grads_through_tangent_sq(primals, tangents):
    q, k, v = (x.detach().clone().requires_grad_() for x in primals)
    out, tangent = torch.func.jvp(lambda a: reference.normalized_attention(a, k, v), (q,), (tangents[0],))
    (out.square().sum() + tangent.square().sum()).backward()
    return q.grad, k.grad, v.grad


def test_jvp_of_jvp():
    # second order forward mode: the inner JVP's formula is differentiated by torch
    primals, tangents = _draw(1, 2, 10, 12, 16, seed=17)
    k, v = primals[1:]

    def second(attn, q):
        return _jvp(lambda a: _jvp(lambda x: attn(x, k, v), (a,), (tangents[0],))[1], (q,), (tangents[1][:, :, :10],))

    got = second(cm_kernels.normalized_attention, primals[0])
    truth = second(reference.normalized_attention, primals[0])
    _assert_matches(got, truth, torch.float64)


def test_jacfwd_matches_reference():
    (q, k, v), _ = _draw(1, 1, 2, 3, 16, seed=18)
    got = torch.func.jacfwd(lambda x: cm_kernels.normalized_attention(x, k, v))(q)
    truth = torch.func.jacfwd(lambda x: reference.normalized_attention(x, k, v))(q)
    torch.testing.assert_close(got, truth, **FP64)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile(backend):
    torch._dynamo.reset()
    primals, tangents = _draw(2, 2, 20, 24, 32, seed=19)
    truth = _truth(primals, tangents)
    p32, t32 = [x.float() for x in primals], [t.float() for t in tangents]
    attn = cm_kernels.normalized_attention
    # the JVP inside the compiled function, one graph
    compiled = torch.compile(lambda q, k, v: _jvp(attn, (q, k, v), t32), backend=backend, fullgraph=True)
    _assert_matches(compiled(*p32), truth, torch.float32, what="compile(jvp)")
    # a compiled function under torch.func.jvp
    _assert_matches(_jvp(torch.compile(attn, backend=backend), p32, t32), truth, torch.float32, what="jvp(compile)")

    def dual_block(q, k, v, tq, tk, tv):  # forward_ad inside the compiled function
        with fwAD.dual_level():
            out = attn(fwAD.make_dual(q, tq), fwAD.make_dual(k, tk), fwAD.make_dual(v, tv))
            primal, tangent = fwAD.unpack_dual(out)
            return primal * 1, tangent * 1

    got = torch.compile(dual_block, backend=backend, fullgraph=True)(*p32, *t32)
    _assert_matches(got, truth, torch.float32, what="compile(forward_ad)")
    # dual tensors into a compiled function: torch.compile runs it eagerly (it does not trace dual
    # inputs); the op's kernel must not be compiled as a frame of its own that loses the tangent
    torch._dynamo.reset()
    _assert_matches(_dual_forward(torch.compile(attn, backend=backend), p32, t32), truth, torch.float32,
                    what="compiled on duals")  # fmt: skip
    # MeanFlow-style training step compiled as a whole
    torch._dynamo.reset()
    got = torch.compile(lambda *a: _meanflow_grads(attn, *a), backend=backend)(p32, t32)
    for a, t in zip(got, _meanflow_grads(reference.normalized_attention, primals, tangents)):
        torch.testing.assert_close(a.double(), t, **FP32)


# --------------------------------------------------------------------------------------------
# Pseudo-Huber


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=["fp32", "fp64", "bf16", "fp16"])  # fmt: skip
def test_pseudo_huber_jvp(dtype, reduction):
    g = torch.Generator().manual_seed(20)
    pred, target, tpred, ttarget = (torch.randn(4, 3, 8, 9, generator=g, dtype=torch.float64) for _ in range(4))
    weight, tweight = torch.rand(4, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    c = 0.00054 * math.sqrt(3 * 8 * 9)
    args = [x.to(dtype) for x in (pred, target, weight)], [x.to(dtype) for x in (tpred, ttarget, tweight)]
    fn = lambda p, t, w: cm_kernels.pseudo_huber_loss(p, t, c, w, reduction)  # noqa: E731
    truth = _jvp(lambda p, t, w: reference.pseudo_huber_loss(p, t, c, w, reduction),
                 [x.double() for x in args[0]], [x.double() for x in args[1]])  # fmt: skip
    tol = dict(rtol=1e-5, atol=1e-6) if dtype != torch.float64 else FP64
    for got in (_jvp(fn, *args), _dual_forward(fn, *args)):
        assert got[1].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        for a, t in zip(got, truth):
            torch.testing.assert_close(a.double(), t, **tol)


def test_pseudo_huber_reverse_through_jvp():
    g = torch.Generator().manual_seed(21)
    pred, target, tpred = (torch.randn(3, 50, generator=g, dtype=torch.float64) for _ in range(3))

    def grads(loss_fn, dtype):
        p, t = (x.to(dtype).detach().requires_grad_() for x in (pred, target))
        loss, dloss = torch.func.jvp(lambda a: loss_fn(a, t, 0.3), (p,), (tpred.to(dtype),))
        (loss + dloss.square()).backward()
        return p.grad, t.grad

    truth = grads(reference.pseudo_huber_loss, torch.float64)
    for a, t in zip(grads(cm_kernels.pseudo_huber_loss, torch.float32), truth):
        torch.testing.assert_close(a.double(), t, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# What is not implemented raises, naming the op and what to use


def test_forward_over_reverse_raises():
    primals, tangents = _draw(1, 1, 6, 6, 16, seed=22)
    q, k, v = (x.float() for x in primals)
    x = q.clone().requires_grad_()
    with fwAD.dual_level():
        out = cm_kernels.normalized_attention(fwAD.make_dual(x, tangents[0].float()), k, v)
        with pytest.raises(RuntimeError, match=r"normalized_attention.*forward-over-reverse.*reference"):
            torch.autograd.grad(out.sum(), x, create_graph=True)
        p = torch.randn(2, 5, requires_grad=True)
        loss = cm_kernels.pseudo_huber_loss(fwAD.make_dual(p, torch.randn(2, 5)), torch.zeros(2, 5), 0.1)
        with pytest.raises(RuntimeError, match=r"pseudo_huber_loss.*forward-over-reverse"):
            torch.autograd.grad(loss, p, create_graph=True)
        g = fwAD.make_dual(torch.randn(1, 1, 6, 16), torch.randn(1, 1, 6, 16))
        fwd, lse = torch.ops.cm_kernels.normalized_attention_fwd(q, k, v, 0.25, "qkv", 1e-4)
        with pytest.raises(RuntimeError, match=r"cm_kernels::normalized_attention_bwd.*no forward-mode AD rule"):
            torch.ops.cm_kernels.normalized_attention_bwd(g, q, k, v, fwd, lse, 0.25, "qkv", 1e-4)


def test_double_backward_raises():
    q, k, v = (x.float().requires_grad_() for x in _draw(1, 1, 6, 6, 16, seed=23)[0])
    (gq,) = torch.autograd.grad(cm_kernels.normalized_attention(q, k, v).square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match=r"cm_kernels::normalized_attention_bwd.*double backward.*reference"):
        gq.sum().backward()
    p = torch.randn(2, 5, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"cm_kernels::pseudo_huber_bwd.*double backward"):
        torch.autograd.functional.hvp(lambda x: cm_kernels.pseudo_huber_loss(x, torch.zeros(2, 5), 0.1), p,
                                      torch.ones(2, 5))  # fmt: skip


# --------------------------------------------------------------------------------------------
# CUDA: the fused JVP kernel (csrc/cuda/attention_kernels.cuh attn_jvp_kernel); skipped without a GPU

CUDA_SHAPES = [  # B, H, Nq, Nk, d: tails of the 32-key tiles and 16/8-row blocks, Nq != Nk, every d
    (1, 1, 1, 1, 16),
    (2, 3, 37, 70, 32),
    (1, 2, 65, 100, 64),
    (2, 1, 49, 130, 96),
    (1, 2, 100, 33, 128),
    (2, 4, 257, 256, 64),
]


def _cuda_jvp_case(shape, mode, dtype, seed, how="ops"):
    """(got, truth, baseline) on CUDA: the public wrapper under torch.func.jvp ("jvp") or the
    JVP op itself ("ops": proves the kernel, not the torch-op formula, ran), the float64 truth of
    the inputs as rounded to dtype, and torch.func.jvp of the reference in dtype on the GPU."""
    primals, tangents = _draw(*shape, seed=seed)
    p = [x.to("cuda", dtype) for x in primals]
    t = [x.to("cuda", dtype) for x in tangents]
    d = shape[-1]
    if how == "ops":
        out, lse, tout = torch.ops.cm_kernels.normalized_attention_jvp(*p, *t, 1 / math.sqrt(d), mode, 1e-4)
        assert lse.dtype == torch.float32 and lse.shape == shape[:3]
        got = (out, tout)
    else:
        got = _jvp(_attn(cm_kernels.normalized_attention, normalize=mode), p, t)
    truth = _truth([x.cpu() for x in p], [x.cpu() for x in t], normalize=mode)
    baseline = _jvp(_attn(reference.normalized_attention, normalize=mode), p, t)
    return [x.cpu() for x in got], truth, [x.cpu() for x in baseline]


@pytest.mark.cuda
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_attention_jvp_cuda_kernel(shape, mode, dtype):
    got, truth, baseline = _cuda_jvp_case(shape, mode, dtype, seed=sum(shape) + 3)
    _assert_matches(got, truth, dtype, None if dtype == torch.float32 else baseline, f"[cuda {shape} {mode}]")


@pytest.mark.cuda
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_attention_jvp_cuda(mode, dtype):
    got, truth, baseline = _cuda_jvp_case((2, 3, 70, 90, 64), mode, dtype, seed=24, how="jvp")
    _assert_matches(got, truth, dtype, None if dtype == torch.float32 else baseline, f"[cuda {dtype} {mode}]")


@pytest.mark.cuda
def test_attention_jvp_cuda_other_head_dim_uses_the_formula():
    # d = 48: no CUDA kernel instance; the torch-op formula runs and is exact all the same.
    got, truth, _ = _cuda_jvp_case((1, 2, 20, 30, 48), "qkv", torch.float32, seed=25, how="jvp")
    _assert_matches(got, truth, torch.float32, what="[cuda d=48]")


@pytest.mark.cuda
@pytest.mark.parametrize("d,scale", [(32, 40.0 / 32), (64, 1.0)])  # at the logit bound; past it (true max)
def test_attention_jvp_cuda_logit_bound_and_true_max(d, scale):
    (q, k, v), (tq, tk, tv) = _draw(1, 2, 40, 50, d, seed=26)
    p = [x.float().cuda() for x in (q, k, v)]
    t = [x.float().cuda() for x in (tq, tk, tv)]
    out, _, tout = torch.ops.cm_kernels.normalized_attention_jvp(*p, *t, scale, "qk", 1e-4)
    truth = _truth([x.cpu() for x in p], [x.cpu() for x in t], normalize="qk", scale=scale)
    for a, ref in zip((out, tout), truth):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.double().cpu(), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@pytest.mark.cuda
def test_attention_jvp_cuda_zero_head_vector():
    (q, k, v), (tq, tk, tv) = _draw(1, 1, 4, 6, 32, seed=5)
    q[0, 0, 1] = 0
    k[0, 0, 2] = 0
    p = [x.float().cuda() for x in (q, k, v)]
    t = [x.float().cuda() * 1e-4 for x in (tq, tk, tv)]
    got = [x.cpu() for x in _jvp(cm_kernels.normalized_attention, p, t)]
    _assert_matches(got, _truth([x.cpu() for x in p], [x.cpu() for x in t]), torch.float32, what="[cuda x=0]")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_attention_qkv_jvp_cuda(dtype):
    # ADM's channels-first layout: strided q, k, v and tangents, out and its tangent in [B, H*d, N].
    B, H, d, N = 2, 3, 64, 77
    g = torch.Generator().manual_seed(27)
    qkv = torch.randn(B, N, 3 * H * d, generator=g, dtype=torch.float64).transpose(1, 2).to("cuda", dtype)
    tqkv = torch.randn(B, 3 * H * d, N, generator=g, dtype=torch.float64).to("cuda", dtype)
    out, _, tout = torch.ops.cm_kernels.normalized_attention_qkv_jvp(qkv, tqkv, H, 1 / math.sqrt(d), "qkv", 1e-4)
    ref = lambda x: reference.normalized_attention_qkv(x, H, normalize="qkv")  # noqa: E731
    truth = _jvp(ref, (qkv.double().cpu(),), (tqkv.double().cpu(),))
    baseline = [x.cpu() for x in _jvp(ref, (qkv,), (tqkv,))] if dtype == torch.bfloat16 else None
    _assert_matches((out.cpu(), tout.cpu()), truth, dtype, baseline, "[cuda qkv]")
    got = [x.cpu() for x in _jvp(lambda x: cm_kernels.normalized_attention_qkv(x, H), (qkv,), (tqkv,))]
    _assert_matches(got, truth, dtype, baseline, "[cuda qkv wrapper]")


@pytest.mark.cuda
def test_attention_jvp_cuda_opcheck_and_compile():
    (q, k, v), (tq, tk, tv) = _draw(2, 2, 9, 7, 32, seed=28)
    args = [x.float().cuda().requires_grad_() for x in (q, k, v, tq, tk, tv)]
    torch.library.opcheck(torch.ops.cm_kernels.normalized_attention_jvp.default, (*args, 0.2, "qkv", 1e-4))
    p, t = [x.detach() for x in args[:3]], [x.detach() for x in args[3:]]
    torch._dynamo.reset()
    fn = torch.compile(_attn(cm_kernels.normalized_attention, normalize="qkv"), backend="aot_eager", fullgraph=True)
    got = [x.cpu() for x in _jvp(fn, p, t)]
    _assert_matches(got, _truth([x.cpu() for x in p], [x.cpu() for x in t], normalize="qkv"), torch.float32)


def test_fused_jvp_says_which_path_runs(monkeypatch):
    """cm_kernels.fused_jvp: the fused CPU kernel for float32/bfloat16/float16, the torch-op formula
    for float64 (cm_nets relies on it to pick a backend under a JVP)."""
    assert cm_kernels.fused_jvp(torch.zeros(1, 1, 4, 16)) and cm_kernels.fused_jvp(torch.zeros(1, 1, 4, 64).bfloat16())
    assert not cm_kernels.fused_jvp(torch.zeros(1, 1, 4, 16, dtype=torch.float64))
    calls = []
    real = torch.ops.cm_kernels.normalized_attention_jvp
    monkeypatch.setattr(torch.ops.cm_kernels, "normalized_attention_jvp", lambda *a: calls.append(1) or real(*a))
    for dtype in (torch.float32, torch.float64):
        (q, k, v), (tq, tk, tv) = _draw(1, 1, 5, 6, 16, seed=3)
        p, t = [x.to(dtype) for x in (q, k, v)], [x.to(dtype) for x in (tq, tk, tv)]
        before = len(calls)
        _jvp(cm_kernels.normalized_attention, p, t)
        assert (len(calls) > before) == cm_kernels.fused_jvp(p[0]), dtype

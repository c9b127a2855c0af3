"""Every CPU instruction-set build of the kernels (csrc/cpu/isa_core.h, compiled for avx512, avx2
and base; csrc/cpu/isa.cpp picks one at run time) against the float64 reference.

Each test runs once per ISA this CPU supports: the ``isa`` fixture switches with
``torch.ops.cm_kernels.set_cpu_isa`` and always switches back to "auto". The truth is always
``cm_kernels.reference`` evaluated in float64, never numbers produced by the kernels themselves.
"""

import math

import cm_kernels
import pytest
import torch
from cm_kernels import reference

ISAS = ["avx512", "avx2", "base"]
MODES = ["none", "qk", "qkv"]

pytestmark = pytest.mark.skipif(
    cm_kernels.backends()["normalized_attention"]["backend"] == "reference",
    reason="compiled cm_kernels extension not loaded",
)


def _ops():
    return torch.ops.cm_kernels


@pytest.fixture(params=ISAS)
def isa(request):
    """Switch the CPU kernels to one ISA for the test; skip it if this CPU cannot run it; always
    switch back to "auto" afterwards, also when the test fails."""
    name = request.param
    try:
        got = _ops().set_cpu_isa(name)
    except ValueError as e:
        _ops().set_cpu_isa("auto")
        pytest.skip(f"this CPU cannot run the {name} kernels: {e}")
    try:
        assert got == name and _ops().cpu_isa() == name
        yield name
    finally:
        _ops().set_cpu_isa("auto")


# --------------------------------------------------------------------------------------------
# Attention helpers


def _qkv(B, H, Nq, Nk, d, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Nq, d, generator=g, dtype=torch.float64) * 2
    k = torch.randn(B, H, Nk, d, generator=g, dtype=torch.float64) * 2
    v = torch.randn(B, H, Nk, d, generator=g, dtype=torch.float64)
    gout = torch.randn(B, H, Nq, d, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype), gout.to(dtype)


def _run(fn, q, k, v, g, **kw):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v, **kw)
    out.backward(g)
    return out, q.grad, k.grad, v.grad


def _ref_lse(q, k, mode, eps=1e-4):
    """float64 logsumexp of the logits, the statistic the forward saves for the backward."""
    d = q.shape[-1]
    if mode in ("qk", "qkv"):
        q, k = reference.normalize_heads(q, eps), reference.normalize_heads(k, eps)
    return torch.logsumexp(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)


def _assert_fp32_matches(got, ref, what):
    names = ("out", "dq", "dk", "dv")
    for name, a, b in zip(names, got, ref):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b.float(), rtol=2e-4, atol=2e-5, msg=lambda m, n=name: f"{what} {n}: {m}")


# Compact but covering: every supported head dim, Nq != Nk, lengths that are not multiples of the
# vector width / score tile (8, 16, 64 columns) or of the 48-row forward strip, single rows and
# single keys, and more than one strip per head (65, 100, 130 rows).
ATTN_SHAPES = [  # B, H, Nq, Nk, d
    (1, 1, 1, 7, 16),
    (2, 1, 7, 33, 32),
    (1, 2, 33, 65, 64),
    (1, 1, 65, 100, 96),
    (1, 1, 100, 130, 128),
    (1, 1, 50, 256, 32),  # key padding a multiple of 256: the forward strip's padded row stride
    (1, 1, 20, 512, 16),
    (2, 1, 130, 1, 64),
    (1, 1, 49, 17, 16),
]


@pytest.mark.parametrize("shape", ATTN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode", MODES)
def test_attention_float32_matches_float64_reference(isa, shape, mode):
    B, H, Nq, Nk, d = shape
    q, k, v, g = _qkv(B, H, Nq, Nk, d, torch.float32, seed=sum(shape))
    got = _run(cm_kernels.normalized_attention, q, k, v, g, normalize=mode)
    ref = _run(reference.normalized_attention, q.double(), k.double(), v.double(), g.double(), normalize=mode)
    _assert_fp32_matches(got, ref, f"[{isa} {shape} {mode}]")
    _, lse = _ops().normalized_attention_fwd(q, k, v, 1 / math.sqrt(d), mode, 1e-4)
    torch.testing.assert_close(lse, _ref_lse(q.double(), k.double(), mode).float(), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("BH", [1, 3])
@pytest.mark.parametrize("mode", ["none", "qkv"])
@pytest.mark.parametrize("Nq", [200, 77])
def test_attention_split_tasks(isa, two_threads, BH, mode, Nq):
    # batch*heads < 4*threads: the forward cuts each head's query rows into ranges and the
    # backward its key rows (N = 200 -> up to 8 ranges of 32 keys, the last one empty), each
    # range writing its own partial dQ that is summed before the normalization backward.
    B, H = (1, 1) if BH == 1 else (1, 3)
    q, k, v, g = _qkv(B, H, Nq, 200, 64, torch.float32, seed=100 + BH + Nq)
    got = _run(cm_kernels.normalized_attention, q, k, v, g, normalize=mode)
    ref = _run(reference.normalized_attention, q.double(), k.double(), v.double(), g.double(), normalize=mode)
    _assert_fp32_matches(got, ref, f"[{isa} BH={BH} Nq={Nq} {mode} threads=2]")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("mode", ["none", "qkv"])
def test_attention_low_precision_within_twice_torch_error(isa, dtype, mode):
    q64, k64, v64, g64 = _qkv(2, 2, 40, 70, 64, seed=12)
    q, k, v, g = (x.to(dtype) for x in (q64, k64, v64, g64))
    truth = _run(reference.normalized_attention, q.double(), k.double(), v.double(), g.double(), normalize=mode)
    got = _run(cm_kernels.normalized_attention, q, k, v, g, normalize=mode)
    ref = _run(reference.normalized_attention, q, k, v, g, normalize=mode)
    for name, a, r, t in zip(("out", "dq", "dk", "dv"), got, ref, truth):
        assert a.dtype == dtype
        err, err_ref = (a.double() - t).abs().max().item(), (r.double() - t).abs().max().item()
        assert err <= 2 * err_ref + 1e-6, (isa, dtype, mode, name, err, err_ref)


@pytest.mark.parametrize("mode", MODES)
def test_attention_qkv_layout(isa, mode):
    B, H, d, N = 2, 3, 32, 50
    g = torch.Generator().manual_seed(4)
    qkv = torch.randn(B, 3 * H * d, N, generator=g)
    gout = torch.randn(B, H * d, N, generator=g)
    a = qkv.clone().requires_grad_()
    out = cm_kernels.normalized_attention_qkv(a, H, normalize=mode)
    out.backward(gout)
    b = qkv.double().requires_grad_()
    ref = reference.normalized_attention_qkv(b, H, normalize=mode)
    ref.backward(gout.double())
    torch.testing.assert_close(out, ref.float(), rtol=2e-4, atol=2e-5)
    torch.testing.assert_close(a.grad, b.grad.float(), rtol=2e-4, atol=2e-5)


# --------------------------------------------------------------------------------------------
# Pseudo-Huber


def _ph_draw(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(shape, generator=g, dtype=torch.float64)
    target = torch.randn(shape, generator=g, dtype=torch.float64)
    return pred.to(dtype), target.to(dtype)


def _ph_check(pred, target, c, loss_tol, grad_tol, seed=0):
    """Kernel loss (reduction="none") and grads w.r.t. pred and target vs the float64 reference on
    the same (already rounded) inputs."""
    B = pred.shape[0]
    gl = torch.rand(B, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.5
    p, t = pred.detach().clone().requires_grad_(), target.detach().clone().requires_grad_()
    out = cm_kernels.pseudo_huber_loss(p, t, c, reduction="none")
    out.backward(gl.to(out.dtype))
    p64, t64 = pred.double().requires_grad_(), target.double().requires_grad_()
    ref = reference.pseudo_huber_loss(p64, t64, c, reduction="none")
    ref.backward(gl)
    assert out.dtype == torch.float32 and p.grad.dtype == pred.dtype and t.grad.dtype == pred.dtype
    torch.testing.assert_close(out.double(), ref, **loss_tol)
    torch.testing.assert_close(p.grad.double(), p64.grad, **grad_tol)
    torch.testing.assert_close(t.grad.double(), t64.grad, **grad_tol)


F32_LOSS = dict(rtol=1e-5, atol=1e-6)
F32_GRAD = dict(rtol=1e-5, atol=1e-9)
# bf16: inputs exact in float32, sums in float32; the gradient is a float32 difference times a
# float32 coefficient (relative error ~1e-7), rounded once to nearest bf16 (relative error <= 2^-8,
# half an ulp of an 8-bit significand). Truncating instead of rounding would reach 2^-7.
BF16_LOSS = dict(rtol=1e-5, atol=1e-6)
BF16_GRAD = dict(rtol=2.0**-8 + 1e-5, atol=1e-12)

# fp16: the same with an 11-bit significand: one rounding to nearest, <= 2^-11 relative, and at
# most half the subnormal spacing (2^-25) absolute where the gradient falls below 2^-14.
F16_GRAD = dict(rtol=2.0**-11 + 1e-5, atol=2.0**-25 * (1 + 1e-6))
TOLS = {
    torch.float32: (F32_LOSS, F32_GRAD),
    torch.bfloat16: (BF16_LOSS, BF16_GRAD),
    torch.float16: (BF16_LOSS, F16_GRAD),
}

PH_SHAPES = [(1, 7), (5, 3, 4, 4), (3, 3, 17, 9), (2, 20000), (3, 16385)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", PH_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_pseudo_huber_matches_float64_reference(isa, dtype, shape):
    pred, target = _ph_draw(shape, dtype, seed=len(shape) + shape[-1])
    c = 0.00054 * math.sqrt(math.prod(shape[1:]))
    loss_tol, grad_tol = TOLS[dtype]
    _ph_check(pred, target, c, loss_tol, grad_tol, seed=shape[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_conversions_exact_for_every_finite_value(isa, dtype):
    # Every finite 16-bit pattern (denormals and -0 included) through the kernels' half <-> float
    # conversions: with target 0, loss 0 passed in and c = 1 the backward's coefficient is exactly
    # 1, so the gradient must reproduce the input bit for bit.
    x = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    x = x[torch.isfinite(x)].view(1, -1)
    g = torch.ops.cm_kernels.pseudo_huber_bwd(torch.ones(1), x, torch.zeros_like(x), torch.zeros(1), 1.0)
    assert torch.equal(g.view(torch.int16), x.view(torch.int16))
    x = x[x.abs() < 2.0**60].view(1, -1)  # squares that a float32 sum holds (bf16 reaches 3e38)
    loss = torch.ops.cm_kernels.pseudo_huber_fwd(x, torch.zeros_like(x), 1.0)
    s = x.double().square().sum()
    torch.testing.assert_close(loss.double(), (s / (torch.sqrt(s + 1) + 1)).view(1), rtol=1e-6, atol=0)


def test_pseudo_huber_streaming_aligned_float32(isa):
    # 4 x 3 x 512 x 512 float32: a 12 MiB gradient (>= 4 MiB: non-temporal stores), every
    # sample and every 2^14-element chunk starting on a vector boundary.
    pred, target = _ph_draw((4, 3, 512, 512), torch.float32, seed=21)
    _ph_check(pred, target, 0.00054 * math.sqrt(3 * 512 * 512), F32_LOSS, F32_GRAD, seed=21)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_pseudo_huber_streaming_unaligned_sliced(isa, dtype):
    # Per-sample size D = 3 * 701 * 1001 (odd): samples 1 and 2 (and their chunks) start off the
    # store alignment, so the streaming path runs its scalar head, its vector body and its scalar
    # tail. pred is a sliced (non-contiguous) view of a larger buffer. Gradient: 25 MB float32,
    # 12.6 MB bfloat16, all >= 4 MiB.
    g = torch.Generator().manual_seed(22)
    big = torch.randn(3, 4, 701, 1001, generator=g).to(dtype)
    pred = big[:, 1:]
    target = torch.randn(3, 3, 701, 1001, generator=g).to(dtype)
    assert not pred.is_contiguous()
    c = 0.00054 * math.sqrt(3 * 701 * 1001)
    loss_tol, grad_tol = TOLS[dtype]
    _ph_check(pred, target, c, loss_tol, grad_tol, seed=22)


# --------------------------------------------------------------------------------------------
# The switch itself


def test_cpu_isa_reports_the_set_one(isa):
    assert _ops().cpu_isa() == isa
    for other in ISAS:
        try:
            assert _ops().set_cpu_isa(other) == other
        except ValueError:
            continue  # not on this CPU
        assert _ops().cpu_isa() == other
    default = _ops().set_cpu_isa("auto")
    assert default in ISAS and _ops().cpu_isa() == default


def test_set_cpu_isa_rejects_unknown_names():
    before = _ops().cpu_isa()  # the "auto" choice: every other test switches back to it
    try:
        with pytest.raises(ValueError, match=r"'auto', 'avx512', 'avx2' or 'base'.*'nonsense'"):
            _ops().set_cpu_isa("nonsense")
        assert _ops().cpu_isa() == before  # a refused switch changes nothing
        assert _ops().set_cpu_isa("base") == "base"  # every CPU runs the baseline
        with pytest.raises(ValueError):
            _ops().set_cpu_isa("AVX2")  # names are exact
        assert _ops().cpu_isa() == "base"
        assert _ops().set_cpu_isa("auto") == before
    finally:
        _ops().set_cpu_isa("auto")

"""cm_kernels.normalized_attention(_qkv) against the reference and against SDPA after normalizing."""

import math

import cm_kernels
import pytest
import torch
import torch.nn.functional as F
from cm_kernels import reference

MODES = ["none", "qk", "qkv"]


def _qkv(B, H, Nq, Nk, d, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Nq, d, generator=g, dtype=torch.float64) * 2
    k = torch.randn(B, H, Nk, d, generator=g, dtype=torch.float64) * 2
    v = torch.randn(B, H, Nk, d, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_float64(mode):
    q, k, v = (x.requires_grad_() for x in _qkv(2, 2, 5, 3, 16, seed=1))
    fn = lambda q, k, v: cm_kernels.normalized_attention(q, k, v, normalize=mode)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_gradcheck_float64_qkv_layout():
    g = torch.Generator().manual_seed(2)
    qkv = torch.randn(2, 3 * 2 * 16, 6, generator=g, dtype=torch.float64, requires_grad=True)
    fn = lambda t: cm_kernels.normalized_attention_qkv(t, 2, scale=0.3)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (qkv,))


SHAPES = [  # B, H, Nq, Nk, d
    (1, 1, 1, 1, 32),
    (2, 3, 1, 17, 64),
    (1, 2, 16, 16, 128),
    (3, 1, 33, 65, 16),
    (2, 4, 100, 100, 96),
    (1, 2, 257, 129, 64),
]


def _run(fn, q, k, v, g, **kw):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v, **kw)
    out.backward(g)
    return out, q.grad, k.grad, v.grad


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", MODES)
def test_matches_reference_float32(shape, mode):
    B, H, Nq, Nk, d = shape
    q, k, v = _qkv(B, H, Nq, Nk, d, torch.float32, seed=sum(shape))
    g = torch.randn(B, H, Nq, d)
    got = _run(cm_kernels.normalized_attention, q, k, v, g, normalize=mode)
    ref = _run(reference.normalized_attention, q.double(), k.double(), v.double(), g.double(), normalize=mode)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b.float(), rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("mode", ["qk", "qkv"])
def test_matches_sdpa_after_normalizing(mode):
    q, k, v = _qkv(2, 4, 64, 64, 64, torch.float32, seed=7)
    out = cm_kernels.normalized_attention(q, k, v, normalize=mode)
    n = reference.normalize_heads
    sdpa = F.scaled_dot_product_attention(n(q), n(k), n(v) if mode == "qkv" else v)
    torch.testing.assert_close(out, sdpa, rtol=1e-4, atol=1e-5)


def test_non_contiguous_inputs_and_custom_scale():
    q, k, v = _qkv(2, 8, 40, 24, 32, torch.float32, seed=8)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, H, N, d] view of a [B, N, H, d] buffer
    kt = k.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)
    vs = torch.stack([v, torch.randn_like(v)], dim=-1)[..., 0]  # channel stride 2
    assert not (qt.is_contiguous() or kt.is_contiguous() or vs.is_contiguous())
    g = torch.randn(2, 8, 40, 32)
    got = _run(cm_kernels.normalized_attention, qt, kt, vs, g, scale=0.7)
    ref = _run(reference.normalized_attention, q.double(), k.double(), v.double(), g.double(), scale=0.7)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b.float(), rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("mode", MODES)
def test_qkv_layout_equals_bhnd_path(mode):
    B, H, d, N = 2, 3, 32, 50
    g = torch.Generator().manual_seed(4)
    qkv = torch.randn(B, 3 * H * d, N, generator=g)
    gout = torch.randn(B, H * d, N, generator=g)
    a = qkv.clone().requires_grad_()
    out = cm_kernels.normalized_attention_qkv(a, H, normalize=mode)
    out.backward(gout)
    b = qkv.clone().requires_grad_()
    q, k, v = b.reshape(B, 3, H, d, N).transpose(-1, -2).unbind(1)
    out2 = cm_kernels.normalized_attention(q, k, v, normalize=mode).transpose(-1, -2).reshape(B, H * d, N)
    out2.backward(gout)
    torch.testing.assert_close(out, out2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
    ref = reference.normalized_attention_qkv(qkv.double(), H, normalize=mode)
    torch.testing.assert_close(out, ref.float(), rtol=2e-4, atol=2e-5)


def test_qkv_layout_non_contiguous_input():
    B, H, d, N = 2, 2, 64, 31
    base = torch.randn(B, N, 3 * H * d)
    qkv = base.transpose(1, 2)  # [B, 3Hd, N] with N as the slow dim
    out = cm_kernels.normalized_attention_qkv(qkv, H)
    torch.testing.assert_close(out, reference.normalized_attention_qkv(qkv.contiguous(), H), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("d,scale", [(64, None), (32, 40.0 / 32), (128, 40.0 / 128), (16, 3.0)])
def test_logits_at_the_bound(d, scale):
    # Keys parallel (logit = +bound) and anti-parallel (logit = -bound) to the query, with
    # ||x|| >> eps so ||x_hat|| ~ sqrt(d): exercises the skipped-max path at m = d*scale <= 40,
    # its edge (d*scale = 40 exactly), and beyond it (16 * 3 = 48: true row max).
    g = torch.Generator().manual_seed(d)
    u = torch.randn(1, 1, 1, d, generator=g, dtype=torch.float64) * 100
    signs = torch.tensor([1.0, -1.0, -1.0, 1.0, -1.0], dtype=torch.float64).view(1, 1, 5, 1)
    q = torch.cat([u, -u, u * 1e-3], dim=2)
    k = u * signs
    v = torch.randn(1, 1, 5, d, generator=g, dtype=torch.float64)
    for dtype in (torch.float32, torch.float64):
        gout = torch.randn(1, 1, 3, d, generator=g, dtype=torch.float64).to(dtype)  # seeded: never test-order dependent
        got = _run(cm_kernels.normalized_attention, q.to(dtype), k.to(dtype), v.to(dtype), gout, scale=scale)
        ref = _run(reference.normalized_attention, q, k, v, gout.double(), scale=scale)
        for a, b in zip(got, ref):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)
    # all logits at -bound except none at +bound: every term e^{-2m} = e^{-80} must not underflow
    s = 40.0 / d
    out = cm_kernels.normalized_attention(
        -u.float(), u.float().expand(1, 1, 7, d), v[:, :, :1].float().expand(1, 1, 7, d), scale=s
    )
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["none", "qkv"])
def test_low_precision_within_twice_torch_error(dtype, mode):
    q64, k64, v64 = _qkv(2, 2, 48, 48, 64, seed=12)
    g64 = torch.randn(2, 2, 48, 64, dtype=torch.float64)
    q, k, v, g = (x.to(dtype) for x in (q64, k64, v64, g64))
    truth = _run(reference.normalized_attention, q.double(), k.double(), v.double(), g.double(), normalize=mode)
    got = _run(cm_kernels.normalized_attention, q, k, v, g, normalize=mode)
    ref = _run(reference.normalized_attention, q, k, v, g, normalize=mode)
    for a, r, t in zip(got, ref, truth):
        assert a.dtype == dtype
        err, err_ref = (a.double() - t).abs().max().item(), (r.double() - t).abs().max().item()
        assert err <= 2 * err_ref + 1e-6, (err, err_ref)


def test_long_sequence_blocks_rows():
    # N * N above the CPU kernel's score budget (2^22) splits query rows into blocks.
    q, k, v = _qkv(1, 1, 2100, 2100, 16, torch.float32, seed=13)
    out = cm_kernels.normalized_attention(q, k, v)
    ref = reference.normalized_attention(q, k, v)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_opcheck():
    q, k, v = (x.requires_grad_() for x in _qkv(2, 2, 9, 7, 32, torch.float32, seed=14))
    args = (q, k, v, 1 / math.sqrt(32), "qkv", 1e-4)
    torch.library.opcheck(torch.ops.cm_kernels.normalized_attention_fwd.default, args)
    out, lse = torch.ops.cm_kernels.normalized_attention_fwd(
        *(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    )
    torch.library.opcheck(
        torch.ops.cm_kernels.normalized_attention_bwd.default,
        (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, 0.2, "qk", 1e-4),
    )
    qkv = torch.randn(2, 3 * 2 * 32, 9, requires_grad=True)
    torch.library.opcheck(torch.ops.cm_kernels.normalized_attention_qkv_fwd.default, (qkv, 2, 0.2, "qkv", 1e-4))
    out, lse = torch.ops.cm_kernels.normalized_attention_qkv_fwd(qkv.detach(), 2, 0.2, "qkv", 1e-4)
    torch.library.opcheck(
        torch.ops.cm_kernels.normalized_attention_qkv_bwd.default,
        (torch.randn_like(out), qkv.detach(), out, lse, 2, 0.2, "qkv", 1e-4),
    )


def test_torch_compile_cpu():
    q, k, v = _qkv(1, 2, 16, 16, 32, torch.float32, seed=15)
    fn = torch.compile(cm_kernels.normalized_attention, backend="aot_eager", fullgraph=True)
    g = torch.randn(1, 2, 16, 32)
    got = _run(fn, q, k, v, g)
    ref = _run(reference.normalized_attention, q, k, v, g)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

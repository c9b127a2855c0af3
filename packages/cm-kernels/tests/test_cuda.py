"""The CPU comparisons repeated on a GPU (skipped by the root conftest when none is visible)."""

import cm_kernels
import pytest
import torch
from cm_kernels import reference

pytestmark = pytest.mark.cuda

ATTN_SHAPES = [
    (1, 1, 1, 1, 32),
    (2, 3, 16, 17, 64),
    (1, 2, 257, 129, 128),
    (2, 4, 100, 100, 96),
    (1, 1, 4096, 4096, 64),
    (3, 2, 33, 65, 16),
]


def _require_cuda_ext():
    if cm_kernels.backends()["normalized_attention"]["backend"] != "cuda-ext":
        pytest.fail(f"GPU present but CUDA kernels inactive: {cm_kernels.backends()['normalized_attention']['reason']}")


def _run(fn, tensors, g, **kw):
    ts = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*ts, **kw)
    out.backward(g)
    return [out] + [t.grad for t in ts]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (5, 3, 4, 4), (3, 3, 17, 9), (256, 3, 64, 64), (2, 100003)])
def test_pseudo_huber_cuda(dtype, shape):
    _require_cuda_ext()
    g = torch.Generator(device="cuda").manual_seed(0)
    pred = torch.randn(shape, device="cuda", generator=g).to(dtype)
    target = torch.randn(shape, device="cuda", generator=g).to(dtype)
    gl = torch.rand(shape[0], device="cuda", generator=g)
    truth = _run(
        lambda p, t: reference.pseudo_huber_loss(p, t, 0.05, reduction="none"),
        [pred.double(), target.double()],
        gl.double(),
    )
    got = _run(lambda p, t: cm_kernels.pseudo_huber_loss(p, t, 0.05, reduction="none"), [pred, target], gl)
    if dtype == torch.float32:
        for a, b in zip(got, truth):
            torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-6)
    else:
        ref = _run(
            lambda p, t: reference.pseudo_huber_loss(p, t, 0.05, reduction="none", accumulate_in_float32=False),
            [pred, target],
            gl.to(dtype),
        )
        for a, r, t in zip(got, ref, truth):
            assert (a.double() - t).abs().max() <= 2 * (r.double() - t).abs().max() + 1e-6


@pytest.mark.parametrize("mode", ["none", "qk", "qkv"])
@pytest.mark.parametrize("shape", ATTN_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_attention_cuda(shape, mode, dtype):
    _require_cuda_ext()
    B, H, Nq, Nk, d = shape
    gen = torch.Generator(device="cuda").manual_seed(sum(shape))
    q = torch.randn(B, H, Nq, d, device="cuda", generator=gen).to(dtype)
    k = torch.randn(B, H, Nk, d, device="cuda", generator=gen).to(dtype)
    v = torch.randn(B, H, Nk, d, device="cuda", generator=gen).to(dtype)
    g = torch.randn(B, H, Nq, d, device="cuda", generator=gen).to(dtype)
    truth = _run(reference.normalized_attention, [q.double(), k.double(), v.double()], g.double(), normalize=mode)
    got = _run(cm_kernels.normalized_attention, [q, k, v], g, normalize=mode)
    ref = _run(reference.normalized_attention, [q, k, v], g, normalize=mode)
    for a, r, t in zip(got, ref, truth):
        err, err_ref = (a.double() - t).abs().max().item(), (r.double() - t).abs().max().item()
        assert err <= 2 * err_ref + 1e-5, (err, err_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_qkv_layout_cuda(dtype):
    _require_cuda_ext()
    B, H, d, N = 2, 4, 64, 257
    qkv = torch.randn(B, 3 * H * d, N, device="cuda").to(dtype)
    gout = torch.randn(B, H * d, N, device="cuda").to(dtype)
    got = _run(lambda t: cm_kernels.normalized_attention_qkv(t, H), [qkv], gout)
    truth = _run(lambda t: reference.normalized_attention_qkv(t, H), [qkv.double()], gout.double())
    ref = _run(lambda t: reference.normalized_attention_qkv(t, H), [qkv], gout)
    for a, r, t in zip(got, ref, truth):
        assert (a.double() - t).abs().max() <= 2 * (r.double() - t).abs().max() + 1e-5


def test_attention_bound_cuda():
    _require_cuda_ext()
    d = 32
    u = torch.randn(1, 1, 1, d, device="cuda") * 100
    k = u * torch.tensor([1.0, -1.0, -1.0, 1.0, -1.0], device="cuda").view(1, 1, 5, 1)
    v = torch.randn(1, 1, 5, d, device="cuda")
    q = torch.cat([u, -u], dim=2)
    out = cm_kernels.normalized_attention(q, k, v, scale=40.0 / d)
    ref = reference.normalized_attention(q.double(), k.double(), v.double(), scale=40.0 / d)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)


def test_cuda_opcheck():
    _require_cuda_ext()
    q, k, v = (torch.randn(2, 2, 9, 32, device="cuda", requires_grad=True) for _ in range(3))
    torch.library.opcheck(torch.ops.cm_kernels.normalized_attention_fwd.default, (q, k, v, 0.2, "qkv", 1e-4))
    p = torch.randn(3, 5, device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.cm_kernels.pseudo_huber_fwd.default, (p, torch.randn(3, 5, device="cuda"), 0.5))


# ---- the opt-in tensor-core forward (csrc/cuda/attention_mma.cuh) -------------------------------


@pytest.fixture
def tensor_cores():
    """The mma.sync forward on for one test, then back to the setting before."""
    before = cm_kernels.cuda_tensor_cores()
    cm_kernels.set_cuda_tensor_cores(True)
    try:
        yield
    finally:
        cm_kernels.set_cuda_tensor_cores(before)


MMA_SHAPES = [  # B, H, Nq, Nk, d: every head dim, tails of the 64-row blocks and 64-key tiles, 8-key chunks
    (1, 1, 1, 1, 16),
    (2, 3, 65, 70, 32),
    (1, 2, 130, 129, 64),
    (2, 1, 64, 64, 96),
    (1, 2, 257, 100, 128),
    (2, 2, 1024, 1024, 64),
]


@pytest.mark.parametrize("mode", ["none", "qk", "qkv"])
@pytest.mark.parametrize("shape", MMA_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attention_cuda_tensor_cores(tensor_cores, shape, mode, dtype):
    """Forward (tensor cores) and backward (SIMT, from the forward's logsumexp) within twice the
    error torch's own half-precision reference makes against float64."""
    _require_cuda_ext()
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("mma.sync with bfloat16 needs sm_80")
    B, H, Nq, Nk, d = shape
    gen = torch.Generator(device="cuda").manual_seed(sum(shape) + 7)
    q = torch.randn(B, H, Nq, d, device="cuda", generator=gen).to(dtype) * 2
    k = torch.randn(B, H, Nk, d, device="cuda", generator=gen).to(dtype) * 2
    v = torch.randn(B, H, Nk, d, device="cuda", generator=gen).to(dtype)
    g = torch.randn(B, H, Nq, d, device="cuda", generator=gen).to(dtype)
    truth = _run(reference.normalized_attention, [q.double(), k.double(), v.double()], g.double(), normalize=mode)
    got = _run(cm_kernels.normalized_attention, [q, k, v], g, normalize=mode)
    ref = _run(reference.normalized_attention, [q, k, v], g, normalize=mode)
    for name, a, r, t in zip(("out", "dq", "dk", "dv"), got, ref, truth):
        err, err_ref = (a.double() - t).abs().max().item(), (r.double() - t).abs().max().item()
        assert err <= 2 * err_ref + 1e-5, (name, err, err_ref)
    _, lse = torch.ops.cm_kernels.normalized_attention_fwd(q, k, v, 1 / d**0.5, mode, 1e-4)

    def logsumexp(a, b):
        if mode != "none":
            a, b = reference.normalize_heads(a), reference.normalize_heads(b)
        return torch.logsumexp((a @ b.transpose(-1, -2) / d**0.5).double(), dim=-1)

    truth_lse, ref_lse = logsumexp(q.double(), k.double()), logsumexp(q, k)  # torch in the half dtype
    err, err_ref = (lse.double() - truth_lse).abs().max().item(), (ref_lse - truth_lse).abs().max().item()
    assert err <= 2 * err_ref + 1e-4, ("lse", err, err_ref)


def test_attention_qkv_layout_cuda_tensor_cores(tensor_cores):
    _require_cuda_ext()
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("mma.sync with bfloat16 needs sm_80")
    B, H, d, N = 2, 4, 64, 257
    qkv = torch.randn(B, N, 3 * H * d, device="cuda").transpose(1, 2).to(torch.bfloat16)  # channels-first, strided
    out = cm_kernels.normalized_attention_qkv(qkv, H)
    truth = reference.normalized_attention_qkv(qkv.double(), H)
    ref = reference.normalized_attention_qkv(qkv, H)
    assert (out.double() - truth).abs().max() <= 2 * (ref.double() - truth).abs().max() + 1e-5

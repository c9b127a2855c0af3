"""cm_kernels.pseudo_huber_loss against the reference: gradcheck, random shapes, dtypes, opcheck."""

import cm_kernels
import pytest
import torch
from cm_kernels import reference

SHAPES = [(1, 1), (1, 7), (5, 3, 4, 4), (3, 3, 17, 9), (2, 20000), (4, 40000), (7,)]


def _draw(shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(shape, generator=g, dtype=torch.float64)
    target = torch.randn(shape, generator=g, dtype=torch.float64)
    weight = torch.rand(shape[0], generator=g, dtype=torch.float64) + 0.5
    return pred.to(dtype), target.to(dtype), weight


def test_gradcheck_float64():
    pred, target, weight = _draw((4, 3, 2, 5))
    pred.requires_grad_()
    target.requires_grad_()
    weight.requires_grad_()
    for reduction in ("mean", "sum", "none"):
        fn = lambda p, t, w, r=reduction: cm_kernels.pseudo_huber_loss(p, t, 0.3, weight=w, reduction=r)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (pred, target, weight))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_reference_float32(shape, reduction):
    pred, target, weight = _draw(shape, torch.float32, seed=len(shape) + shape[0])
    c = 0.00054 * (sum(shape) ** 0.5)  # iCT: c = 0.00054 sqrt(d)
    for w in (None, weight.float()):
        p1, p2 = pred.clone().requires_grad_(), pred.clone().requires_grad_()
        t1, t2 = target.clone().requires_grad_(), target.clone().requires_grad_()
        out = cm_kernels.pseudo_huber_loss(p1, t1, c, weight=w, reduction=reduction)
        ref = reference.pseudo_huber_loss(p2, t2, c, weight=w, reduction=reduction)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        g = torch.randn(out.shape)
        out.backward(g)
        ref.backward(g)
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(t1.grad, t2.grad, rtol=1e-5, atol=1e-7)


def test_non_contiguous_and_small_c():
    pred, target, _ = _draw((6, 8, 10), torch.float32, seed=3)
    p = pred.transpose(1, 2)  # non-contiguous
    t = target[:, :, :].transpose(1, 2)
    for c in (1e-6, 0.03, 10.0):
        torch.testing.assert_close(
            cm_kernels.pseudo_huber_loss(p, t, c, reduction="none"),
            reference.pseudo_huber_loss(p.double(), t.double(), c, reduction="none").float(),
            rtol=2e-6,
            atol=1e-7,
        )


def test_tiny_residual_has_no_cancellation():
    # ||x - y||^2 << c^2: the kernel's s / (sqrt(s + c^2) + c) keeps full relative precision.
    pred = torch.full((2, 4), 1.0)
    target = pred + 1e-4
    out = cm_kernels.pseudo_huber_loss(pred, target, 1.0, reduction="none")
    exact = reference.pseudo_huber_loss(pred.double(), target.double(), 1.0, reduction="none")
    torch.testing.assert_close(out.double(), exact, rtol=1e-3, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_within_twice_torch_error(dtype):
    pred64, target64, weight = _draw((8, 3, 16, 16), seed=11)
    pred, target = pred64.to(dtype), target64.to(dtype)
    truth_in = (pred.double().requires_grad_(), target.double())
    truth = reference.pseudo_huber_loss(*truth_in, 0.1, reduction="none")
    truth.backward(torch.ones_like(truth))

    def run(fn, **kw):
        p = pred.clone().requires_grad_()
        out = fn(p, target, 0.1, reduction="none", **kw)
        out.backward(torch.ones_like(out))
        return out, p.grad

    out, grad = run(cm_kernels.pseudo_huber_loss)
    ref, ref_grad = run(reference.pseudo_huber_loss, accumulate_in_float32=False)
    assert out.dtype == torch.float32 and grad.dtype == dtype
    err = lambda x, y: (x.double() - y).abs().max().item()  # noqa: E731
    assert err(out, truth) <= 2 * err(ref, truth) + 1e-6
    assert err(grad, truth_in[0].grad) <= 2 * err(ref_grad, truth_in[0].grad) + 1e-6


def test_opcheck():
    pred, target, _ = _draw((3, 5, 7), torch.float32, seed=5)
    pred.requires_grad_()
    torch.library.opcheck(torch.ops.cm_kernels.pseudo_huber_fwd.default, (pred, target, 0.5))
    loss = torch.ops.cm_kernels.pseudo_huber_fwd(pred.detach(), target, 0.5)
    torch.library.opcheck(
        torch.ops.cm_kernels.pseudo_huber_bwd.default, (torch.rand(3), pred.detach(), target, loss, 0.5)
    )


def test_torch_compile_cpu():
    pred, target, weight = _draw((4, 3, 8, 8), torch.float32, seed=9)
    pred.requires_grad_()
    fn = torch.compile(cm_kernels.pseudo_huber_loss, backend="aot_eager", fullgraph=True)
    out = fn(pred, target, 0.2, weight.float())
    out.backward()
    p2 = pred.detach().clone().requires_grad_()
    ref = reference.pseudo_huber_loss(p2, target, 0.2, weight.float())
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(pred.grad, p2.grad)

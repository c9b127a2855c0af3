"""Forward-mode AD (torch.func.jvp, as sCM and MeanFlow use it) through every cm-nets preset and
attention backend: the tangent equals the reverse-mode directional derivative (autograd's vjp, an
independent computation) and, in float64 without attention, a central finite difference. A backend
without a forward-mode rule is replaced by one with it, said once, instead of failing or returning zeros."""

import logging

import pytest
import torch

import cm_nets
from cm_nets.testing import SMALL, make_inputs

ATTENTION = [name for name in SMALL if name not in ("mlp-toy", "unet-tiny")]


def _perturbed(name, backend="auto", dtype=torch.float32):
    over = dict(SMALL[name][0])
    if name not in ("mlp-toy",):
        over["attention_backend"] = backend
    torch.manual_seed(0)
    try:
        net = cm_nets.create(name, **over)
    except TypeError:
        over.pop("attention_backend", None)
        net = cm_nets.create(name, **over)
    with torch.no_grad():  # zero-initialized output layers would make every tangent zero
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.to(dtype).eval()


def _check(net, name, dtype, rtol):
    x, c, kw = make_inputs(name, dtype=dtype)
    c = c.to(dtype)
    g = torch.Generator().manual_seed(1)
    dx = torch.randn(x.shape, generator=g, dtype=dtype)
    dc = torch.randn(c.shape, generator=g, dtype=dtype)

    def fn(a, b):
        return net(a, b, **kw)

    out, tangent = torch.func.jvp(fn, (x, c), (dx, dc))
    assert tangent.abs().max() > 0
    w = torch.randn(out.shape, generator=g, dtype=dtype)
    xr, cr = x.clone().requires_grad_(True), c.clone().requires_grad_(True)
    gx, gc = torch.autograd.grad((fn(xr, cr) * w).sum(), (xr, cr))
    forward = (w * tangent).sum().item()
    reverse = (gx * dx).sum().item() + (gc * dc).sum().item()
    assert forward == pytest.approx(reverse, rel=rtol, abs=rtol * abs(reverse) + 1e-9), (name, forward, reverse)
    return fn, x, c, dx, dc, tangent


@pytest.mark.parametrize("name", sorted(SMALL))
def test_jvp_equals_reverse_mode_through_every_preset(name):
    _check(_perturbed(name), name, torch.float32, 1e-3)


def test_jvp_equals_finite_differences_in_float64():
    """mlp-toy in float64 along x (its noise embedding is computed in float32 by design, as the
    reference networks', so the time direction is checked against reverse mode above instead)."""
    net = _perturbed("mlp-toy", dtype=torch.float64)
    x, c, kw = make_inputs("mlp-toy", dtype=torch.float64)
    dx = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    _, tangent = torch.func.jvp(lambda a: net(a, c, **kw), (x,), (dx,))
    h = 1e-6
    fd = (net(x + h * dx, c, **kw) - net(x - h * dx, c, **kw)) / (2 * h)
    torch.testing.assert_close(tangent, fd, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("backend", ["math", "sdpa", "fused", "auto"])
@pytest.mark.parametrize("name", ["adm-imagenet64-no32-qkv", "ddpmpp-cifar10", "edm2-xs"])
def test_every_attention_backend_gives_a_correct_tangent(name, backend, caplog):
    caplog.set_level(logging.WARNING, logger="cm_nets")
    _check(_perturbed(name, backend), name, torch.float32, 1e-3)


def test_a_backend_without_forward_ad_is_replaced_and_said_once(caplog):
    from cm_nets import backends

    for instead in ("fused", "math"):
        backends._logged.discard(("forward-ad", "sdpa", instead))
    caplog.set_level(logging.WARNING, logger="cm_nets")
    q = torch.randn(1, 2, 8, 16)
    for _ in range(2):
        out, tangent = torch.func.jvp(lambda a: backends.attention(a, a, a, backend="sdpa"), (q,), (torch.ones_like(q),))
    ref = torch.func.jvp(lambda a: backends.attention(a, a, a, backend="math"), (q,), (torch.ones_like(q),))[1]
    torch.testing.assert_close(tangent, ref)
    said = [r for r in caplog.records if "forward-mode" in r.getMessage() and "sdpa" in r.getMessage()]
    assert len(said) == 1
    # on the CPU the fused kernel's one-pass JVP replaces it where it covers the call, else math
    import cm_kernels

    fused_here = cm_kernels.backends()["normalized_attention"]["backend"] != "reference"
    assert ("using fused" if fused_here else "using math") in said[0].getMessage()
    # outside a JVP, sdpa stays sdpa (no message)
    backends.attention(q, q, q, backend="sdpa")
    assert len([r for r in caplog.records if "forward-mode" in r.getMessage()]) == 1


def test_the_fused_backend_keeps_its_own_forward_mode_rule(caplog):
    """cm_kernels declares FORWARD_AD: under a JVP the fused kernel runs (no switch, no message) and
    its tangent equals math's (float64: the reference path of both)."""
    import cm_kernels
    from cm_nets import backends

    assert cm_kernels.FORWARD_AD
    caplog.set_level(logging.WARNING, logger="cm_nets")
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 16, 32, generator=g) for _ in range(3))
    t = [torch.randn(2, 2, 16, 32, generator=g) for _ in range(3)]
    fused = torch.func.jvp(lambda a, b, c: backends.attention(a, b, c, backend="fused", normalize="qkv"), (q, k, v), tuple(t))[1]
    math_ = torch.func.jvp(lambda a, b, c: backends.attention(a, b, c, backend="math", normalize="qkv"), (q, k, v), tuple(t))[1]
    torch.testing.assert_close(fused, math_, rtol=1e-4, atol=1e-5)
    assert not [r for r in caplog.records if "forward-mode" in r.getMessage()]


@pytest.mark.parametrize("dtype,head,expect", [(torch.float32, 16, "fused"), (torch.float32, 24, "math"),
                                               (torch.float64, 16, "math")])  # fmt: skip
def test_the_replacement_under_a_jvp(dtype, head, expect, monkeypatch):
    """Which backend replaces one without a forward-mode rule: the fused CPU JVP where it covers
    the call (not float64, head dim a multiple of 16), math elsewhere; the tangent is exact either way."""
    import cm_kernels
    from cm_nets import backends

    if expect == "fused" and cm_kernels.backends()["normalized_attention"]["backend"] == "reference":
        expect = "math"  # no compiled kernels: no fused JVP
    seen = []
    real = cm_kernels.normalized_attention
    monkeypatch.setattr(cm_kernels, "normalized_attention", lambda *a, **k: seen.append(1) or real(*a, **k))
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 12, head, generator=g, dtype=dtype) for _ in range(3))
    t = tuple(torch.randn(1, 2, 12, head, generator=g, dtype=dtype) for _ in range(3))
    got = torch.func.jvp(lambda a, b, c: backends.attention(a, b, c, backend="sdpa", normalize="qk"), (q, k, v), t)[1]
    assert bool(seen) == (expect == "fused")
    truth = torch.func.jvp(
        lambda a, b, c: backends.attention(a, b, c, backend="math", normalize="qk"),
        tuple(x.double() for x in (q, k, v)),
        tuple(x.double() for x in t),
    )[1]
    torch.testing.assert_close(got.double(), truth, rtol=1e-4, atol=1e-5)

"""Scalings and network wrappers (parameterization.py) against hand values and closed forms."""

import math

import numpy as np
import pytest
import torch
from cm_core import (
    BidirectionalConsistencyFunction,
    ConsistencyFunction,
    EDMDenoiser,
    GaussianMixture,
    bcm_scalings,
    c_noise,
    consistency_scalings,
    edm_scalings,
)
from torch import nn

SD, SMIN = 0.5, 0.002


def _np_scalings(sigma, sigma_min=SMIN, sd=SD):
    sigma = np.asarray(sigma, dtype=np.float64)
    root = np.sqrt(sigma**2 + sd**2)
    return sd**2 / ((sigma - sigma_min) ** 2 + sd**2), (sigma - sigma_min) * sd / root, 1 / root


def _np_c_noise(sigma, convention):
    sigma = np.asarray(sigma, dtype=np.float64)
    return np.log(sigma) / 4 if convention == "edm" else 250.0 * np.log(sigma + 1e-44)


class RandomNet(nn.Module):
    """An arbitrary network that really uses its noise input (sinusoidal embedding) and labels."""

    def __init__(self, channels=3, num_classes=None):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, channels, 3, padding=1)
        self.freqs = nn.Parameter(torch.randn(8))
        self.label = nn.Embedding(num_classes, 8) if num_classes else None

    def forward(self, x, noise, class_labels=None, **extra):
        emb = torch.cos(noise[:, None].to(x.dtype) * self.freqs.to(x.dtype))
        if self.label is not None and class_labels is not None:
            emb = emb + self.label(class_labels).to(x.dtype)
        h = torch.tanh(self.conv1(x) + emb[:, :, None, None])
        return self.conv2(h) * 3.0


class SpyNet(nn.Module):
    """Records its inputs and returns a known function of them: F = 2·x_in + c_noise (broadcast)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, noise, **kw):
        self.calls.append((x.detach().clone(), noise.detach().clone(), dict(kw)))
        return 2 * x + noise.to(x.dtype).reshape([-1] + [1] * (x.ndim - 1))


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---- scalings ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_consistency_scalings_boundary_exact(dtype):
    c_skip, c_out, c_in = consistency_scalings(torch.tensor([SMIN, SMIN], dtype=dtype))
    assert torch.equal(c_skip, torch.ones(2, dtype=dtype))
    assert torch.equal(c_out, torch.zeros(2, dtype=dtype))
    assert c_in.dtype == dtype
    # Python float σ: the same exact boundary.
    c_skip, c_out, _ = consistency_scalings(SMIN)
    assert c_skip.item() == 1.0 and c_out.item() == 0.0


def test_consistency_scalings_large_sigma():
    c_skip, c_out, c_in = consistency_scalings(torch.tensor([1e4, 1e6], dtype=torch.float64))
    assert c_skip[1].item() < 1e-12
    assert c_skip[0].item() == pytest.approx(0.25 / (1e4 - SMIN) ** 2, rel=1e-12)
    np.testing.assert_allclose(c_out.numpy(), [SD, SD], rtol=1e-6)
    np.testing.assert_allclose(c_in.numpy(), [1e-4, 1e-6], rtol=1e-8)


def test_consistency_scalings_hand_values_at_one():
    c_skip, c_out, c_in = consistency_scalings(torch.tensor(1.0, dtype=torch.float64))
    # 0.25/(0.998² + 0.25), 0.998·0.5/√1.25, 1/√1.25 (30-digit decimal arithmetic).
    assert c_skip.item() == pytest.approx(0.200641410460961602, rel=1e-14)
    assert c_out.item() == pytest.approx(0.446319168308958023, rel=1e-14)
    assert c_in.item() == pytest.approx(0.894427190999915879, rel=1e-14)


def test_consistency_scalings_match_numpy_random():
    sigma = np.exp(np.random.default_rng(0).normal(-1.1, 2.0, 500))
    for sd, smin in [(0.5, 0.002), (1.0, 0.0), (0.2, 0.01)]:
        got = consistency_scalings(torch.from_numpy(sigma), sd, smin)
        for g, w in zip(got, _np_scalings(sigma, smin, sd)):
            np.testing.assert_allclose(g.numpy(), w, rtol=1e-13)


def test_edm_scalings_is_sigma_min_zero():
    sigma = torch.exp(torch.randn(100, generator=_gen(1), dtype=torch.float64))
    for a, b in zip(edm_scalings(sigma), consistency_scalings(sigma, SD, 0.0)):
        assert torch.equal(a, b)
    c_skip, c_out, c_in = edm_scalings(torch.tensor(1.0, dtype=torch.float64))
    assert c_skip.item() == pytest.approx(0.2, rel=1e-15)  # 0.25/1.25
    assert c_out.item() == pytest.approx(0.447213595499957939, rel=1e-14)  # 0.5/√1.25
    c_skip0, c_out0, _ = edm_scalings(0.0)
    assert c_skip0.item() == 1.0 and c_out0.item() == 0.0


def test_bcm_scalings_identity_and_edm_limit():
    sigma = torch.exp(torch.randn(64, generator=_gen(2), dtype=torch.float64) * 2)
    c_skip, c_out, c_in = bcm_scalings(sigma, sigma)
    torch.testing.assert_close(c_skip, torch.ones_like(sigma), rtol=0, atol=1e-15)
    assert torch.equal(c_out, torch.zeros_like(sigma))
    for a, b in zip(bcm_scalings(sigma, 0.0), edm_scalings(sigma)):
        torch.testing.assert_close(a, b, rtol=1e-15, atol=0)


def test_bcm_scalings_formula():
    g = np.random.default_rng(3)
    s = np.exp(g.normal(0, 2, 200))
    e = np.exp(g.normal(0, 2, 200))
    c_skip, c_out, c_in = bcm_scalings(torch.from_numpy(s), torch.from_numpy(e), 0.7)
    root = np.sqrt(s**2 + 0.49)
    np.testing.assert_allclose(c_skip.numpy(), (s * e + 0.49) / (s**2 + 0.49), rtol=1e-13)
    np.testing.assert_allclose(c_out.numpy(), (s - e) * 0.7 / root, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(c_in.numpy(), 1 / root, rtol=1e-13)


def test_c_noise_conventions():
    sigma = np.array([0.002, 0.1, 1.0, 2.5, 80.0])
    got_edm = c_noise(torch.from_numpy(sigma), "edm")
    got_oai = c_noise(torch.from_numpy(sigma), "openai")
    np.testing.assert_allclose(got_edm.numpy(), np.log(sigma) / 4, rtol=1e-14)
    np.testing.assert_allclose(got_oai.numpy(), 250.0 * np.log(sigma), rtol=1e-14)
    assert c_noise(1.0, "edm").item() == 0.0
    # openai's 1e-44 keeps σ = 0 finite: 250·ln(1e-44) = −25328.…
    zero = c_noise(torch.tensor([0.0], dtype=torch.float64), "openai")
    assert zero.item() == pytest.approx(250 * math.log(1e-44), rel=1e-14)
    assert c_noise(0.5).item() == pytest.approx(math.log(0.5) / 4, rel=1e-14)  # default "edm"


# ---- ConsistencyFunction -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("convention", ["edm", "openai"])
def test_consistency_function_boundary_exact(dtype, convention):
    torch.manual_seed(0)
    net = RandomNet().to(dtype)
    f = ConsistencyFunction(net, c_noise=convention)
    x = torch.randn(4, 3, 8, 8, generator=_gen(5), dtype=dtype) * 3
    out = f(x, SMIN)
    assert out.dtype == dtype
    assert torch.equal(out, x)
    # Per-sample σ: only the samples at σ_min are left untouched.
    sig = torch.tensor([SMIN, 1.0, SMIN, 10.0], dtype=torch.float64)
    out = f(x, sig)
    assert torch.equal(out[0], x[0]) and torch.equal(out[2], x[2])
    assert not torch.allclose(out[1], x[1]) and not torch.allclose(out[3], x[3])


@pytest.mark.parametrize("convention", ["edm", "openai"])
def test_consistency_function_formula_and_net_inputs(convention):
    spy = SpyNet()
    f = ConsistencyFunction(spy, sigma_data=SD, sigma_min=SMIN, c_noise=convention)
    x = torch.randn(3, 2, 4, 5, generator=_gen(6), dtype=torch.float64)
    labels = torch.tensor([1, 7, 3])
    sig = np.array([0.05, 1.3, 40.0])
    out = f(x, torch.from_numpy(sig), class_labels=labels, extra_flag="yes")
    assert len(spy.calls) == 1
    x_in, noise, kw = spy.calls[0]
    c_skip, c_out, c_in = _np_scalings(sig)
    xn = x.numpy()
    b = (-1, 1, 1, 1)
    np.testing.assert_allclose(x_in.numpy(), c_in.reshape(b) * xn, rtol=1e-14)
    assert noise.shape == (3,)
    np.testing.assert_allclose(noise.numpy(), _np_c_noise(sig, convention), rtol=1e-14)
    assert set(kw) == {"class_labels", "extra_flag"}
    assert kw["class_labels"] is labels and kw["extra_flag"] == "yes"
    raw = 2 * c_in.reshape(b) * xn + _np_c_noise(sig, convention).reshape(b)
    want = c_skip.reshape(b) * xn + c_out.reshape(b) * raw
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-12, atol=1e-13)


def test_consistency_function_scalar_sigma_broadcasts_to_batch():
    spy = SpyNet()
    f = ConsistencyFunction(spy)
    x = torch.randn(5, 3, 4, 4, generator=_gen(7))
    out = f(x, 2.0)
    _, noise, _ = spy.calls[0]
    assert noise.shape == (5,)
    torch.testing.assert_close(noise, torch.full((5,), math.log(2.0) / 4))
    out_per_sample = f(x, torch.full((5,), 2.0))
    torch.testing.assert_close(out, out_per_sample, rtol=0, atol=0)


def test_consistency_function_class_labels_change_output():
    torch.manual_seed(1)
    net = RandomNet(num_classes=10).double()
    f = ConsistencyFunction(net)
    x = torch.randn(2, 3, 8, 8, generator=_gen(8), dtype=torch.float64)
    a = f(x, 1.0, class_labels=torch.tensor([0, 1]))
    b = f(x, 1.0, class_labels=torch.tensor([2, 3]))
    assert not torch.allclose(a, b)


def test_consistency_function_edm_boundary():
    spy = SpyNet()
    f = ConsistencyFunction(spy, boundary="edm")
    x = torch.randn(2, 3, 4, 4, generator=_gen(9), dtype=torch.float64)
    sig = np.array([SMIN, 0.8])
    out = f(x, torch.from_numpy(sig))
    c_skip, c_out, c_in = _np_scalings(sig, sigma_min=0.0)
    b = (-1, 1, 1, 1)
    raw = 2 * c_in.reshape(b) * x.numpy() + (np.log(sig) / 4).reshape(b)
    np.testing.assert_allclose(out.numpy(), c_skip.reshape(b) * x.numpy() + c_out.reshape(b) * raw, rtol=1e-12)
    # No boundary shift: σ_min is not the identity any more...
    assert not torch.allclose(out[0], x[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_consistency_function_edm_boundary_identity_at_zero(dtype):
    # ...but σ = 0 is, even though ln(0)/4 = −inf reaches the network (cos(−inf) = nan).
    torch.manual_seed(2)
    f = ConsistencyFunction(RandomNet().to(dtype), boundary="edm")
    x = torch.randn(3, 3, 8, 8, generator=_gen(10), dtype=dtype)
    out = f(x, torch.tensor([0.0, 0.5, 0.0]))
    assert torch.equal(out[0], x[0]) and torch.equal(out[2], x[2])
    assert bool(torch.isfinite(out).all())
    d = EDMDenoiser(f.net)
    assert torch.equal(d(x, 0.0), x)


def test_consistency_function_errors():
    f = ConsistencyFunction(SpyNet())
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="sigma"):
        f(x, -0.5)
    with pytest.raises(ValueError, match="sigma"):
        f(x, torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="sigma"):
        f(x, torch.ones(3))
    with pytest.raises(ValueError, match="sigma"):
        f(x, torch.ones(2, 1))
    with pytest.raises(ValueError, match="c_noise"):
        ConsistencyFunction(SpyNet(), c_noise="karras")
    with pytest.raises(ValueError, match="boundary"):
        ConsistencyFunction(SpyNet(), boundary="none")
    with pytest.raises(ValueError, match="sigma_data"):
        ConsistencyFunction(SpyNet(), sigma_data=0.0)
    with pytest.raises(ValueError, match="sigma_min"):
        ConsistencyFunction(SpyNet(), sigma_min=-1.0)
    with pytest.raises(ValueError, match="x must"):
        f(torch.zeros(0, 3), 1.0)

    class WrongShape(nn.Module):
        def forward(self, x, noise, **kw):
            return x[:, :1]

    with pytest.raises(ValueError, match="network returned shape"):
        ConsistencyFunction(WrongShape())(x, 1.0)
    with pytest.raises(ValueError, match="c_noise"):
        c_noise(1.0, "karras")
    with pytest.raises(ValueError, match="sigma"):
        consistency_scalings(-1.0)
    with pytest.raises(ValueError, match="sigma_end"):
        bcm_scalings(1.0, -0.1)


# ---- EDMDenoiser ---------------------------------------------------------------------------


def test_edm_denoiser_zero_net_is_the_gaussian_denoiser():
    """F = 0 leaves D = c_skip·x = σ_d²/(σ² + σ_d²)·x: the exact denoiser of N(0, σ_d² I)."""

    class Zero(nn.Module):
        def forward(self, x, noise, **kw):
            return torch.zeros_like(x)

    b, c, h, w = 6, 3, 4, 4
    d = EDMDenoiser(Zero(), sigma_data=SD)
    gm = GaussianMixture(means=[[0.0] * (c * h * w)], stds=SD)
    x = torch.randn(b, c, h, w, generator=_gen(11), dtype=torch.float64) * 5
    sig = torch.exp(torch.randn(b, generator=_gen(12), dtype=torch.float64) * 2)
    want = gm.denoise(x.reshape(b, -1), sig).reshape(b, c, h, w)
    torch.testing.assert_close(d(x, sig), want, rtol=1e-13, atol=1e-14)
    # A different σ_data is a different Gaussian: the check is not vacuous.
    other = GaussianMixture(means=[[0.0] * (c * h * w)], stds=1.0).denoise(x.reshape(b, -1), sig)
    assert not torch.allclose(d(x, sig), other.reshape(b, c, h, w))


def test_edm_denoiser_formula_with_spy():
    spy = SpyNet()
    d = EDMDenoiser(spy, c_noise="openai")
    x = torch.randn(2, 3, 4, 4, generator=_gen(13), dtype=torch.float64)
    sig = np.array([0.3, 7.0])
    out = d(x, torch.from_numpy(sig), class_labels=torch.tensor([4, 5]))
    c_skip, c_out, c_in = _np_scalings(sig, sigma_min=0.0)
    bb = (-1, 1, 1, 1)
    raw = 2 * c_in.reshape(bb) * x.numpy() + (250 * np.log(sig)).reshape(bb)
    np.testing.assert_allclose(out.numpy(), c_skip.reshape(bb) * x.numpy() + c_out.reshape(bb) * raw, rtol=1e-12)
    assert torch.equal(spy.calls[0][2]["class_labels"], torch.tensor([4, 5]))


# ---- BidirectionalConsistencyFunction ------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bcm_function_identity_when_end_equals_start(dtype):
    torch.manual_seed(3)
    f = BidirectionalConsistencyFunction(RandomNet().to(dtype))
    x = torch.randn(3, 3, 8, 8, generator=_gen(14), dtype=dtype)
    sig = torch.tensor([0.1, 2.4, 80.0], dtype=dtype)
    torch.testing.assert_close(f(x, sig, sig), x, rtol=1e-6 if dtype == torch.float32 else 1e-14, atol=0)


def test_bcm_function_net_inputs_and_formula():
    spy = SpyNet()
    f = BidirectionalConsistencyFunction(spy)  # openai convention by default
    x = torch.randn(2, 3, 4, 4, generator=_gen(15), dtype=torch.float64)
    s, e = np.array([80.0, 1.2]), np.array([2.4, 0.002])
    out = f(x, torch.from_numpy(s), torch.from_numpy(e), class_labels=torch.tensor([1, 2]))
    x_in, noise, kw = spy.calls[0]
    np.testing.assert_allclose(noise.numpy(), 250 * np.log(s), rtol=1e-14)
    assert kw["c_noise_end"].shape == (2,)
    np.testing.assert_allclose(kw["c_noise_end"].numpy(), 250 * np.log(e), rtol=1e-14)
    assert torch.equal(kw["class_labels"], torch.tensor([1, 2]))
    root = np.sqrt(s**2 + SD**2)
    bb = (-1, 1, 1, 1)
    c_skip = (s * e + SD**2) / (s**2 + SD**2)
    c_out = (s - e) * SD / root
    raw = 2 * (1 / root).reshape(bb) * x.numpy() + (250 * np.log(s)).reshape(bb)
    np.testing.assert_allclose(out.numpy(), c_skip.reshape(bb) * x.numpy() + c_out.reshape(bb) * raw, rtol=1e-12)


def test_bcm_function_default_end_is_sigma_min():
    spy = SpyNet()
    f = BidirectionalConsistencyFunction(spy, sigma_min=0.01, c_noise="edm")
    x = torch.randn(2, 3, 4, 4, generator=_gen(16), dtype=torch.float64)
    a = f(x, 5.0)
    b = f(x, 5.0, 0.01)
    assert torch.equal(a, b)
    np.testing.assert_allclose(spy.calls[0][2]["c_noise_end"].numpy(), [math.log(0.01) / 4] * 2, rtol=1e-14)


def test_bcm_function_errors():
    f = BidirectionalConsistencyFunction(SpyNet())
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="sigma"):
        f(x, 1.0, -0.5)
    with pytest.raises(ValueError, match="sigma"):
        f(x, torch.ones(5), 0.5)
    with pytest.raises(ValueError, match="c_noise"):
        BidirectionalConsistencyFunction(SpyNet(), c_noise="bad")

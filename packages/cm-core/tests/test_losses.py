"""Per-sample distances, weightings and LPIPS (losses.py) against float64 hand formulas."""

import math

import cm_core.losses as losses
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cm_core import LPIPS, default_huber_c, l1, l2_norm, pseudo_huber, pseudo_huber_reference, squared_l2, weighting


def _pair(seed, shape=(4, 3, 8, 8), dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=dtype) * scale, torch.randn(shape, generator=g, dtype=dtype) * scale)


def _np_sq_norm(p, t):
    r = p.double().numpy().reshape(p.shape[0], -1) - t.double().numpy().reshape(t.shape[0], -1)
    return (r**2).sum(1), r


@pytest.fixture
def reference_path(monkeypatch):
    """Force pseudo_huber onto pseudo_huber_reference (as CM_CORE_NO_KERNELS=1 does)."""
    monkeypatch.setattr(losses, "_KERNEL", None)
    monkeypatch.setattr(losses, "_KERNEL_REASON", "forced off by the test")


# ---- plain distances -----------------------------------------------------------------------


def test_squared_l2_l2_norm_l1_match_numpy():
    p, t = _pair(0)
    sq, r = _np_sq_norm(p, t)
    d = r.shape[1]
    np.testing.assert_allclose(squared_l2(p, t).numpy(), sq / d, rtol=1e-5)
    np.testing.assert_allclose(l2_norm(p, t).numpy(), np.sqrt(sq), rtol=1e-5)
    np.testing.assert_allclose(l1(p, t).numpy(), np.abs(r).mean(1), rtol=1e-5)
    for fn in (squared_l2, l2_norm, l1):
        out = fn(p, t)
        assert out.shape == (4,)
        assert torch.equal(fn(p, p), torch.zeros(4))


def test_distances_float64_exact():
    p, t = _pair(1, dtype=torch.float64)
    sq, r = _np_sq_norm(p, t)
    np.testing.assert_allclose(squared_l2(p, t).numpy(), sq / r.shape[1], rtol=1e-13)
    np.testing.assert_allclose(l2_norm(p, t).numpy(), np.sqrt(sq), rtol=1e-13)
    np.testing.assert_allclose(l1(p, t).numpy(), np.abs(r).mean(1), rtol=1e-13)


def test_distances_shape_errors():
    a, b = torch.zeros(2, 3), torch.zeros(2, 4)
    for fn in (squared_l2, l2_norm, l1, pseudo_huber, pseudo_huber_reference):
        args = (a, b) if fn is not pseudo_huber_reference else (a, b, 0.1)
        with pytest.raises(ValueError, match="shape"):
            fn(*args)
    with pytest.raises(ValueError, match="pred"):
        squared_l2(torch.zeros(0, 3), torch.zeros(0, 3))


def test_distance_lookup():
    assert losses.distance("l2") is squared_l2
    assert losses.distance("l2-norm") is l2_norm
    assert losses.distance("pseudo-huber") is pseudo_huber
    with pytest.raises(ValueError, match="distance"):
        losses.distance("lpips-alex")


# ---- pseudo-Huber --------------------------------------------------------------------------


def test_default_huber_c():
    # 3×64×64 = 12288: 0.00054·√12288 = 0.0598597…
    assert default_huber_c(12288) == pytest.approx(0.00054 * math.sqrt(12288), rel=1e-15)
    assert default_huber_c(12288) == pytest.approx(0.05986, abs=1e-5)
    assert default_huber_c(3 * 32 * 32) == pytest.approx(0.00054 * 55.42562584220407, rel=1e-12)


@pytest.mark.parametrize("c", [0.03, 0.5, 10.0])
def test_pseudo_huber_reference_matches_numpy(c):
    p, t = _pair(2)
    sq, _ = _np_sq_norm(p, t)
    want = np.sqrt(sq + c * c) - c
    np.testing.assert_allclose(pseudo_huber_reference(p, t, c).numpy(), want, rtol=2e-5)
    p64, t64 = p.double(), t.double()
    got = pseudo_huber_reference(p64, t64, c)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-13)


def test_pseudo_huber_reference_accumulates_half_in_fp32():
    p, t = _pair(3, dtype=torch.float16)
    got = pseudo_huber_reference(p, t, 0.1)
    assert got.dtype == torch.float32
    sq, _ = _np_sq_norm(p, t)
    np.testing.assert_allclose(got.numpy(), np.sqrt(sq + 0.01) - 0.1, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pseudo_huber_default_c(dtype, reference_path):
    p, t = _pair(4, dtype=dtype)
    c = 0.00054 * math.sqrt(3 * 8 * 8)
    sq, _ = _np_sq_norm(p, t)
    np.testing.assert_allclose(pseudo_huber(p, t).numpy(), np.sqrt(sq + c * c) - c, rtol=1e-5)


def test_pseudo_huber_limits(reference_path):
    c = 0.5
    # ‖r‖ ≪ c: √(‖r‖² + c²) − c = ‖r‖²/(2c)·(1 − ‖r‖²/(4c²) + …), here ‖r‖² ≈ 4e-8.
    p, t = _pair(5, dtype=torch.float64, scale=1e-5)
    sq, _ = _np_sq_norm(p, t)
    np.testing.assert_allclose(pseudo_huber(p, t, c).numpy(), sq / (2 * c), rtol=1e-6)
    # ‖r‖ ≫ c: ≈ ‖r‖ − c + c²/(2‖r‖).
    p, t = _pair(6, dtype=torch.float64, scale=1e3)
    sq, _ = _np_sq_norm(p, t)
    got = pseudo_huber(p, t, c).numpy()
    np.testing.assert_allclose(got, np.sqrt(sq) - c, rtol=1e-9)
    assert np.all(np.abs(got - (np.sqrt(sq) - c)) < c * c / np.sqrt(sq))


def test_pseudo_huber_divide_by_sqrt_d(reference_path):
    p, t = _pair(7, dtype=torch.float64)
    d = 3 * 8 * 8
    plain = pseudo_huber(p, t, 0.2)
    scaled = pseudo_huber(p, t, 0.2, divide_by_sqrt_d=True)
    torch.testing.assert_close(scaled, plain / math.sqrt(d), rtol=1e-14, atol=0)
    sq, _ = _np_sq_norm(p, t)
    np.testing.assert_allclose(scaled.numpy(), (np.sqrt(sq + 0.04) - 0.2) / math.sqrt(192), rtol=1e-13)


def test_pseudo_huber_errors():
    p, t = _pair(8)
    with pytest.raises(ValueError, match="c must"):
        pseudo_huber(p, t, c=0.0)
    with pytest.raises(ValueError, match="c must"):
        pseudo_huber(p, t, c=-1.0)


def test_pseudo_huber_no_kernels_env_path(monkeypatch):
    monkeypatch.setenv("CM_CORE_NO_KERNELS", "1")
    monkeypatch.setattr(losses, "_KERNEL", None)
    monkeypatch.setattr(losses, "_KERNEL_REASON", None)
    p, t = _pair(9)
    got = pseudo_huber(p, t, 0.1)
    assert losses._KERNEL is None
    assert "CM_CORE_NO_KERNELS" in losses._KERNEL_REASON
    assert torch.equal(got, pseudo_huber_reference(p, t, 0.1))


def test_pseudo_huber_default_path_equals_reference():
    p, t = _pair(10)
    torch.testing.assert_close(pseudo_huber(p, t, 0.07), pseudo_huber_reference(p, t, 0.07), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pseudo_huber_kernel_path_equals_reference(dtype, monkeypatch):
    try:
        from cm_kernels import pseudo_huber_loss
    except (ImportError, AttributeError) as exc:
        pytest.skip(f"cm_kernels.pseudo_huber_loss is not importable ({exc})")
    monkeypatch.setattr(losses, "_KERNEL", pseudo_huber_loss)
    monkeypatch.setattr(losses, "_KERNEL_REASON", None)
    p, t = _pair(11, dtype=dtype)
    got = pseudo_huber(p, t, 0.06)
    assert got.shape == (4,)
    want = pseudo_huber_reference(p, t, 0.06)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    scaled = pseudo_huber(p, t, 0.06, divide_by_sqrt_d=True)
    torch.testing.assert_close(scaled, want / math.sqrt(192), rtol=tol, atol=tol)


def test_pseudo_huber_gradcheck(reference_path):
    g = torch.Generator().manual_seed(12)
    p = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: pseudo_huber(a, b, 0.3), (p, t))
    # And the closed form: ∂/∂pred = r/√(‖r‖² + c²) per sample.
    loss = pseudo_huber(p, t, 0.3).sum()
    (grad,) = torch.autograd.grad(loss, p)
    r = (p - t).detach()
    norm = (r.flatten(1).square().sum(1) + 0.09).sqrt().reshape(-1, 1, 1, 1)
    torch.testing.assert_close(grad, r / norm, rtol=1e-12, atol=1e-14)


# ---- weighting -----------------------------------------------------------------------------


def test_weighting_values():
    s = np.array([0.002, 0.3, 1.0, 4.0, 80.0])
    sn = np.array([0.001, 0.2, 1.5, 3.0, 60.0])
    st = torch.from_numpy(s)
    np.testing.assert_allclose(weighting("uniform", st).numpy(), np.ones(5))
    np.testing.assert_allclose(weighting("snr", st).numpy(), 1 / s**2, rtol=1e-14)
    np.testing.assert_allclose(weighting("snr+1", st).numpy(), 1 / s**2 + 4.0, rtol=1e-14)
    np.testing.assert_allclose(weighting("edm", st).numpy(), (s**2 + 0.25) / (s * 0.5) ** 2, rtol=1e-13)
    np.testing.assert_allclose(weighting("snr+1", st, sigma_data=1.0).numpy(), 1 / s**2 + 1.0, rtol=1e-14)
    np.testing.assert_allclose(weighting("truncated-snr", st).numpy(), np.maximum(1 / s**2, 1.0), rtol=1e-14)
    np.testing.assert_allclose(weighting("ict", st, torch.from_numpy(sn)).numpy(), 1 / np.abs(s - sn), rtol=1e-12)
    # The order of σ and σ_next does not matter (ECT passes t and r < t).
    np.testing.assert_allclose(
        weighting("ict", torch.from_numpy(sn), torch.from_numpy(s)).numpy(), 1 / np.abs(s - sn), rtol=1e-12
    )


def test_weighting_errors():
    with pytest.raises(ValueError, match="sigma_next|neighbouring"):
        weighting("ict", torch.ones(3))
    with pytest.raises(ValueError, match="weighting"):
        weighting("lognormal", torch.ones(3))
    with pytest.raises(ValueError, match="sigma"):
        weighting("snr", torch.tensor([-1.0]))


# ---- LPIPS ---------------------------------------------------------------------------------

VGG16_CONVS = [  # (index in torchvision's vgg16().features, in, out)
    (0, 3, 64),
    (2, 64, 64),
    (5, 64, 128),
    (7, 128, 128),
    (10, 128, 256),
    (12, 256, 256),
    (14, 256, 256),
    (17, 256, 512),
    (19, 512, 512),
    (21, 512, 512),
    (24, 512, 512),
    (26, 512, 512),
    (28, 512, 512),
]
POOL_AFTER = {2, 7, 14, 21}  # conv indices followed by ReLU then max-pool
TAP_AFTER = {2, 7, 14, 21, 28}  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
CHANNELS = (64, 128, 256, 512, 512)


def _vgg_state(seed):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for idx, cin, cout in VGG16_CONVS:
        state[f"features.{idx}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * math.sqrt(2 / (9 * cin))
        state[f"features.{idx}.bias"] = torch.randn(cout, generator=g) * 0.01
    state["classifier.0.weight"] = torch.zeros(2, 2)  # extra keys (the classifier) are ignored
    return state


def _lpips_by_hand(state, head_sets, x, y):
    """LPIPS written out in float64 with functional ops from the raw state dict, for each head set."""
    shift = torch.tensor([-0.030, -0.088, -0.188], dtype=torch.float64).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450], dtype=torch.float64).view(1, 3, 1, 1)
    a, b = (x.double() - shift) / scale, (y.double() - shift) / scale
    totals, tap = [0] * len(head_sets), 0
    for idx, _, _ in VGG16_CONVS:
        w, bias = state[f"features.{idx}.weight"].double(), state[f"features.{idx}.bias"].double()
        a, b = F.relu(F.conv2d(a, w, bias, padding=1)), F.relu(F.conv2d(b, w, bias, padding=1))
        if idx in TAP_AFTER:
            na = a / (a.norm(dim=1, keepdim=True) + 1e-10)
            nb = b / (b.norm(dim=1, keepdim=True) + 1e-10)
            for j, heads in enumerate(head_sets):
                h = heads[tap].double().reshape(1, -1, 1, 1)
                totals[j] = totals[j] + ((na - nb) ** 2 * h).sum(1).mean((1, 2))
            tap += 1
        if idx in POOL_AFTER:
            a, b = F.max_pool2d(a, 2), F.max_pool2d(b, 2)
    return totals


def _images(seed, n=3, size=16):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1, torch.rand(n, 3, size, size, generator=g) * 2 - 1


@pytest.fixture(scope="module")
def random_lpips():
    torch.manual_seed(0)
    return LPIPS(resize=None)


def test_lpips_random_backbone_properties(random_lpips):
    x, y = _images(20)
    d_xy = random_lpips(x, y)
    assert d_xy.shape == (3,)
    assert bool((d_xy > 0).all())
    torch.testing.assert_close(random_lpips(x, x), torch.zeros(3), rtol=0, atol=1e-6)
    torch.testing.assert_close(random_lpips(y, x), d_xy, rtol=1e-5, atol=1e-7)
    assert not any(p.requires_grad for p in random_lpips.parameters())
    assert not random_lpips.training


def test_lpips_resize_path(random_lpips, monkeypatch):
    x, y = _images(21, n=2, size=8)
    direct = random_lpips(F.interpolate(x, size=16, mode="bilinear"), F.interpolate(y, size=16, mode="bilinear"))
    monkeypatch.setattr(random_lpips, "resize", 16)
    resized = random_lpips(x, y)
    assert resized.shape == (2,)
    torch.testing.assert_close(resized, direct, rtol=1e-5, atol=1e-7)


def test_lpips_loaded_backbone_and_heads_match_hand_computation(tmp_path, random_lpips):
    state = _vgg_state(1)
    backbone = tmp_path / "vgg16.pth"
    torch.save(state, backbone)
    g = torch.Generator().manual_seed(2)
    heads = [torch.rand(1, c, 1, 1, generator=g) * 0.1 for c in CHANNELS]
    head_file = tmp_path / "vgg_heads.pth"
    torch.save({f"lin{i}.model.1.weight": h for i, h in enumerate(heads)}, head_file)

    plain = random_lpips  # the same random initialization (seed 0) before loading
    torch.manual_seed(0)
    loaded = LPIPS(backbone_weights=backbone, resize=None)
    torch.manual_seed(0)
    full = LPIPS(backbone_weights=str(backbone), head_weights=head_file, resize=None)

    assert torch.equal(loaded.features[0].weight, state["features.0.weight"])
    assert torch.equal(loaded.features[28].bias, state["features.28.bias"])
    assert torch.equal(full.lins[4].weight, heads[4])

    x, y = _images(22, n=2)
    out_plain, out_loaded, out_full = plain(x, y), loaded(x, y), full(x, y)
    assert not torch.allclose(out_plain, out_loaded, rtol=1e-3)
    assert not torch.allclose(out_loaded, out_full, rtol=1e-3)
    uniform = [torch.full((1, c, 1, 1), 1.0 / c) for c in CHANNELS]
    want_uniform, want_heads = _lpips_by_hand(state, [uniform, heads], x, y)
    torch.testing.assert_close(out_loaded.double(), want_uniform, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(out_full.double(), want_heads, rtol=1e-4, atol=1e-7)


def test_lpips_wrong_backbone_file(tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match=r"features\.0\.weight"):
        LPIPS(backbone_weights=bad, resize=None)
    partial = tmp_path / "partial.pth"
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, partial)
    with pytest.raises(ValueError, match="missing"):
        LPIPS(backbone_weights=partial, resize=None)


def test_lpips_wrong_head_file(tmp_path):
    bad = tmp_path / "heads.pth"
    torch.save({"lin0.model.1.weight": torch.zeros(1, 64, 1, 1)}, bad)
    with pytest.raises(ValueError, match=r"lin1\.model\.1\.weight"):
        LPIPS(head_weights=bad, resize=None)


def test_lpips_input_errors(random_lpips):
    with pytest.raises(ValueError, match="RGB"):
        random_lpips(torch.zeros(2, 1, 16, 16), torch.zeros(2, 1, 16, 16))
    with pytest.raises(ValueError, match="shape"):
        random_lpips(torch.zeros(2, 3, 16, 16), torch.zeros(2, 3, 8, 8))


@pytest.mark.filterwarnings("ignore:.*(pretrained|weight enum).*:UserWarning")  # lpips calls vgg16(pretrained=…)
def test_lpips_matches_the_lpips_package(tmp_path):
    # The independent reference is the `lpips` package's own network: its VGG-16 with a random
    # backbone (pnet_rand: nothing downloaded) and the linear heads it ships. Our LPIPS reads the
    # same backbone as a torchvision state dict and the heads from the package's file.
    lpips = pytest.importorskip("lpips", reason="pip install 'cm-core[lpips]'")
    torch.manual_seed(3)
    theirs = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()
    backbone = {}
    for key, value in theirs.net.state_dict().items():  # slice{k}.{index in vgg16().features}.{weight,bias}
        _, index, name = key.split(".")
        backbone[f"features.{index}.{name}"] = value
    assert len(backbone) == 2 * len(VGG16_CONVS)
    torch.save(backbone, tmp_path / "vgg16.pth")
    ours = LPIPS(backbone_weights=tmp_path / "vgg16.pth", head_weights="lpips", resize=None)

    x, y = _images(23, n=3, size=32)
    with torch.no_grad():
        want = theirs(x, y, normalize=False).flatten()  # inputs already in [-1, 1]
    got = ours(x, y)
    assert bool((want > 0).all())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours(x, x), torch.zeros(3), rtol=0, atol=1e-6)

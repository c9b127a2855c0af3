"""Zero-shot editing (editing.py): the orthogonal operators, Algorithm 4 and interpolation.

The consistency function used throughout is the exact one of a Gaussian N(0, s² I) on the
flattened images (GaussianMixture's closed-form flow), so every run is deterministic given z and
the generator.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cm_core import (
    Colorization,
    GaussianMixture,
    Identity,
    SuperResolution,
    colorize,
    edit,
    inpaint,
    interpolate,
    multistep_sample,
    slerp,
    stroke_edit,
    super_resolve,
)

LUMA = np.array([0.2989, 0.5870, 0.1140])
SIGMAS = [80.0, 2.0, 0.5]
SMIN = 0.002


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _images(seed, shape=(2, 3, 8, 8)):
    return torch.randn(shape, generator=_gen(seed), dtype=torch.float64)


def _gaussian_f(shape_chw, std=0.5):
    d = int(np.prod(shape_chw))
    gm = GaussianMixture(means=[[0.0] * d], stds=std)

    def f(x, sigma, **cond):
        return gm.consistency(x.flatten(1), sigma, SMIN).reshape(x.shape)

    return f


def _luma(x):
    return torch.einsum("bc...,c->b...", x, torch.tensor(LUMA, dtype=x.dtype))


def _block_means(x, p):
    return F.interpolate(F.avg_pool2d(x, p), scale_factor=p, mode="nearest")


# ---- operators -----------------------------------------------------------------------------


def test_colorization_is_orthogonal():
    op = Colorization()
    q = op.q
    torch.testing.assert_close(q.T @ q, torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-14)
    x = _images(0, (4, 3, 5, 7))
    ax = op.forward(x)
    assert ax.shape == x.shape
    torch.testing.assert_close(op.inverse(ax), x, rtol=0, atol=1e-12)
    torch.testing.assert_close(op.forward(op.inverse(x)), x, rtol=0, atol=1e-12)
    torch.testing.assert_close(ax.flatten(1).norm(dim=1), x.flatten(1).norm(dim=1), rtol=1e-13, atol=0)


def test_colorization_first_basis_vector_is_luma():
    op = Colorization()
    np.testing.assert_allclose(op.q[:, 0].numpy(), LUMA / np.linalg.norm(LUMA), rtol=1e-14)
    x = _images(1, (3, 3, 4, 4))
    want = np.einsum("bchw,c->bhw", x.numpy(), LUMA) / np.linalg.norm(LUMA)
    np.testing.assert_allclose(op.forward(x)[:, 0].numpy(), want, rtol=1e-12, atol=1e-14)
    # The known part alone: the projection on the luma direction, each channel ∝ luma_c.
    gray = op.grayscale(x).numpy()
    proj = np.einsum("bhw,c->bchw", np.einsum("bchw,c->bhw", x.numpy(), LUMA), LUMA) / (LUMA @ LUMA)
    np.testing.assert_allclose(gray, proj, rtol=1e-12, atol=1e-13)


def test_colorization_known_mask():
    x = _images(2, (2, 3, 4, 4))
    m = Colorization().known_mask(x)
    assert m.shape == x.shape
    assert torch.equal(m[:, 0], torch.ones_like(m[:, 0]))
    assert torch.equal(m[:, 1:], torch.zeros_like(m[:, 1:]))


@pytest.mark.parametrize("p, hw", [(2, (8, 6)), (4, (16, 16)), (8, (8, 16))])
def test_superresolution_is_orthogonal(p, hw):
    op = SuperResolution(p)
    torch.testing.assert_close(op.q.T @ op.q, torch.eye(p * p, dtype=torch.float64), rtol=0, atol=1e-13)
    np.testing.assert_allclose(op.q[:, 0].numpy(), np.full(p * p, 1 / p), rtol=1e-14)
    x = _images(3, (2, 3) + hw)
    ax = op.forward(x)
    assert ax.shape == x.shape
    torch.testing.assert_close(op.inverse(ax), x, rtol=0, atol=1e-12)
    torch.testing.assert_close(op.forward(op.inverse(x)), x, rtol=0, atol=1e-12)
    torch.testing.assert_close(ax.flatten(1).norm(dim=1), x.flatten(1).norm(dim=1), rtol=1e-13, atol=0)


@pytest.mark.parametrize("p", [2, 4])
def test_superresolution_known_part_is_patch_means(p):
    op = SuperResolution(p)
    x = _images(4, (2, 3, 8, 12))
    torch.testing.assert_close(op.downsample(x), _block_means(x, p), rtol=0, atol=1e-12)
    m = op.known_mask(x)
    assert m.shape == x.shape
    assert m.sum().item() == x.numel() / p**2  # one known coefficient per patch and channel


def test_operator_errors():
    with pytest.raises(ValueError, match="luma"):
        Colorization((0.3, -0.6, 0.1))
    with pytest.raises(ValueError, match="luma"):
        Colorization((0.5, 0.5))
    with pytest.raises(ValueError, match=r"\[B, 3"):
        Colorization().forward(torch.zeros(2, 4, 3, 3))
    with pytest.raises(ValueError, match="patch_size"):
        SuperResolution(1)
    with pytest.raises(ValueError, match="divisible"):
        SuperResolution(4).forward(torch.zeros(1, 3, 10, 8))
    with pytest.raises(ValueError, match="mask"):
        Identity().known_mask(torch.zeros(1, 3, 4, 4))


# ---- Algorithm 4 ---------------------------------------------------------------------------


def _algorithm4_inpaint(f, y, mask, sigmas, z, generator):
    """CM Algorithm 4 for inpainting, written out (noise drawn in order, float32 then cast)."""
    x = y * mask + sigmas[0] * z
    for i, s in enumerate(sigmas):
        if i > 0:
            x = x + math.sqrt(s**2 - SMIN**2) * torch.randn(x.shape, generator=generator).to(x)
        x = f(x, s)
        x = y * mask + x * (1 - mask)
    return x


def test_inpaint_keeps_known_pixels_and_matches_algorithm_4():
    y = _images(5)
    f = _gaussian_f(y.shape[1:])
    mask = (torch.rand(1, 1, 8, 8, generator=_gen(6)) > 0.5).double()
    z = torch.randn(y.shape, generator=_gen(7), dtype=torch.float64)
    out = inpaint(f, y, mask, SIGMAS, z=z, generator=_gen(8))
    assert out.shape == y.shape
    known = mask.expand_as(y).bool()
    assert torch.equal(out[known], y[known])
    assert not torch.allclose(out[~known], y[~known])
    want = _algorithm4_inpaint(f, y, mask, SIGMAS, z, _gen(8))
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


def test_inpaint_without_z_is_reproducible():
    y = _images(9)
    f = _gaussian_f(y.shape[1:])
    mask = torch.zeros(8, 8, dtype=torch.float64)
    mask[:, :4] = 1
    a = inpaint(f, y, mask, SIGMAS, generator=_gen(10))
    b = inpaint(f, y, mask, SIGMAS, generator=_gen(10))
    c = inpaint(f, y, mask, SIGMAS, generator=_gen(11))
    assert torch.equal(a, b)
    assert not torch.allclose(a[..., 4:], c[..., 4:])
    assert torch.equal(a[..., :4], y[..., :4])


def test_colorize_keeps_luma():
    y = _images(12)
    f = _gaussian_f(y.shape[1:])
    out = colorize(f, y, SIGMAS, generator=_gen(13))
    torch.testing.assert_close(_luma(out), _luma(y), rtol=0, atol=1e-12)
    # The two chroma directions are generated, not copied.
    assert not torch.allclose(out, y, atol=1e-3)


def test_super_resolve_keeps_patch_means():
    y = _images(14, (2, 3, 16, 16))
    f = _gaussian_f(y.shape[1:])
    out = super_resolve(f, y, SIGMAS, patch_size=4, generator=_gen(15))
    torch.testing.assert_close(F.avg_pool2d(out, 4), F.avg_pool2d(y, 4), rtol=0, atol=1e-12)
    assert not torch.allclose(out, y, atol=1e-3)


def test_edit_with_explicit_mask_in_operator_space():
    # Colorization with all three coefficients known reproduces y.
    y = _images(16)
    f = _gaussian_f(y.shape[1:])
    out = edit(f, y, Colorization(), SIGMAS, torch.ones_like(y), generator=_gen(17))
    torch.testing.assert_close(out, y, rtol=0, atol=1e-12)


def test_stroke_edit():
    y = _images(18)
    f = _gaussian_f(y.shape[1:])
    z = torch.randn(y.shape, generator=_gen(19), dtype=torch.float64)
    # One step: f(y + σ_0·z, σ_0) — the stroke image is the starting point, nothing is kept fixed.
    one = stroke_edit(f, y, [5.0], z=z)
    torch.testing.assert_close(one, f(y + 5.0 * z, 5.0), rtol=1e-13, atol=1e-13)
    out = stroke_edit(f, y, [10.0, 1.0], z=z, generator=_gen(20))
    assert out.shape == y.shape
    assert bool(torch.isfinite(out).all())
    assert not torch.allclose(out, y)


def test_edit_mask_errors():
    y = _images(21)
    f = _gaussian_f(y.shape[1:])
    with pytest.raises(ValueError, match="mask"):
        inpaint(f, y, torch.ones(5, 5), SIGMAS)
    with pytest.raises(ValueError, match="mask"):
        inpaint(f, y, torch.ones(1, 2, 3, 8, 8), SIGMAS)
    half = torch.ones(8, 8)
    half[0, 0] = 0.5
    with pytest.raises(ValueError, match="mask"):
        inpaint(f, y, half, SIGMAS)
    with pytest.raises(ValueError, match="mask"):
        edit(f, y, Identity(), SIGMAS)
    with pytest.raises(ValueError, match="z shape"):
        inpaint(f, y, torch.ones(8, 8), SIGMAS, z=torch.zeros(1, 3, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="sigmas"):
        inpaint(f, y, torch.ones(8, 8), [1.0, 2.0])
    with pytest.raises(ValueError, match="start"):
        edit(f, y, Identity(), SIGMAS, torch.ones(8, 8), start="middle")


# ---- slerp / interpolate -------------------------------------------------------------------


def test_slerp_endpoints_exact():
    z1 = torch.randn(3, 3, 4, 4, generator=_gen(22))
    z2 = torch.randn(3, 3, 4, 4, generator=_gen(23))
    assert torch.equal(slerp(z1, z2, 0.0), z1)
    assert torch.equal(slerp(z1, z2, 1.0), z2)


def test_slerp_orthogonal_equal_norm():
    g = _gen(24)
    a = torch.randn(2, 48, generator=g, dtype=torch.float64)
    b = torch.randn(2, 48, generator=g, dtype=torch.float64)
    b = b - (a * b).sum(1, keepdim=True) / (a * a).sum(1, keepdim=True) * a  # Gram–Schmidt
    b = b * (a.norm(dim=1, keepdim=True) / b.norm(dim=1, keepdim=True))
    z1, z2 = a.reshape(2, 3, 4, 4), b.reshape(2, 3, 4, 4)
    for alpha in (0.1, 0.25, 0.5, 0.9):
        s = slerp(z1, z2, alpha)
        torch.testing.assert_close(s.flatten(1).norm(dim=1), a.norm(dim=1), rtol=1e-12, atol=0)
        # θ = π/2: weights cos(απ/2), sin(απ/2).
        want = math.cos(alpha * math.pi / 2) * z1 + math.sin(alpha * math.pi / 2) * z2
        torch.testing.assert_close(s, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(slerp(z1, z2, 0.5), (z1 + z2) / math.sqrt(2), rtol=1e-12, atol=1e-12)


def test_slerp_hand_value_and_parallel_fallback():
    z1 = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    z2 = torch.tensor([[math.cos(math.pi / 3), math.sin(math.pi / 3)]], dtype=torch.float64)
    mid = slerp(z1, z2, 0.5)
    torch.testing.assert_close(mid, torch.tensor([[math.cos(math.pi / 6), 0.5]], dtype=torch.float64))
    # Parallel inputs (θ = 0): the formula degenerates and slerp falls back to lerp.
    p = slerp(z1, 3 * z1, 0.25)
    torch.testing.assert_close(p, torch.tensor([[1.5, 0.0]], dtype=torch.float64))
    with pytest.raises(ValueError, match="same shape"):
        slerp(z1, torch.zeros(1, 3), 0.5)


def test_interpolate_shape_and_endpoints_one_step():
    shape = (2, 3, 4, 4)
    f = _gaussian_f(shape[1:])
    z1 = torch.randn(shape, generator=_gen(25), dtype=torch.float64)
    z2 = torch.randn(shape, generator=_gen(26), dtype=torch.float64)
    out = interpolate(f, z1, z2, [0.0, 0.3, 0.7, 1.0], [80.0])
    assert out.shape == (4,) + shape
    torch.testing.assert_close(out[0], f(80.0 * z1, 80.0), rtol=0, atol=0)
    torch.testing.assert_close(out[-1], f(80.0 * z2, 80.0), rtol=0, atol=0)
    torch.testing.assert_close(out[1], f(80.0 * slerp(z1, z2, 0.3), 80.0), rtol=1e-14, atol=0)


def test_interpolate_endpoints_multistep_with_seed():
    shape = (2, 3, 4, 4)
    f = _gaussian_f(shape[1:])
    z1 = torch.randn(shape, generator=_gen(27), dtype=torch.float64)
    z2 = torch.randn(shape, generator=_gen(28), dtype=torch.float64)
    a = interpolate(f, z1, z2, [0.0], SIGMAS, generator=_gen(29))
    b = interpolate(f, z1, z2, [1.0], SIGMAS, generator=_gen(29))
    assert a.shape == (1,) + shape
    assert torch.equal(a[0], multistep_sample(f, z1, SIGMAS, generator=_gen(29)))
    assert torch.equal(b[0], multistep_sample(f, z2, SIGMAS, generator=_gen(29)))
    assert not torch.allclose(a[0], b[0])


def test_interpolate_errors():
    z = torch.zeros(1, 3, 4, 4)
    f = _gaussian_f((3, 4, 4))
    for bad in ([-0.1], [0.5, 1.5], [float("nan")]):
        with pytest.raises(ValueError, match="alphas"):
            interpolate(f, z, z, bad, [80.0])
    with pytest.raises(ValueError, match="alphas"):
        interpolate(f, z, z, [], [80.0])


def test_interpolation_replays_the_same_renoising_for_every_alpha():
    y = _images(30, (2, 3, 4, 4))
    f = _gaussian_f(y.shape[1:])
    z1 = torch.randn(y.shape, generator=_gen(31), dtype=torch.float64)
    z2 = torch.randn(y.shape, generator=_gen(32), dtype=torch.float64)
    path = interpolate(f, z1, z2, [0.0, 0.5, 0.5, 1.0], SIGMAS, generator=_gen(33))
    torch.testing.assert_close(path[1], path[2])  # same α → same sample
    alone = interpolate(f, z1, z2, [0.5], SIGMAS, generator=_gen(33))
    torch.testing.assert_close(path[1], alone[0])


def test_editing_takes_randn_like_draw_for_draw():
    f = _gaussian_f((3, 8, 8))
    y = _images(30)
    mask = (torch.rand(1, 1, 8, 8, generator=_gen(31)) > 0.5).double()
    gen = _gen(32)
    calls = []

    def like(x):
        calls.append(tuple(x.shape))
        return torch.randn(x.shape, generator=gen).to(x)

    a = inpaint(f, y, mask, SIGMAS, randn_like=like)  # z, then one ε per step after the first
    assert torch.equal(a, inpaint(f, y, mask, SIGMAS, generator=_gen(32)))
    assert calls == [tuple(y.shape)] * len(SIGMAS)
    with pytest.raises(ValueError, match="not both"):
        colorize(f, y, SIGMAS, generator=_gen(1), randn_like=like)


def test_interpolate_replays_the_first_paths_noise():
    f = _gaussian_f((3, 4, 4))
    shape = (2, 3, 4, 4)
    z1 = torch.randn(shape, generator=_gen(33), dtype=torch.float64)
    z2 = torch.randn(shape, generator=_gen(34), dtype=torch.float64)
    gen = _gen(35)
    out = interpolate(f, z1, z2, [0.0, 0.5, 1.0], SIGMAS, generator=gen)
    # α = 1 re-noises with the ε α = 0 drew; the generator moved on by one path's draws only.
    assert torch.equal(out[2], multistep_sample(f, z2, SIGMAS, generator=_gen(35)))
    after = _gen(35)
    multistep_sample(f, z2, SIGMAS, generator=after)
    assert torch.equal(gen.get_state(), after.get_state())
    calls = []

    def like(x):
        calls.append(1)
        return torch.randn(x.shape, generator=_gen(36 + len(calls))).to(x)

    again = interpolate(f, z1, z2, [0.0, 0.5, 1.0], SIGMAS, randn_like=like)
    assert len(calls) == len(SIGMAS) - 1  # drawn once, replayed for α = 0.5 and 1
    assert again.shape == out.shape

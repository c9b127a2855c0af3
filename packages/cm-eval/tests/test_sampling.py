"""Deterministic per-seed sampling: batch size, ranks and resumption do not change the images."""

import numpy as np
import pytest
import torch
from cm_core import SAMPLERS, bcm_mixture_sample, edm_sampling_sigmas, multistep_sample, solve
from cm_eval import PerImageNoise, generate, load_image_folder, load_png, load_stats, parse_seeds, sample_batch
from cm_eval._testing import GaussianImages, spawn_generate, stats_features

SHAPE = (1, 8, 8)
SIGMAS = [80.0, 1.2, 0.3]


@pytest.fixture(scope="module")
def f():
    return GaussianImages(SHAPE)


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def test_parse_seeds():
    assert parse_seeds("0-3,7,10-11") == [0, 1, 2, 3, 7, 10, 11]
    assert parse_seeds(3) == [0, 1, 2] and parse_seeds([5, 2]) == [5, 2]
    for bad in ("3-1", "a", "1,1"):
        with pytest.raises(ValueError):
            parse_seeds(bad)


def test_image_i_is_cm_core_multistep_with_generator_seed_i(f):
    x, _ = sample_batch(f, [4, 9], SHAPE, SIGMAS)
    for row, seed in zip(x, [4, 9]):
        g = torch.Generator().manual_seed(seed)
        z = torch.randn((1, *SHAPE), generator=g)  # z first, then the re-noising ε, from one generator
        ref = multistep_sample(f, z, SIGMAS, generator=g)
        torch.testing.assert_close(row[None], ref, rtol=0, atol=0)
    # BCM mixture (ancestral chain + one zigzag round) likewise.
    x, _ = sample_batch(f, [3], SHAPE, [80.0, 3.0, 0.002], sampler="bcm-mixture", zigzag=[(0.12, 0.4)])
    g = torch.Generator().manual_seed(3)
    z = torch.randn((1, *SHAPE), generator=g)
    torch.testing.assert_close(x, bcm_mixture_sample(f, z, [80.0, 3.0, 0.002], [(0.12, 0.4)], generator=g))


def test_registry_samplers_draw_from_each_images_generator(f):
    # cm_core's samplers with randn_like = the per-image noise: image i alone with generator seed i.
    def alone(seed, run):
        g = torch.Generator().manual_seed(seed)
        return run(torch.randn((1, *SHAPE), generator=g), g)

    x, _ = sample_batch(f, [3, 5], SHAPE, [80.0, 0.002], sampler="bcm-zigzag")  # BCM's (0.1, 1.2) round
    for row, seed in zip(x, [3, 5]):
        ref = alone(seed, lambda z, g: bcm_mixture_sample(f, z, [80.0, 0.002], [(0.1, 1.2)], generator=g))
        assert torch.equal(row[None], ref)
    x, _ = sample_batch(f, [4], SHAPE, [80.0, 0.8], sampler=SAMPLERS["multistep"], renoise="ect")
    assert torch.equal(x, alone(4, lambda z, g: multistep_sample(f, z, [80.0, 0.8], generator=g, renoise="ect")))
    # A diffusion denoiser with EDM's Heun sampler; the same with a callable in the new convention.
    ts = edm_sampling_sigmas(4).tolist()
    x, _ = sample_batch(f.denoise, [6, 7], SHAPE, ts, sampler="heun")
    z = PerImageNoise([6, 7]).randn(SHAPE)
    assert torch.equal(x, solve(f.denoise, 80.0 * z, ts))
    mine = lambda d, z, sigmas, *, randn_like, **cond: solve(d, sigmas[0] * z, sigmas, **cond)
    assert torch.equal(sample_batch(f.denoise, [6, 7], SHAPE, ts, sampler=mine)[0], x)


def test_deprecated_bcm_name_and_noise_callables_still_work(f):
    chain = [80.0, 3.0, 0.002]
    with pytest.warns(DeprecationWarning, match='"bcm" is deprecated'):
        old, _ = sample_batch(f, [3], SHAPE, chain, sampler="bcm")  # no zigzag: the ancestral chain
    assert torch.equal(old, sample_batch(f, [3], SHAPE, chain, sampler="bcm-ancestral")[0])
    with pytest.warns(DeprecationWarning):
        old, _ = sample_batch(f, [3], SHAPE, chain, sampler="bcm", zigzag=[(0.12, 0.4)])
    assert torch.equal(old, sample_batch(f, [3], SHAPE, chain, sampler="bcm-mixture")[0])

    def legacy(f, z, sigmas, noise, **cond):  # cm-eval 0.2: ε = noise.like(x)
        return multistep_sample(f, z, sigmas, randn_like=noise.like, **cond)

    with pytest.warns(DeprecationWarning, match="randn_like"):
        old, _ = sample_batch(f, [1, 2], SHAPE, SIGMAS, sampler=legacy)
    assert torch.equal(old, sample_batch(f, [1, 2], SHAPE, SIGMAS)[0])


def test_batch_size_does_not_change_images_and_resume_skips(f, tmp_path):
    kw = dict(seeds="0-9", shape=SHAPE, sigmas=SIGMAS)
    generate(f, tmp_path / "b1", batch_size=1, **kw)
    generate(f, tmp_path / "b4", batch_size=4, **kw)
    one, four = _files(tmp_path / "b1"), _files(tmp_path / "b4")
    assert len(one) == 10 and one == four
    assert len(set(one.values())) == 10  # different seeds, different images
    (tmp_path / "b4" / "000003.png").unlink()
    (tmp_path / "b4" / "000007.png").unlink()
    stats = generate(f, tmp_path / "b4", batch_size=3, **kw)
    assert stats["written"] == 2 and stats["skipped"] == 8
    assert _files(tmp_path / "b4") == one
    assert not list((tmp_path / "b4").glob(".*"))  # no temp files left behind


def test_npz_output_matches_pngs_and_carries_labels(f, tmp_path):
    kw = dict(seeds="0-9", shape=SHAPE, sigmas=SIGMAS, num_classes=10)
    generate(f, tmp_path / "png", batch_size=4, **kw)
    generate(f, tmp_path / "s.npz", batch_size=3, **kw)
    with np.load(tmp_path / "s.npz") as z:
        imgs, labels, seeds = z["arr_0"], z["arr_1"], z["seeds"]
    assert imgs.dtype == np.uint8 and imgs.shape == (10, 8, 8, 1)
    assert seeds.tolist() == list(range(10)) and labels.min() >= 0 and labels.max() < 10
    for i in range(10):
        np.testing.assert_array_equal(load_png(tmp_path / "png" / f"{i:06d}.png"), imgs[i])
    np.testing.assert_array_equal(load_image_folder(tmp_path / "png"), imgs)  # PNG folder -> NHWC for FID
    assert not (tmp_path / "s.npz.parts").exists()
    assert generate(f, tmp_path / "s.npz", batch_size=3, **kw)["written"] == 0


@pytest.mark.distributed
def test_one_and_two_gloo_ranks_give_byte_identical_images(f, tmp_path):
    kw = dict(seeds="0-10", shape=SHAPE, sigmas=SIGMAS)
    generate(f, tmp_path / "r1", batch_size=2, **kw)
    generate(f, tmp_path / "r1.npz", batch_size=2, **kw)
    spawn_generate(
        2,
        [dict(out=str(tmp_path / "r2"), batch_size=3, **kw), dict(out=str(tmp_path / "r2.npz"), batch_size=4, **kw)],
        stats_out=tmp_path / "stats.npz",
    )
    assert _files(tmp_path / "r1") == _files(tmp_path / "r2") and len(_files(tmp_path / "r2")) == 11
    assert (tmp_path / "r1.npz").read_bytes() == (tmp_path / "r2.npz").read_bytes()
    # FeatureStats.all_reduce over the 2 ranks equals one-shot statistics of all rows.
    merged, x = load_stats(tmp_path / "stats.npz"), stats_features()
    np.testing.assert_allclose(merged["mu"], x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(merged["sigma"], np.cov(x, rowvar=False), rtol=1e-10)

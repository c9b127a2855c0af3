"""Streaming statistics, the Fréchet distance and statistics files."""

import numpy as np
import pytest
import scipy.linalg
import torch
from cm_eval import (
    FeatureStats,
    frechet_distance,
    frechet_distance_from_features,
    load_reference_batch,
    load_stats,
    save_reference_batch,
    save_stats,
)


def _features(n, d, seed, offset=0.0, rank=None):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((d, rank or d)) / np.sqrt(d)
    return offset + rng.standard_normal((n, rank or d)) @ a.T + rng.standard_normal(d)


def _fd_nuclear(x1, x2):
    """Independent reference from the features themselves: with centred X_i, Σ_i = X_iᵀX_i/(n_i−1),
    tr((Σ1Σ2)^½) = ‖X1 X2ᵀ‖_* / √((n1−1)(n2−1)) (the nonzero eigenvalues of Σ1Σ2 are the squared
    singular values of X1X2ᵀ/…), exact even when the covariances are singular."""
    c1, c2 = x1 - x1.mean(0), x2 - x2.mean(0)
    n1, n2 = len(x1), len(x2)
    nuc = np.linalg.svd(c1 @ c2.T, compute_uv=False).sum() / np.sqrt((n1 - 1) * (n2 - 1))
    diff = x1.mean(0) - x2.mean(0)
    return diff @ diff + (c1**2).sum() / (n1 - 1) + (c2**2).sum() / (n2 - 1) - 2 * nuc


@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_streaming_statistics_equal_one_shot(offset):
    x = _features(1000, 12, 0, offset)
    s = FeatureStats()
    rng = np.random.default_rng(1)
    cuts = np.sort(rng.choice(np.arange(1, 1000), 9, replace=False))
    for chunk in np.split(x, cuts):
        s.update(torch.from_numpy(chunk).float() if offset == 0 else chunk)  # tensors and arrays
    ref = x.astype(np.float32).astype(np.float64) if offset == 0 else x
    np.testing.assert_allclose(s.mean(), ref.mean(0), rtol=1e-12, atol=1e-12 * (1 + offset))
    np.testing.assert_allclose(s.cov(), np.cov(ref, rowvar=False), rtol=1e-9, atol=1e-10)
    assert s.n == 1000


def test_merge_equals_single_pass_and_checks_dimension():
    x = _features(300, 5, 2)
    a, b = FeatureStats().update(x[:100]), FeatureStats().update(x[100:])
    whole = FeatureStats().update(x)
    a.merge(b)
    np.testing.assert_allclose(a.cov(), whole.cov(), rtol=1e-12)
    with pytest.raises(ValueError, match="dimension"):
        a.update(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="at least 2"):
        FeatureStats().update(np.zeros((1, 4))).cov()


def test_frechet_distance_closed_form_diagonal_gaussians():
    rng = np.random.default_rng(3)
    mu1, mu2 = rng.standard_normal(20), rng.standard_normal(20)
    v1, v2 = rng.uniform(0.01, 4, 20), rng.uniform(0.01, 4, 20)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-10)
    # Commuting, non-diagonal: rotate both by the same orthogonal matrix; FD is rotation invariant.
    q, _ = np.linalg.qr(rng.standard_normal((20, 20)))
    fd_rot = frechet_distance(q @ mu1, q @ np.diag(v1) @ q.T, q @ mu2, q @ np.diag(v2) @ q.T)
    assert fd_rot == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu1, np.diag(v1), mu1, np.diag(v1)) == pytest.approx(0.0, abs=1e-10)


def test_frechet_distance_matches_independent_references_full_rank():
    x1, x2 = _features(400, 16, 4), _features(500, 16, 5, offset=0.3)
    s1, s2 = FeatureStats().update(x1), FeatureStats().update(x2)
    fd = frechet_distance(s1.mean(), s1.cov(), s2.mean(), s2.cov())
    assert fd == pytest.approx(_fd_nuclear(x1, x2), rel=1e-9)
    # Eigenvalues of the non-symmetric product Σ1Σ2 (real, non-negative in exact arithmetic).
    lam = np.linalg.eigvals(s1.cov() @ s2.cov())
    d = s1.mean() - s2.mean()
    ref = d @ d + np.trace(s1.cov()) + np.trace(s2.cov()) - 2 * np.sqrt(lam.real.clip(0)).sum()
    assert fd == pytest.approx(ref, rel=1e-8)
    # pytorch-fid's scipy.linalg.sqrtm recipe agrees on well-conditioned input.
    assert frechet_distance(s1.mean(), s1.cov(), s2.mean(), s2.cov(), method="sqrtm") == pytest.approx(fd, rel=1e-7)
    assert frechet_distance_from_features(x1, x2) == pytest.approx(fd, rel=1e-12)


@pytest.mark.parametrize("rank", [3, 30])
def test_frechet_distance_near_singular_covariances(rank):
    # 64-d features of rank 3 (singular covariances), or fewer samples than dimensions (n = 40 < 64).
    n = 40 if rank == 30 else 300
    x1, x2 = _features(n, 64, 6, rank=rank), _features(n, 64, 7, rank=rank)
    x2 = x2 + 1e-7 * np.random.default_rng(8).standard_normal(x2.shape)  # ill-conditioned, not exactly singular
    s1, s2 = FeatureStats().update(x1), FeatureStats().update(x2)
    assert np.linalg.cond(s2.cov()) > 1e10
    fd = frechet_distance(s1.mean(), s1.cov(), s2.mean(), s2.cov())
    ref = _fd_nuclear(x1, x2)
    assert np.isfinite(fd) and fd >= 0
    assert fd == pytest.approx(ref, rel=1e-7, abs=1e-9)


def test_sqrtm_is_scipy_on_psd():
    # Our eigen-based PSD square root, checked through the trace it feeds, against scipy's sqrtm.
    rng = np.random.default_rng(9)
    a = rng.standard_normal((10, 10))
    sigma = a @ a.T
    fd = frechet_distance(np.zeros(10), sigma, np.zeros(10), np.eye(10))
    ref = np.trace(sigma) + 10 - 2 * np.trace(scipy.linalg.sqrtm(sigma)).real
    assert fd == pytest.approx(ref, rel=1e-10)


def test_frechet_distance_rejects_mismatched_or_bad_input():
    with pytest.raises(ValueError, match="same feature extractor"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.array([np.nan, 0.0]), np.eye(2), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="method"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2), method="svd")


def test_stats_files_roundtrip_and_foreign_formats(tmp_path):
    x = _features(200, 6, 10)
    s = FeatureStats().update(x)
    path = s.save(tmp_path / "mine.npz")
    loaded = load_stats(path)
    np.testing.assert_array_equal(loaded["mu"], s.mean())
    np.testing.assert_array_equal(loaded["sigma"], s.cov())
    # An EDM fid-refs / pytorch-fid file as those tools write it: np.savez(f, mu=..., sigma=...).
    np.savez(tmp_path / "edm.npz", mu=np.ones(6, np.float32), sigma=np.eye(6, dtype=np.float32))
    edm = load_stats(tmp_path / "edm.npz")
    assert edm["mu"].dtype == np.float64 and frechet_distance(edm["mu"], edm["sigma"], np.ones(6), np.eye(6)) == 0
    # An ADM reference batch: images as arr_0 plus mu/sigma (and spatial stats).
    imgs = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "adm.npz", arr_0=imgs, mu=np.zeros(6), sigma=np.eye(6), mu_s=np.zeros(2), sigma_s=np.eye(2))
    assert load_stats(tmp_path / "adm.npz")["sigma"].shape == (6, 6)
    np.testing.assert_array_equal(load_reference_batch(tmp_path / "adm.npz"), imgs)
    save_reference_batch(tmp_path / "ref.npz", imgs)
    with np.load(tmp_path / "ref.npz") as f:
        assert f.files == ["arr_0"] and f["arr_0"].dtype == np.uint8
    with pytest.raises(ValueError, match="arr_0"):
        load_stats(tmp_path / "ref.npz")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_stats(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match="arr_0"):
        load_reference_batch(path)
    with pytest.raises(ValueError, match="uint8"):
        save_reference_batch(tmp_path / "bad.npz", imgs.astype(np.float32))
    save_stats(tmp_path / "direct.npz", s.mean(), s.cov())
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp files


def test_fewer_samples_than_dimensions_warn():
    """FD from fewer samples than feature dimensions is biased upward (a rank-deficient covariance)."""
    import warnings

    from cm_eval import FeatureStats, SmallSampleWarning

    rng = np.random.default_rng(0)
    few = FeatureStats(16).update(rng.standard_normal((10, 16)))
    with pytest.warns(SmallSampleWarning, match=r"10 samples of 16-d features has rank <= 9 < 16.*at least 17"):
        few.cov()
    enough = FeatureStats(16).update(rng.standard_normal((40, 16)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enough.cov()

"""Noise-level samplers (timesteps.py) against closed forms and numpy Monte Carlo estimates."""

import math

import numpy as np
import pytest
import torch
from cm_core import karras_sigmas, lognormal_index_probs, lognormal_indices, lognormal_sigmas, uniform_indices

P_MEAN, P_STD = -1.1, 2.0


def _erf_probs(sigmas, p_mean, p_std):
    """The discretized lognormal written out with math.erf (one value at a time)."""
    cdf = [0.5 * (1 + math.erf((math.log(s) - p_mean) / (math.sqrt(2) * p_std))) for s in sigmas]
    mass = np.diff(np.array(cdf))
    return mass / mass.sum()


@pytest.mark.parametrize("n", [11, 21, 81, 1281])
def test_lognormal_index_probs_is_a_distribution(n):
    sigmas = karras_sigmas(n)
    p = lognormal_index_probs(sigmas)
    assert p.dtype == torch.float64
    assert p.shape == (n - 1,)
    assert bool((p >= 0).all())
    assert p.sum().item() == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(p.numpy(), _erf_probs(sigmas.tolist(), P_MEAN, P_STD), rtol=1e-9, atol=1e-15)


def test_lognormal_index_probs_matches_monte_carlo():
    sigmas = karras_sigmas(21).numpy()
    p = lognormal_index_probs(torch.from_numpy(sigmas)).numpy()
    rng = np.random.default_rng(1234)
    log_sigma = rng.normal(P_MEAN, P_STD, size=2_000_000)
    counts, _ = np.histogram(log_sigma, bins=np.log(sigmas))
    n_in = counts.sum()  # only the mass inside [σ_min, σ_max] counts (the probabilities are renormalized)
    freq = counts / n_in
    se = np.sqrt(p * (1 - p) / n_in)
    assert np.all(np.abs(freq - p) <= 5 * se + 1e-12), np.max(np.abs(freq - p) / se)
    # And the estimate is precise enough to be discriminating: +1.1 instead of −1.1 (KIN's README typo)
    # would be many standard errors away.
    p_wrong = lognormal_index_probs(torch.from_numpy(sigmas), p_mean=1.1).numpy()
    assert np.max(np.abs(freq - p_wrong) / se) > 50


def test_lognormal_index_probs_other_parameters():
    sigmas = karras_sigmas(41, 0.01, 10.0, 5.0)
    p = lognormal_index_probs(sigmas, p_mean=0.3, p_std=0.5)
    np.testing.assert_allclose(p.numpy(), _erf_probs(sigmas.tolist(), 0.3, 0.5), rtol=1e-9, atol=1e-15)
    # A narrow distribution centred at ln σ = 0.3 puts its mode in the interval holding e^0.3.
    i_mode = int(p.argmax())
    assert sigmas[i_mode] <= math.exp(0.3) * 1.5 and sigmas[i_mode + 1] >= math.exp(0.3) / 1.5


def test_lognormal_index_probs_errors():
    with pytest.raises(ValueError, match="p_std"):
        lognormal_index_probs(karras_sigmas(5), p_std=0.0)
    with pytest.raises(ValueError, match="sigmas"):
        lognormal_index_probs(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="sigmas"):
        lognormal_index_probs(torch.tensor([1.0, 0.5, 2.0]))
    with pytest.raises(ValueError, match="sigmas"):
        lognormal_index_probs(torch.tensor([0.0, 0.5, 2.0]))
    with pytest.raises(ValueError, match="sigmas"):
        lognormal_index_probs(torch.ones(2, 3))


def test_lognormal_indices_frequencies_match_probs():
    sigmas = karras_sigmas(41)
    p = lognormal_index_probs(sigmas).numpy()
    n = 400_000
    g = torch.Generator().manual_seed(7)
    idx = lognormal_indices(sigmas, n, generator=g)
    assert idx.dtype == torch.int64
    assert idx.shape == (n,)
    assert int(idx.min()) >= 0 and int(idx.max()) <= 39
    freq = np.bincount(idx.numpy(), minlength=40) / n
    se = np.sqrt(p * (1 - p) / n)
    assert np.all(np.abs(freq - p) <= 5 * se + 1e-12), np.max(np.abs(freq - p) / (se + 1e-300))
    # Pearson chi-square over the bins with enough mass (39 dof at most: mean 39, sd ≈ 8.8).
    big = p * n >= 5
    chi2 = np.sum((freq[big] * n - p[big] * n) ** 2 / (p[big] * n))
    assert chi2 < big.sum() + 6 * math.sqrt(2 * big.sum())
    # Uniform indices would fail the same check (the test can tell the distributions apart).
    uniform = np.full(40, 1 / 40)
    assert np.max(np.abs(uniform - p) / se) > 50


def test_lognormal_indices_reproducible_with_generator():
    sigmas = karras_sigmas(81)
    a = lognormal_indices(sigmas, 1000, generator=torch.Generator().manual_seed(3))
    b = lognormal_indices(sigmas, 1000, generator=torch.Generator().manual_seed(3))
    c = lognormal_indices(sigmas, 1000, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_lognormal_indices_errors():
    with pytest.raises(ValueError, match="batch"):
        lognormal_indices(karras_sigmas(11), 0)


@pytest.mark.parametrize("n", [2, 3, 11, 150])
def test_uniform_indices_range(n):
    g = torch.Generator().manual_seed(n)
    idx = uniform_indices(n, 20_000, generator=g)
    assert idx.shape == (20_000,)
    assert int(idx.min()) == 0
    assert int(idx.max()) == n - 2
    counts = np.bincount(idx.numpy(), minlength=n - 1)
    assert counts.shape == (n - 1,)
    expected = 20_000 / (n - 1)
    assert np.all(np.abs(counts - expected) <= 5 * math.sqrt(expected) + 1)


def test_uniform_indices_reproducible_and_errors():
    a = uniform_indices(40, 64, generator=torch.Generator().manual_seed(0))
    b = uniform_indices(40, 64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="num_scales"):
        uniform_indices(1, 4)
    with pytest.raises(ValueError, match="batch"):
        uniform_indices(10, 0)


@pytest.mark.parametrize("p_mean, p_std", [(-1.1, 2.0), (-1.2, 1.2), (0.5, 0.3)])
def test_lognormal_sigmas_moments(p_mean, p_std):
    n = 200_000
    s = lognormal_sigmas(n, p_mean, p_std, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    assert s.dtype == torch.float64
    assert s.shape == (n,)
    assert bool((s > 0).all())
    log = s.log().numpy()
    assert abs(log.mean() - p_mean) < 5 * p_std / math.sqrt(n)
    # sd of the sample std ≈ p_std/√(2n).
    assert abs(log.std() - p_std) < 5 * p_std / math.sqrt(2 * n)


def test_lognormal_sigmas_defaults_and_reproducibility():
    a = lognormal_sigmas(1000, generator=torch.Generator().manual_seed(5))
    b = lognormal_sigmas(1000, generator=torch.Generator().manual_seed(5))
    assert a.dtype == torch.float32
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="p_std"):
        lognormal_sigmas(10, 0.0, -1.0)
    with pytest.raises(ValueError, match="batch"):
        lognormal_sigmas(0)

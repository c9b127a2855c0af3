"""Inversion MSE (BCM) and ODE solving error (Direct CM) against cm_core's exact Gaussian oracle.

The two-component mixture's PF-ODE map is integrated adaptively (slow in Python), so it is used
once per metric; the other checks use a single Gaussian, whose flow is closed-form.
"""

import numpy as np
import pytest
import torch
from cm_core import GaussianMixture, karras_sigmas
from cm_eval import inversion_error, load_png, ode_solving_error, psnr, teacher_solutions
from cm_eval._testing import GaussianImages

TEACHER_SIGMAS = karras_sigmas(120).flip(0).tolist()


@pytest.fixture(scope="module")
def mixture():
    means = torch.tensor([[-0.6, 0.2, 0.5, -0.3], [0.5, -0.4, -0.2, 0.6]], dtype=torch.float64)
    return GaussianMixture(means, [0.3, 0.4], [0.4, 0.6], tol=1e-8)


@pytest.fixture(scope="module")
def gauss():
    return GaussianMixture(torch.tensor([[0.4, -0.3, 0.1, 0.7]], dtype=torch.float64), [0.3])


def _as_images(g):
    """The exact BCM function f(x, σ, σ_end) of a distribution on R^4, for 'images' [B, 1, 2, 2]."""
    f = g.as_bidirectional_function()
    return lambda x, sigma, sigma_end=None, **cond: f(x.reshape(len(x), -1), sigma, sigma_end).reshape(x.shape)


def test_inversion_is_exact_for_the_exact_mixture_bidirectional_function(mixture, tmp_path):
    x = mixture.sample(4, generator=torch.Generator().manual_seed(0)).reshape(4, 1, 2, 2)
    # Without the σ_0 noise, jumping up from σ_min to 80 and back down is the identity.
    r = inversion_error(
        _as_images(mixture),
        x,
        invert_sigmas=(0.002, 80.0),
        reconstruct_sigmas=(80.0, 0.002),
        add_noise=False,
        side_by_side=tmp_path / "pairs.png",
    )
    assert r["mse"] < 1e-12 and r["psnr"] > 120 and r["nfe"] == 2
    grid = load_png(tmp_path / "pairs.png")
    assert grid.shape == (2 * 3 + 1, 4 * 3 + 1, 1)  # 2 rows (originals, reconstructions) of 4, 1 px gaps


def test_inversion_recipe_with_noise_is_small_positive_and_batch_independent(tmp_path):
    f = GaussianImages((1, 4, 4))
    x = f(torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(1)) * 80.0, 80.0)  # data samples
    r1 = inversion_error(f, x, batch_size=1)  # BCM's recipe: +0.07·ε, 0.07 → 15 → 80, 80 → 0.002
    r8 = inversion_error(f, x, batch_size=8)
    assert r1["nfe"] == 3 and r1["mse_per_image"] == pytest.approx(r8["mse_per_image"], rel=1e-6)
    # The σ_0 = 0.07 noise survives the round trip, slightly contracted: just under 0.07² per pixel.
    assert 0.5 * 0.07**2 < r1["mse"] < 0.07**2
    wrong = lambda x, s, s_end=0.002, **c: f(x, s, s_end) + (0.3 if s_end < s else 0.0)
    assert inversion_error(wrong, x, add_noise=False, invert_sigmas=(0.002, 80.0))["mse"] == pytest.approx(0.09)
    with pytest.raises(ValueError, match="one seed per image"):
        inversion_error(f, x, seeds=[0])


def test_psnr():
    assert psnr(4.0) == 0.0 and psnr(0.04) == pytest.approx(20.0) and psnr(0.0) == float("inf")


def test_ode_solving_error_is_zero_for_the_exact_mixture_consistency_function(mixture):
    r = ode_solving_error(
        mixture.as_consistency_function(),
        mixture.as_denoiser(),
        seeds=range(8),
        shape=(4,),
        teacher_sigmas=TEACHER_SIGMAS,
        dtype=torch.float64,
    )
    assert r["mse"] < 1e-6, r["mse"]  # Heun with 119 steps against the exact flow


def test_ode_solving_error_positive_for_a_perturbed_student_and_teacher_cached(gauss, tmp_path):
    exact = gauss.as_consistency_function()
    kw = dict(
        seeds=range(16), shape=(4,), teacher_sigmas=TEACHER_SIGMAS, cache=tmp_path / "teacher.npz", dtype=torch.float64
    )
    assert ode_solving_error(exact, gauss.as_denoiser(), **kw)["mse"] < 1e-6
    perturbed = lambda x, sigma, **c: exact(x, sigma) + 0.05
    r_bad = ode_solving_error(perturbed, gauss.as_denoiser(), **kw)
    assert r_bad["mse"] == pytest.approx(0.05**2, rel=0.01) and r_bad["teacher_nfe"] == 238

    def boom(*a, **k):
        raise AssertionError("the teacher should come from the cache")

    # The teacher ran once: its endpoints are cached and reused (this denoiser is never called).
    cached = teacher_solutions(
        boom,
        seeds=range(16),
        shape=(4,),
        teacher_sigmas=TEACHER_SIGMAS,
        cache=tmp_path / "teacher.npz",
        dtype=torch.float64,
    )
    assert cached.shape == (16, 4)
    with pytest.raises(ValueError, match="different seeds"):
        teacher_solutions(
            boom, seeds=range(8), shape=(4,), teacher_sigmas=TEACHER_SIGMAS, cache=tmp_path / "teacher.npz"
        )
    # A metric on both sample sets (here the distance of the sample mean to the data mean).
    mean = gauss.means[0]
    r = ode_solving_error(exact, gauss.as_denoiser(), metric=lambda x: (x.double().mean(0) - mean).norm().item(), **kw)
    assert r["metric_student"] == pytest.approx(r["metric_teacher"], abs=1e-4) and np.isfinite(r["l2"])
    # A 2-step student re-noises with fresh ε: no longer on the teacher's ODE path.
    assert ode_solving_error(exact, gauss.as_denoiser(), student_sigmas=(80.0, 0.5), **kw)["mse"] > 1e-3

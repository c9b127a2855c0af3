"""The Gaussian-mixture oracle against independent computations (autograd, closed forms, MC)."""

import math

import pytest
import torch
from cm_core import GaussianMixture


def mixture(**kw):
    return GaussianMixture([[-1.0, 0.0], [1.0, 0.5], [0.0, -1.0]], [0.1, 0.2, 0.15], [0.5, 0.3, 0.2], **kw)


def test_score_is_the_gradient_of_log_prob():
    g = mixture()
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64).requires_grad_()
    for sigma in (0.0, 0.05, 0.7, 12.0):
        (grad,) = torch.autograd.grad(g.log_prob(x, sigma).sum(), x)
        torch.testing.assert_close(g.score(x.detach(), sigma), grad, rtol=1e-10, atol=1e-10)


def test_log_prob_integrates_to_one():
    g = GaussianMixture([[-1.0], [2.0]], [0.3, 0.6], [0.4, 0.6])
    grid = torch.linspace(-40, 40, 400_001, dtype=torch.float64)[:, None]
    for sigma in (0.0, 0.5, 3.0):
        mass = torch.trapezoid(g.log_prob(grid, sigma).exp(), grid[:, 0])
        assert abs(mass.item() - 1) < 1e-8


def test_denoiser_is_tweedie():
    # Tweedie: E[x0 | x] = x + σ²∇log p_σ(x), an independent route through autograd.
    g = mixture()
    x = 2 * torch.randn(32, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for sigma in (0.01, 0.4, 5.0):
        xr = x.clone().requires_grad_()
        (grad,) = torch.autograd.grad(g.log_prob(xr, sigma).sum(), xr)
        torch.testing.assert_close(g.denoise(x, sigma), x + sigma**2 * grad, rtol=1e-10, atol=1e-10)


def test_denoiser_matches_monte_carlo_posterior_mean():
    g = GaussianMixture([[-1.0], [1.0]], [0.3, 0.3])
    gen = torch.Generator().manual_seed(3)
    x0 = g.sample(400_000, gen)
    sigma = 0.5
    xs = x0 + sigma * torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    # Bin x_σ near a point and average x0 there.
    for point in (-0.8, 0.1, 0.9):
        sel = (xs[:, 0] - point).abs() < 0.01
        mc = x0[sel].mean().item()
        se = x0[sel].std().item() / math.sqrt(sel.sum().item())
        exact = g.denoise(torch.tensor([[point]], dtype=torch.float64), sigma).item()
        assert abs(mc - exact) < 5 * se + 0.01, (point, mc, exact)


def test_single_gaussian_flow_closed_form_against_numeric_integration():
    # Two identical components force the adaptive integrator on a case with a closed form.
    closed = GaussianMixture([[0.3, -0.2]], 0.4)
    numeric = GaussianMixture([[0.3, -0.2], [0.3, -0.2]], [0.4, 0.4])
    x = closed.sample_marginal(256, 80.0, torch.Generator().manual_seed(4))
    a = closed.flow(x, 80.0, 0.002)
    b = numeric.flow(x, 80.0, 0.002)
    assert (a - b).abs().max() < 1e-7
    m = torch.tensor([0.3, -0.2], dtype=torch.float64)
    ratio = math.sqrt((0.16 + 0.002**2) / (0.16 + 80.0**2))
    torch.testing.assert_close(a, m + ratio * (x - m), rtol=0, atol=1e-12)


def test_flow_solves_the_pf_ode():
    # d/dσ flow(x, σ0, σ) must equal the velocity (x_σ − D(x_σ, σ))/σ: central difference check.
    g = mixture()
    x = g.sample_marginal(16, 2.0, torch.Generator().manual_seed(5))
    sigma, h = 1.0, 1e-4
    up = g.flow(x, 2.0, sigma + h, tol=1e-12)
    down = g.flow(x, 2.0, sigma - h, tol=1e-12)
    mid = g.flow(x, 2.0, sigma, tol=1e-12)
    torch.testing.assert_close((up - down) / (2 * h), g.velocity(mid, sigma), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g.velocity(mid, sigma), (mid - g.denoise(mid, sigma)) / sigma)


def test_flow_pushes_the_marginal_forward():
    g = mixture()
    gen = torch.Generator().manual_seed(6)
    x = g.sample_marginal(6000, 3.0, gen)
    y = g.flow(x, 3.0, 0.3)
    mean, cov = g.marginal_moments(0.3)
    se = (cov.diagonal() / len(y)).sqrt()
    assert ((y.mean(0) - mean).abs() < 5 * se).all()
    torch.testing.assert_close(torch.cov(y.T), cov, rtol=0.08, atol=0.02)


def test_consistency_and_its_inverse_round_trip():
    g = mixture()
    x0 = g.sample_marginal(200, 0.002, torch.Generator().manual_seed(7))
    z = g.inverse_consistency(x0, 80.0)
    back = g.consistency(z, 80.0)
    assert (back - x0).abs().max() < 1e-5


def test_sample_moments_and_labels():
    g = mixture()
    x, labels = g.sample(20_000, torch.Generator().manual_seed(8), return_labels=True)
    freq = torch.bincount(labels, minlength=3).double() / len(labels)
    assert (freq - g.weights).abs().max() < 5 * math.sqrt(0.25 / len(labels))
    mean, cov = g.marginal_moments()
    torch.testing.assert_close(x.mean(0), mean, rtol=0, atol=0.03)
    torch.testing.assert_close(torch.cov(x.T), cov, rtol=0.05, atol=0.02)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(means=[[0.0, 0.0]], stds=[-1.0]), "stds"),
        (dict(means=[[0.0, 0.0]], stds=[0.1, 0.2]), "stds"),
        (dict(means=[[0.0, 0.0], [1.0, 1.0]], stds=0.1, weights=[1.0]), "weights"),
        (dict(means=[[0.0, 0.0], [1.0, 1.0]], stds=0.1, weights=[-1.0, 2.0]), "weights"),
        (dict(means=torch.zeros(0, 2), stds=0.1), "means"),
    ],
)
def test_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GaussianMixture(**kwargs)


def test_bad_calls():
    g = mixture()
    with pytest.raises(ValueError, match="x must have shape"):
        g.denoise(torch.zeros(4, 3), 1.0)
    with pytest.raises(ValueError, match="sigma"):
        g.denoise(torch.zeros(4, 2), -1.0)
    with pytest.raises(ValueError, match="sigma"):
        g.denoise(torch.zeros(4, 2), torch.ones(3))
    with pytest.raises(ValueError, match="σ > 0"):
        g.flow(torch.zeros(4, 2), 1.0, 0.0)

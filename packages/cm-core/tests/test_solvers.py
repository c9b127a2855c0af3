"""PF-ODE solvers on the exact mixture ODE: convergence orders and agreement with the flow."""

import math

import numpy as np
import pytest
import torch
from cm_core import GaussianMixture, edm_sampling_sigmas, euler_step, heun_step, karras_sigmas, solve


def mixture():
    return GaussianMixture([[-1.0, 0.0], [1.0, 0.5], [0.0, -1.0]], [0.3, 0.4, 0.35], [0.5, 0.3, 0.2], tol=1e-12)


def _errors(method, counts):
    g = mixture()
    x = g.sample_marginal(64, 10.0, torch.Generator().manual_seed(0))
    exact = g.flow(x, 10.0, 0.5)
    errs = []
    for n in counts:
        sigmas = torch.exp(torch.linspace(math.log(10.0), math.log(0.5), n + 1, dtype=torch.float64))
        y = solve(g.as_denoiser(), x, sigmas, method=method)
        errs.append((y - exact).abs().max().item())
    return np.array(errs)


@pytest.mark.parametrize("method, order", [("euler", 1), ("heun", 2)])
def test_convergence_order(method, order):
    counts = np.array([16, 32, 64, 128])
    errs = _errors(method, counts)
    slope = -np.polyfit(np.log(counts), np.log(errs), 1)[0]
    assert abs(slope - order) < 0.25, (errs, slope)
    assert (np.diff(errs) < 0).all()


def test_heun_reaches_the_flow_with_many_steps():
    g = mixture()
    x = g.sample_marginal(32, 80.0, torch.Generator().manual_seed(1))
    y = solve(g.as_denoiser(), x, karras_sigmas(400, 0.002, 80.0).flip(0))
    assert (y - g.flow(x, 80.0, 0.002)).abs().max() < 1e-3


def test_ascending_solve_inverts():
    g = mixture()
    x = g.sample_marginal(32, 0.5, torch.Generator().manual_seed(2))
    sig = torch.exp(torch.linspace(math.log(0.5), math.log(5.0), 257, dtype=torch.float64))
    up = solve(g.as_denoiser(), x, sig)
    assert (up - g.flow(x, 0.5, 5.0)).abs().max() < 1e-3


def test_heun_step_ending_at_zero_is_euler():
    g = mixture()
    x = g.sample_marginal(8, 0.1, torch.Generator().manual_seed(3))
    d = g.as_denoiser()
    torch.testing.assert_close(heun_step(d, x, 0.1, 0.0), euler_step(d, x, 0.1, 0.0))
    torch.testing.assert_close(euler_step(d, x, 0.1, 0.0), g.denoise(x, 0.1))


def test_per_sample_times_match_scalar_calls():
    g = mixture()
    x = g.sample_marginal(6, 2.0, torch.Generator().manual_seed(4))
    t_cur = torch.tensor([2.0, 1.5, 1.0, 0.7, 0.5, 3.0], dtype=torch.float64)
    t_next = torch.tensor([1.0, 0.0, 0.9, 0.2, 0.4, 2.0], dtype=torch.float64)
    batched = heun_step(g.as_denoiser(), x, t_cur, t_next)
    for i in range(6):
        one = heun_step(g.as_denoiser(), x[i : i + 1], t_cur[i].item(), t_next[i].item())
        torch.testing.assert_close(batched[i : i + 1], one)


def test_edm_sampler_with_churn_is_reproducible_and_reaches_the_data():
    g = mixture()
    z = torch.randn(3000, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    sigmas = edm_sampling_sigmas(64)
    a = solve(g.as_denoiser(), 80 * z, sigmas, s_churn=5, generator=torch.Generator().manual_seed(6))
    b = solve(g.as_denoiser(), 80 * z, sigmas, s_churn=5, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    mean, cov = g.marginal_moments()
    torch.testing.assert_close(a.mean(0), mean, rtol=0, atol=0.06)
    torch.testing.assert_close(torch.cov(a.T), cov, rtol=0.1, atol=0.05)


def test_bad_inputs():
    g = mixture()
    d, x = g.as_denoiser(), torch.zeros(4, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="method"):
        solve(d, x, [1.0, 0.5], method="rk9")
    with pytest.raises(ValueError, match="monotone"):
        solve(d, x, [1.0, 0.5, 0.7])
    with pytest.raises(ValueError, match="at least 2"):
        solve(d, x, [1.0])
    with pytest.raises(ValueError, match="s_churn"):
        solve(d, x, [0.5, 1.0], s_churn=1.0)
    with pytest.raises(ValueError, match="t_cur"):
        euler_step(d, x, 0.0, 0.5)
    with pytest.raises(ValueError, match="sigmas"):
        solve(d, x, [1.0, -0.5])


def test_churn_noise_from_randn_like_equals_the_generator():
    g = GaussianMixture([[0.0, 0.0]], 0.5)
    z = torch.randn(5, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    sigmas = edm_sampling_sigmas(6).tolist()
    gen = torch.Generator().manual_seed(6)
    a = solve(
        g.as_denoiser(), 80 * z, sigmas, s_churn=5, randn_like=lambda x: torch.randn(x.shape, generator=gen).to(x)
    )
    b = solve(g.as_denoiser(), 80 * z, sigmas, s_churn=5, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="not both"):
        solve(g.as_denoiser(), 80 * z, sigmas, s_churn=5, generator=gen, randn_like=torch.randn_like)

"""Samplers driven by the exact consistency function of a Gaussian mixture."""

import math

import pytest
import torch
from cm_core import (
    GaussianMixture,
    bcm_ancestral_sample,
    bcm_invert,
    bcm_mixture_sample,
    bcm_reconstruct,
    bcm_zigzag_sample,
    multistep_sample,
    onestep_sample,
)

N = 4000


@pytest.fixture(scope="module")
def g():
    return GaussianMixture([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.0]], [0.2, 0.3, 0.25], [0.5, 0.3, 0.2], tol=1e-8)


def _assert_matches_mixture(g, x):
    """Mean, covariance and component weights within Monte Carlo error of the mixture at σ_min."""
    mean, cov = g.marginal_moments(0.002)
    se = (cov.diagonal() / len(x)).sqrt()
    assert ((x.mean(0) - mean).abs() < 5 * se).all(), (x.mean(0), mean)
    # Covariance entries: SE of a sample covariance ≈ sqrt((σ_ii σ_jj + σ_ij²)/n).
    se_cov = ((cov.diagonal()[:, None] * cov.diagonal()[None] + cov**2) / len(x)).sqrt()
    assert ((torch.cov(x.T) - cov).abs() < 6 * se_cov).all(), (torch.cov(x.T), cov)
    # Components are well separated: assign each sample to its nearest mean.
    labels = torch.cdist(x, g.means).argmin(1)
    freq = torch.bincount(labels, minlength=3).double() / len(x)
    assert ((freq - g.weights).abs() < 5 * (g.weights * (1 - g.weights) / len(x)).sqrt()).all(), freq


def _z(seed, n=N):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_onestep_samples_follow_the_mixture(g):
    _assert_matches_mixture(g, onestep_sample(g.as_consistency_function(), _z(0)))


def test_multistep_samples_keep_the_mixture(g):
    x = multistep_sample(
        g.as_consistency_function(), _z(1), [80.0, 1.5, 0.3], generator=torch.Generator().manual_seed(2)
    )
    _assert_matches_mixture(g, x)


def test_multistep_follows_the_documented_recursion():
    calls = []

    def f(x, sigma, **cond):
        calls.append((x.clone(), sigma, cond))
        return 0.5 * x + sigma

    z = torch.randn(3, 4, generator=torch.Generator().manual_seed(3))
    out = multistep_sample(f, z, [80.0, 2.0, 0.5], generator=torch.Generator().manual_seed(4), class_labels=7)
    gen = torch.Generator().manual_seed(4)
    x = 0.5 * (80.0 * z) + 80.0
    for sigma in (2.0, 0.5):
        x = x + math.sqrt(sigma**2 - 0.002**2) * torch.randn(x.shape, generator=gen)
        x = 0.5 * x + sigma
    torch.testing.assert_close(out, x)
    assert [c[1] for c in calls] == [80.0, 2.0, 0.5] and calls[0][2] == {"class_labels": 7}


def test_ect_renoise_adds_sigma_times_noise():
    f = lambda x, sigma: x * 0
    z = torch.zeros(2, 3)
    out = multistep_sample(f, z, [80.0, 0.8], generator=torch.Generator().manual_seed(5), renoise="ect")
    torch.testing.assert_close(out, torch.zeros(2, 3))  # f zeroes everything: the rule only scales noise
    seen = []
    multistep_sample(
        lambda x, s: seen.append(x) or x * 0, z, [80.0, 0.8], generator=torch.Generator().manual_seed(5), renoise="ect"
    )
    expect = 0.8 * torch.randn(2, 3, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(seen[1], expect)


def test_seeded_sampling_is_reproducible(g):
    f = g.as_consistency_function()
    a = multistep_sample(f, _z(6, 64), [80.0, 0.5], generator=torch.Generator().manual_seed(7))
    b = multistep_sample(f, _z(6, 64), [80.0, 0.5], generator=torch.Generator().manual_seed(7))
    c = multistep_sample(f, _z(6, 64), [80.0, 0.5], generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bcm_ancestral_with_exact_jumps_follows_the_mixture(g):
    f = g.as_bidirectional_function()
    _assert_matches_mixture(g, bcm_ancestral_sample(f, _z(9), (80.0, 2.4, 0.002)))


def test_bcm_zigzag_and_mixture_with_exact_jumps(g):
    f = g.as_bidirectional_function()
    x = bcm_zigzag_sample(f, _z(10), ((0.1, 1.2),), generator=torch.Generator().manual_seed(11))
    _assert_matches_mixture(g, x)
    x = bcm_mixture_sample(f, _z(12), (80.0, 3.0, 0.002), ((0.12, 0.4),), generator=torch.Generator().manual_seed(13))
    _assert_matches_mixture(g, x)


def test_bcm_inversion_then_generation_returns_the_input(g):
    f = g.as_bidirectional_function()
    x0 = g.sample_marginal(300, 0.002, torch.Generator().manual_seed(14))
    latent = bcm_invert(f, x0, (0.002, 15.0, 80.0), add_noise=False)
    # The latent is Gaussian noise at σ = 80: unit variance after dividing by 80.
    assert abs((latent / 80).std().item() - 1) < 0.1
    recon = bcm_reconstruct(f, latent, (80.0, 0.002))
    assert (recon - x0).abs().max() < 1e-4


def test_bcm_inversion_with_noise_stays_close(g):
    f = g.as_bidirectional_function()
    x0 = g.sample(500, torch.Generator().manual_seed(15))
    latent = bcm_invert(f, x0, generator=torch.Generator().manual_seed(16))
    recon = bcm_reconstruct(f, latent)
    mse = (recon - x0).square().mean().item()
    # Adding σ = 0.07 noise and denoising it exactly leaves an error of at most the noise power.
    assert 0 < mse < 0.07**2


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda f, z: multistep_sample(f, z, [0.5, 80.0]), "decreasing"),
        (lambda f, z: multistep_sample(f, z, []), "at least one"),
        (lambda f, z: multistep_sample(f, z, [80.0, -1.0]), "sigmas"),
        (lambda f, z: multistep_sample(f, z, [80.0, 0.0]), "sigma_min"),
        (lambda f, z: multistep_sample(f, z, [80.0, 0.001]), "sigma_min"),
        (lambda f, z: multistep_sample(f, z, [80.0], renoise="ddim"), "renoise"),
        (lambda f, z: multistep_sample(f, torch.zeros(0, 2), [80.0]), "z must"),
        (lambda f, z: onestep_sample(f, z, sigma_max=0.0), "sigma_max"),
        (lambda f, z: bcm_ancestral_sample(f, z, [80.0]), "at least"),
        (lambda f, z: bcm_zigzag_sample(f, z, ((1.5, 1.0),)), "sigma_noise < sigma_up"),
        (lambda f, z: bcm_mixture_sample(f, z, (80.0, 0.002), ((0.1,),)), "pair"),
        (lambda f, z: bcm_invert(f, z, (80.0, 0.07)), "increasing"),
    ],
)
def test_bad_inputs(call, match):
    f = lambda x, sigma, sigma_end=None: x
    with pytest.raises(ValueError, match=match):
        call(f, torch.zeros(2, 2))


def test_diffusers_style_scheduler_equals_multistep_sample():
    from cm_core import ConsistencyFunction, ConsistencyScheduler

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 12), torch.nn.Unflatten(1, (3, 2, 2)))
    raw = lambda x, c_noise, **cond: net(x) * torch.tanh(c_noise / 100).reshape(-1, 1, 1, 1)
    f = ConsistencyFunction(raw, c_noise="openai")
    z = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(1))
    sched = ConsistencyScheduler(num_train_timesteps=40)
    sched.set_timesteps(timesteps=[0, 22, 39])
    gen = torch.Generator().manual_seed(2)
    x = z * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            out = raw(sched.scale_model_input(x, t), t.expand(len(x)).float())
            x = sched.step(out, t, x, generator=gen).prev_sample
        expect = multistep_sample(f, z, sched.sigmas, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(x, expect, rtol=1e-5, atol=1e-5)
    assert abs(sched.sigmas[0].item() - 80.0) < 1e-9 and len(sched.timesteps) == 3
    with pytest.raises(ValueError, match="exactly one"):
        sched.set_timesteps(2, sigmas=[80.0, 1.0])
    with pytest.raises(ValueError, match="strictly increasing"):
        sched.set_timesteps(timesteps=[0, 50])


def test_scheduler_spacing_and_float32_timesteps():
    from cm_core import ConsistencyScheduler, karras_sigmas

    sched = ConsistencyScheduler(num_train_timesteps=40)
    sched.set_timesteps(40)
    grid = karras_sigmas(40).flip(0)
    torch.testing.assert_close(sched.sigmas, grid)  # every grid point, σ_max first
    sched.set_timesteps(2)
    torch.testing.assert_close(sched.sigmas, grid[[0, 20]])  # diffusers: i·(N // n)
    x = torch.zeros(1, 3)
    t32 = sched.timesteps[1].float()  # a pipeline hands the timestep back in float32
    out = sched.step(torch.zeros(1, 3), t32, x).prev_sample
    assert out.shape == x.shape
    with pytest.raises(ValueError, match="not one of"):
        sched.step(torch.zeros(1, 3), 123.0, x)
    with pytest.raises(ValueError, match="sigma_min"):
        sched.set_timesteps(sigmas=[80.0, 0.0])


def test_half_precision_inputs_keep_python_sigmas_exact():
    from cm_core import ConsistencyFunction

    seen = []

    def net(x_in, c_noise, **cond):
        seen.append(c_noise)
        return torch.zeros_like(x_in)

    f = ConsistencyFunction(net)
    x = torch.ones(2, 3, dtype=torch.bfloat16)
    f(x, 2.4)
    # ln(2.4)/4 from the exact 2.4, not from bf16's 2.40625.
    assert abs(seen[0][0].item() - math.log(2.4) / 4) < 1e-6
    assert torch.equal(f(x, 0.002), x)


# ---- an injected noise source (randn_like=, as EDM's sampler takes) -----------------------------


def _like(seed):
    """randn_like drawing what generator=Generator().manual_seed(seed) would, one call per ε."""
    gen = torch.Generator().manual_seed(seed)
    calls = []

    def like(x):
        calls.append(tuple(x.shape))
        return torch.randn(x.shape, generator=gen).to(x)

    return like, calls


def test_randn_like_replaces_the_generator_draw_for_draw():
    f = lambda x, sigma, sigma_end=None, **cond: 0.9 * x + 0.01 * (sigma_end or sigma)
    z = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(1))
    runs = [
        (lambda **kw: multistep_sample(f, z, [80.0, 2.0, 0.5], **kw), 2),
        (lambda **kw: multistep_sample(f, z, [80.0, 0.8], renoise="ect", **kw), 1),
        (lambda **kw: bcm_mixture_sample(f, z, (80.0, 3.0, 0.002), ((0.12, 0.4), (0.1, 1.2)), **kw), 2),
        (lambda **kw: bcm_zigzag_sample(f, z, **kw), 1),
        (lambda **kw: bcm_invert(f, z, **kw), 1),
    ]
    for run, draws in runs:
        like, calls = _like(7)
        assert torch.equal(run(randn_like=like), run(generator=torch.Generator().manual_seed(7)))
        assert calls == [(3, 2, 4)] * draws
        with pytest.raises(ValueError, match="generator= or randn_like=, not both"):
            run(randn_like=like, generator=torch.Generator())
    with pytest.raises(ValueError, match="x's shape"):
        multistep_sample(f, z, [80.0, 1.0], randn_like=lambda x: torch.zeros(1, 2, 4))
    with pytest.raises(TypeError, match="callable"):
        multistep_sample(f, z, [80.0, 1.0], randn_like=torch.zeros(3, 2, 4))
    like, calls = _like(7)
    bcm_invert(f, z, add_noise=False, randn_like=like)
    assert calls == []


def test_scheduler_step_takes_randn_like():
    from cm_core import ConsistencyScheduler

    sched = ConsistencyScheduler()
    sched.set_timesteps(sigmas=[80.0, 2.0])
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0)) * 80
    out = torch.randn(2, 3, generator=torch.Generator().manual_seed(1))
    t = sched.timesteps[0]
    a = sched.step(out, t, x, generator=torch.Generator().manual_seed(2)).prev_sample
    like, calls = _like(2)
    b = sched.step(out, t, x, randn_like=like).prev_sample
    assert torch.equal(a, b) and calls == [(2, 3)]

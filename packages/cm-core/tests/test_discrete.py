"""cm_core.discrete against diffusers' schedulers (their own code) and the exact Gaussian-mixture
PF-ODE (float64): the DDIM step, prediction types, LCM's grids and scalings, Euler = DDIM, Heun's
order, and LCM multistep sampling."""

import math

import pytest
import torch

import cm_core
from cm_core import discrete as D

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (pip install 'cm-nets[diffusers]')")


def _ddim(prediction_type="epsilon", set_alpha_to_one=False, spacing="trailing"):
    return diffusers.DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=set_alpha_to_one, prediction_type=prediction_type, timestep_spacing=spacing,
    )  # fmt: skip


def _vp(s):
    return D.DiscreteVP(s.alphas_cumprod, s.config.prediction_type, float(s.final_alpha_cumprod))


@pytest.mark.parametrize("prediction_type", D.PREDICTION_TYPES)
@pytest.mark.parametrize("set_alpha_to_one", [False, True])
def test_ddim_step_equals_diffusers_scheduler_step(prediction_type, set_alpha_to_one):
    sched = _ddim(prediction_type, set_alpha_to_one)
    sched.set_timesteps(10)
    vp = _vp(sched)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=g)
    out = torch.randn(3, 4, 8, 8, generator=g)
    for t in sched.timesteps.tolist():
        ref = sched.step(out, t, x, eta=0.0).prev_sample
        prev = t - sched.config.num_train_timesteps // 10  # the step the scheduler takes (negative past the end)
        ours = D.solver_step(vp, lambda xx, tt: vp.x0_eps(out, xx, tt), x, torch.full((3,), t), torch.full((3,), prev))
        torch.testing.assert_close(ours, ref, rtol=2e-6, atol=2e-5)


@pytest.mark.parametrize("prediction_type", D.PREDICTION_TYPES)
def test_prediction_types_invert_each_other_float64(prediction_type):
    vp = D.DiscreteVP(_ddim().alphas_cumprod, prediction_type)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, 6, dtype=torch.float64, generator=g)
    eps = torch.randn(4, 6, dtype=torch.float64, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    x_t = vp.add_noise(x0, eps, t)
    a = vp.alpha(t)[:, None]
    # the network's output for this (x0, ε), written from the definitions
    target = {"epsilon": eps, "sample": x0, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0}[prediction_type]
    got_x0, got_eps = vp.x0_eps(target, x_t, t)
    torch.testing.assert_close(got_x0, x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got_eps, eps, rtol=1e-9, atol=1e-9)


def test_sigma_and_denoiser_are_edm_on_the_discrete_levels():
    vp = D.DiscreteVP(_ddim().alphas_cumprod)
    t = torch.tensor([3, 400, 999])
    a = vp.alphas_cumprod[t]
    torch.testing.assert_close(vp.sigma(t), ((1 - a) / a).sqrt())
    gm = cm_core.GaussianMixture(torch.tensor([[0.5, -1.0]]), 0.7)
    x = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def x0_fn(x_t, tt):  # the exact posterior mean, as a VP model would predict it
        return gm.denoise(x_t / vp.alpha(tt).sqrt()[:, None], vp.sigma(tt))

    d = vp.denoiser(x0_fn)
    torch.testing.assert_close(d(x, vp.sigma(t)), gm.denoise(x, vp.sigma(t)))
    with pytest.raises(ValueError, match="discrete noise levels"):
        d(x, torch.tensor([0.5, 0.5, 0.5], dtype=torch.float64))


def test_lcm_grid_timesteps_and_scalings_match_lcm_scheduler():
    assert D.lcm_grid(1000, 50).tolist() == list(range(19, 1000, 20))
    lcm = diffusers.LCMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    for n in (1, 2, 4, 8, 50):
        lcm.set_timesteps(n, original_inference_steps=50)
        assert D.lcm_inference_timesteps(n).tolist() == lcm.timesteps.tolist()
    lcm.set_timesteps(3, original_inference_steps=25)
    assert D.lcm_inference_timesteps(3, 1000, 25).tolist() == lcm.timesteps.tolist()
    for t in (0, 1, 19, 499, 999):
        c_skip, c_out = D.lcm_scalings(t)
        ref_skip, ref_out = lcm.get_scalings_for_boundary_condition_discrete(t)
        assert math.isclose(float(c_skip), ref_skip, rel_tol=1e-12) and math.isclose(float(c_out), ref_out, rel_tol=1e-12)
    c_skip, c_out = D.lcm_scalings(0)
    assert float(c_skip) == 1.0 and float(c_out) == 0.0  # f(x, 0) = x exactly


def _exact_vp_model(vp, gm):
    def x0_eps(x_t, t):
        s = vp.alpha(t).sqrt()[:, None].to(x_t.dtype)
        x0 = gm.denoise(x_t / s, vp.sigma(t)).to(x_t.dtype)
        return x0, (x_t - s * x0) / (1 - s**2).sqrt()

    return x0_eps


def test_euler_equals_ddim_and_heun_converges_to_the_exact_ode_map():
    vp = D.DiscreteVP(_ddim().alphas_cumprod)
    gm = cm_core.GaussianMixture(torch.tensor([[1.0, -0.5, 0.25]]), 0.6)  # one Gaussian: the flow is closed form
    model = _exact_vp_model(vp, gm)
    x_T = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    t_start = torch.full((5,), 999)

    def solve(solver, n):
        grid = D.lcm_grid(1000, n).flip(0).tolist() + [0]
        x = x_T
        for t, tp in zip(grid, grid[1:]):
            x = D.solver_step(vp, model, x, torch.full((5,), t), torch.full((5,), tp), solver)
        return x

    # the exact map in σ-space: x̃ = x/√ᾱ follows the PF-ODE from σ_999 to σ_0
    exact = gm.flow(x_T / vp.alpha(t_start).sqrt()[:, None], vp.sigma(t_start), vp.sigma(torch.zeros(5, dtype=torch.long)))
    exact = exact * vp.alpha(0).sqrt()
    torch.testing.assert_close(solve("euler", 10), solve("ddim", 10), rtol=1e-12, atol=1e-12)
    err = {(s, n): (solve(s, n) - exact).abs().max().item() for s in ("ddim", "heun") for n in (10, 20)}
    assert err[("heun", 20)] < err[("ddim", 20)] / 10  # second order beats first order by far
    assert err[("heun", 10)] / err[("heun", 20)] > 3  # ~4× per halving: second order
    assert 1.5 < err[("ddim", 10)] / err[("ddim", 20)] < 2.6  # ~2×: first order


def test_lcm_sample_equals_lcm_scheduler_loop():
    sched = diffusers.LCMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    vp = D.DiscreteVP(sched.alphas_cumprod, "epsilon")
    w = torch.randn(4, 4, generator=torch.Generator().manual_seed(4)) * 0.1

    class Net(torch.nn.Module):  # a fixed nonlinear "UNet" with the interface LatentConsistencyFunction calls
        schedule = vp

        def forward(self, x, t, **kw):
            return torch.tanh(x @ w) * (1 + t.float()[:, None] / 1000)

    f = D.LatentConsistencyFunction(Net())
    z = torch.randn(3, 4, generator=torch.Generator().manual_seed(5))
    for n in (1, 2, 4):
        sched.set_timesteps(n, original_inference_steps=50)
        g = torch.Generator().manual_seed(6)
        x = z.clone()
        for t in sched.timesteps:
            x = sched.step(Net()(x, torch.full((3,), int(t))), t, x, generator=g).prev_sample
        ours = D.lcm_sample(f, vp, z.clone(), D.lcm_inference_timesteps(n), generator=torch.Generator().manual_seed(6))
        torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)


def test_guidance_is_diffusers_scale():
    c, u = torch.tensor([2.0]), torch.tensor([1.0])
    assert D.guided(c, u, 1.0).item() == 2.0  # w = 1: the conditional prediction
    assert D.guided(c, u, 7.5).item() == 1.0 + 7.5  # u + w(c − u)
    torch.testing.assert_close(D.guided(c.expand(2, 1), u.expand(2, 1), torch.tensor([1.0, 3.0])), torch.tensor([[2.0], [4.0]]))


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="prediction_type"):
        D.DiscreteVP(_ddim().alphas_cumprod, "x0")
    with pytest.raises(ValueError, match="decreasing"):
        D.DiscreteVP(torch.tensor([0.5, 0.9]))
    with pytest.raises(ValueError, match="solver"):
        D.solver_step(D.DiscreteVP(_ddim().alphas_cumprod), None, torch.zeros(1, 2), 5, 3, "rk4")
    with pytest.raises(ValueError, match="descending"):
        D.lcm_sample(lambda x, t: x, D.DiscreteVP(_ddim().alphas_cumprod), torch.zeros(1, 2), [10, 20])
    with pytest.raises(ValueError, match="num_original_inference_steps"):
        D.lcm_grid(1000, 0)

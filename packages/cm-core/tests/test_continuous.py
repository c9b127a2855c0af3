"""TrigFlow / flow matching (cm_core.continuous), the oracle's exact continuous-time functions, and
the sCT / sCD / MeanFlow objectives: against float64 finite differences, closed forms and the exact
Gaussian-mixture flow."""

import math

import pytest
import torch
from cm_core import EDMDenoiser, GaussianMixture, get_objective, get_sampler
from cm_core import continuous as C
from cm_core.objectives.meanflow import MeanFlow
from cm_core.objectives.scm import SCD, SCT
from torch import nn

MIX = GaussianMixture([[-1.0, 0.0], [1.0, 0.5]], [0.3, 0.3], tol=1e-11)
GAUSS = GaussianMixture([[0.5, -0.3]], 0.4)
SD = 0.5


class Net(nn.Module):
    """(x_in, c_noise, c_noise_end=None) → [B, 2], smooth (tanh), float64-capable."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.inp, self.end, self.out = nn.Linear(3, 32), nn.Linear(1, 32, bias=False), nn.Linear(32, 2)
        self.bcm = True

    def forward(self, x, c_noise, c_noise_end=None, **cond):
        h = self.inp(torch.cat([x, c_noise[:, None].to(x)], 1))
        if c_noise_end is not None:
            h = h + self.end(c_noise_end[:, None].to(x))
        return self.out(torch.tanh(h))


def _x(n=6, seed=0):
    return torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def test_time_conversions_round_trip_and_bad_times_are_named():
    t = torch.tensor([0.0, 0.3, 1.1, 1.5], dtype=torch.float64)
    torch.testing.assert_close(C.trigflow_time(C.trigflow_sigma(t, 0.7), 0.7), t)
    s = torch.tensor([0.0, 0.1, 2.0, 80.0], dtype=torch.float64)
    torch.testing.assert_close(C.flow_sigma(C.flow_time(s)), s)
    with pytest.raises(ValueError, match="t must lie in \\[0, π/2\\]"):
        C.check_trigflow_time(torch.tensor([0.5, 1.7]))
    with pytest.raises(ValueError, match="r must be <= t"):
        C.check_flow_times(torch.tensor([0.5]), torch.tensor([0.4]))
    with pytest.raises(ValueError, match="t must lie in"):
        C.check_flow_times(torch.tensor([0.1]), torch.tensor([1.2]))
    with pytest.raises(ValueError, match="t_from must lie in"):
        MIX.trigflow_flow(_x(2), torch.tensor([2.0, 0.1]), 0.0)
    with pytest.raises(ValueError, match="r must be <= t"):
        MIX.average_velocity(_x(2), torch.tensor([0.6, 0.1]), torch.tensor([0.5, 0.5]))
    f = C.TrigFlowFunction(Net().double(), SD)
    with pytest.raises(ValueError, match="t must lie in \\[0, π/2\\]"):
        f(_x(2), torch.tensor([0.5, 2.0], dtype=torch.float64))
    u = C.AverageVelocityFunction(Net().double())
    with pytest.raises(ValueError, match="r must be <= t"):
        u(_x(2), torch.tensor([0.9, 0.1], dtype=torch.float64), torch.tensor([0.5, 0.5], dtype=torch.float64))
    with pytest.raises(ValueError, match="t must lie in \\[0, 1\\]"):
        u(_x(2), torch.tensor([0.1, 0.1], dtype=torch.float64), torch.tensor([0.5, 1.5], dtype=torch.float64))


def test_velocities_are_the_derivatives_of_the_exact_flows():
    x = _x()
    t = torch.full((6,), 0.7, dtype=torch.float64)
    h = 1e-5
    fd = (MIX.trigflow_flow(x, t, t + h, SD) - MIX.trigflow_flow(x, t, t - h, SD)) / (2 * h)
    torch.testing.assert_close(MIX.trigflow_velocity(x, t, SD), fd, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(C.TrigFlowVelocity(MIX.denoise, SD)(x, t), MIX.trigflow_velocity(x, t, SD))
    s = torch.full((6,), 0.4, dtype=torch.float64)
    fd = (MIX.flow_matching_flow(x, s, s + h) - MIX.flow_matching_flow(x, s, s - h)) / (2 * h)
    torch.testing.assert_close(MIX.flow_matching_velocity(x, s), fd, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(C.FlowVelocity(MIX.denoise)(x, s), MIX.flow_matching_velocity(x, s))
    # the average velocity: the mean of v along the path, and v itself where r = t
    r = torch.full((6,), 0.1, dtype=torch.float64)
    z_r = MIX.flow_matching_flow(x, s, r)
    torch.testing.assert_close(MIX.average_velocity(x, r, s), (x - z_r) / 0.3)
    torch.testing.assert_close(MIX.average_velocity(x, s, s), MIX.flow_matching_velocity(x, s))
    # one Gaussian: the TrigFlow consistency map in closed form
    g = GAUSS
    m, s2 = g.means[0], 0.16
    tt = torch.full((6,), 1.2, dtype=torch.float64)
    sig = SD * math.tan(1.2)
    closed = m + math.sqrt(s2 / (s2 + sig**2)) * (x / math.cos(1.2) - m)
    torch.testing.assert_close(g.trigflow_consistency(x, tt, SD), closed)


@pytest.mark.parametrize("c_noise", ["trig", "edm"])
def test_trigflow_function_boundary_and_jvp_against_finite_differences(c_noise):
    f = C.TrigFlowFunction(Net().double(), SD, c_noise)
    x = _x()
    torch.testing.assert_close(f(x, torch.zeros(6, dtype=torch.float64)), x)  # f(x, 0) = x exactly
    t = torch.linspace(0.2, 1.4, 6, dtype=torch.float64)
    dx, dt = _x(seed=1), torch.full((6,), 0.7, dtype=torch.float64)
    _, tangent = torch.func.jvp(lambda a, b: f(a, b), (x, t), (dx, dt))
    h = 1e-6
    fd = (f(x + h * dx, t + h * dt) - f(x - h * dx, t - h * dt)) / (2 * h)
    torch.testing.assert_close(tangent, fd, rtol=1e-6, atol=1e-7)


def test_trigflow_edm_mode_starts_at_the_teachers_denoiser():
    net = Net().double()
    f = C.TrigFlowFunction(net, SD, "edm")
    x, t = _x(), torch.linspace(0.1, 1.5, 6, dtype=torch.float64)
    D = EDMDenoiser(net, SD, "edm")
    torch.testing.assert_close(f(x, t), D(x / torch.cos(t)[:, None], SD * torch.tan(t)), rtol=1e-12, atol=1e-12)


def test_average_velocity_jvp_against_finite_differences_and_needs_a_second_time_input():
    u = C.AverageVelocityFunction(Net().double())
    z, r, t = _x(), torch.full((6,), 0.2, dtype=torch.float64), torch.full((6,), 0.8, dtype=torch.float64)
    v = _x(seed=2)
    _, tangent = torch.func.jvp(lambda a, b, c: u(a, b, c), (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t)))
    h = 1e-6
    fd = (u(z + h * v, r, t + h) - u(z - h * v, r, t - h)) / (2 * h)
    torch.testing.assert_close(tangent, fd, rtol=1e-6, atol=1e-7)
    plain = Net()
    plain.bcm = False
    with pytest.raises(ValueError, match="second time input"):
        C.AverageVelocityFunction(plain)


class _Oracle(nn.Module):
    """sCM's F of the exact consistency function: F* = (cos t·x_t − f*(x_t, t))/(sin t·σ_d)."""

    def __init__(self, mix, perturb=0.0):
        super().__init__()
        self.mix, self.perturb, self.sigma_data = mix, perturb, SD

    def F(self, x_t, t, **cond):
        c, s = torch.cos(t)[:, None], torch.sin(t)[:, None]
        return (c * x_t - self.mix.trigflow_consistency(x_t, t, SD)) / (s * SD) + self.perturb * x_t


def test_scd_tangent_vanishes_for_the_exact_functions_and_not_for_perturbed_ones():
    x_t, t = _x(8) * 0.8, torch.linspace(0.2, 1.3, 8, dtype=torch.float64)
    obj = SCD(MIX.denoise, sigma_data=SD, jvp="fd", fd_eps=1e-5, adaptive_weighting=False)
    dxdt = obj.velocity(x_t, t, None, None)
    torch.testing.assert_close(dxdt, MIX.trigflow_velocity(x_t, t, SD))
    _, g = obj.tangent(_Oracle(MIX), x_t, t, dxdt, r=1.0)
    _, g_bad = obj.tangent(_Oracle(MIX, perturb=0.2), x_t, t, dxdt, r=1.0)
    scale = dxdt.abs().max()
    assert g.abs().max() < 1e-5 * scale, g.abs().max()
    assert g_bad.abs().max() > 1e-2 * scale


def test_sct_tangent_averages_to_the_scd_tangent():
    """g is linear in dx_t/dt: sCT's conditional tangents, averaged over the posterior of (x0, z)
    given x_t, give the exact velocity's (which vanishes for f*). One Gaussian: exact posterior."""
    mean, var = GAUSS.means[0], 0.16
    t0 = 0.9
    sig = SD * math.tan(t0)
    x_t = torch.tensor([[0.7, -0.2]], dtype=torch.float64)
    n = 200_000
    x_sigma = x_t / math.cos(t0)
    post_mean = mean + var / (var + sig**2) * (x_sigma - mean)
    post_std = math.sqrt(var * sig**2 / (var + sig**2))
    x0 = post_mean + post_std * torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    z = (x_t - math.cos(t0) * x0) / math.sin(t0)
    t = torch.full((n,), t0, dtype=torch.float64)
    sct = SCT(sigma_data=SD, jvp="fd", fd_eps=1e-5, adaptive_weighting=False)
    dxdt = sct.velocity(x_t.expand(n, 2), t, x0, z)
    torch.testing.assert_close(dxdt.mean(0, keepdim=True), GAUSS.trigflow_velocity(x_t, t[:1], SD), rtol=0, atol=5e-3)


def test_meanflow_residual_vanishes_for_the_exact_average_velocity():
    x0 = MIX.sample(64, torch.Generator().manual_seed(5))
    e = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    obj = MeanFlow(jvp="fd", fd_eps=1e-5)
    r, t = obj.draw_times(64, x0, torch.Generator().manual_seed(7))
    t = t.clamp(0.05, 0.9)
    r = torch.minimum(r, t - 0.01).clamp(min=0.0)  # finite differences step t by ±h: keep r below it

    # the exact u is a function of (z_t, r, t) only; MeanFlow's target uses the conditional velocity
    # v = e − x0, whose posterior mean is the exact velocity: so compare the identity with exact v
    def u_exact(z, rr, tt, **c):
        return MIX.average_velocity(z, rr, tt)

    col = (-1, 1)
    z = (1 - t).view(col) * x0 + t.view(col) * e
    v = MIX.flow_matching_velocity(z, t)
    obj_v = MeanFlow(jvp="fd", fd_eps=1e-5)
    h = 1e-5
    dudt = (u_exact(z + h * v, r, t + h) - u_exact(z - h * v, r, t - h)) / (2 * h)
    identity = v - (t - r).view(col) * dudt
    torch.testing.assert_close(u_exact(z, r, t), identity, rtol=1e-5, atol=1e-5)
    # through the objective: a pair (x0', e') on the same z_t whose conditional velocity e' − x0' is the
    # exact one (x0' = z − t·v, e' = z + (1 − t)·v): the residual vanishes for the exact u only
    x0p, ep = z - t.view(col) * v, z + (1 - t).view(col) * v
    u, target = obj_v.residual(u_exact, x0p, ep, r, t)
    torch.testing.assert_close(u, target, rtol=1e-5, atol=1e-5)
    bad_u, bad_target = obj_v.residual(lambda zz, rr, tt: u_exact(zz, rr, tt) + 0.3 * zz, x0p, ep, r, t)
    assert (bad_u - bad_target).abs().max() > 0.05


@pytest.mark.parametrize("name", ["sct", "scd", "meanflow"])
def test_objectives_backpropagate_and_declare_themselves(name):
    cls = get_objective(name)
    kw = {"teacher": MIX.as_denoiser()} if cls.needs_teacher else {}
    obj = cls(**kw)
    net = Net()
    f = C.AverageVelocityFunction(net) if name == "meanflow" else C.TrigFlowFunction(net, SD)
    x0 = MIX.sample(16, torch.Generator().manual_seed(8)).float()
    loss, stats = obj(f, x0, step=5, generator=torch.Generator().manual_seed(9))
    assert loss.shape == (16,) and torch.isfinite(loss).all() and "per_sample_sigma" in stats
    loss.mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.inp.parameters())
    if name != "meanflow":
        assert set(obj.extra_modules()) == {"weighting"}
        assert obj.extra_modules()["weighting"].linear.weight.grad is not None


def test_samplers_one_and_two_steps():
    gen = torch.Generator().manual_seed(10)
    z = torch.randn(4, 2, generator=gen, dtype=torch.float64)
    tf = get_sampler("trigflow")
    assert tf.default_sigmas(1) == [math.pi / 2] and tf.default_sigmas(2)[1] == pytest.approx(1.1)
    f = C.TrigFlowFunction(Net().double(), SD)
    one = tf(f, z, [math.pi / 2])
    torch.testing.assert_close(one, f(SD * z, torch.full((4,), math.pi / 2, dtype=torch.float64)))
    mf = get_sampler("meanflow")
    u = C.AverageVelocityFunction(Net().double())
    torch.testing.assert_close(mf(u, z, [1.0, 0.0]), z - u(z, torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)))
    assert mf.nfe(mf.default_sigmas(2)) == 2
    with pytest.raises(ValueError, match="descend"):
        mf(u, z, [0.0, 1.0])
    with pytest.raises(ValueError, match="descend within"):
        tf(f, z, [2.0])


@pytest.mark.parametrize("eps", [1e-2, 1e-3])
def test_finite_difference_jvp_is_within_its_second_order_bound_of_the_exact_one(eps):
    """jvp="fd" (for networks without forward-mode AD) against torch.func.jvp: central differences
    err by O(ε²); a tenfold smaller ε cuts the error about a hundredfold (float64)."""
    from cm_core.objectives._jvp import jvp

    f = C.TrigFlowFunction(Net().double(), SD)
    x, t = _x(), torch.linspace(0.2, 1.4, 6, dtype=torch.float64)
    dx, dt = _x(seed=3), torch.full((6,), 0.5, dtype=torch.float64)
    _, exact = jvp(lambda a, b: f.F(a, b), (x, t), (dx, dt), "exact")
    _, fd = jvp(lambda a, b: f.F(a, b), (x, t), (dx, dt), "fd", eps)
    err = (fd - exact).abs().max().item()
    assert err < 10 * eps**2 * exact.abs().max().item() + 1e-12, err
    _, coarse = jvp(lambda a, b: f.F(a, b), (x, t), (dx, dt), "fd", 10 * eps)
    assert (coarse - exact).abs().max().item() > 30 * err


def test_sigma_consistency_is_an_exact_reparameterization():
    """TrigFlow and MeanFlow models as f(x_σ, σ): the oracle's exact functions map to the exact EDM
    consistency function, and the σ-based one-step sampler equals the model's own sampler."""

    class Exact(nn.Module):  # F of the exact TrigFlow consistency function (one Gaussian: closed form)
        bcm = True

        def forward(self, x_in, c, **cond):
            x_t = x_in * SD
            cs, sn = torch.cos(c)[:, None], torch.sin(c)[:, None]
            return (cs * x_t - GAUSS.trigflow_consistency(x_t, c, SD)) / (sn * SD)

    f = C.sigma_consistency(C.TrigFlowFunction(Exact(), SD, "trig"))
    x, sigma = _x(), torch.tensor([0.1, 0.5, 1.0, 3.0, 10.0, 80.0], dtype=torch.float64)
    torch.testing.assert_close(f(x, sigma), GAUSS.flow(x, sigma, 0.0))

    class ExactU(nn.Module):  # MeanFlow's exact average velocity, from the net's (t, t − r) inputs
        bcm = True

        def forward(self, z, t, c_noise_end=None, **cond):
            return GAUSS.average_velocity(z, t - c_noise_end, t)

    u = C.sigma_consistency(C.AverageVelocityFunction(ExactU()))
    torch.testing.assert_close(u(x, sigma), GAUSS.flow(x, sigma, 0.0))
    other = GAUSS.as_consistency_function()
    assert C.sigma_consistency(other) is other  # a σ-based function is returned as it is

"""Training objectives: where the gradient flows, and their values at the exact solution."""

import math

import numpy as np
import pytest
import torch
from cm_core import (
    BidirectionalConsistencyFunction,
    ConsistencyFunction,
    EDMDenoiser,
    GaussianMixture,
    create_objective,
)
from cm_core.objectives import (
    BidirectionalConsistency,
    ConsistencyDistillation,
    ConsistencyTraining,
    ConsistentDiffusion,
    DirectConsistencyDistillation,
    EasyConsistencyTuning,
    EDMDenoising,
    ImprovedConsistencyTraining,
)
from cm_core.objectives._common import frozen_call
from torch import nn


class TinyNet(nn.Module):
    """(x_in, c_noise, c_noise_end=None) → raw output for vectors [B, 2], with dropout."""

    def __init__(self, dropout=0.0):
        super().__init__()
        self.inp = nn.Linear(3, 32)
        self.end = nn.Linear(1, 32, bias=False)
        self.out = nn.Linear(32, 2)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, c_noise, c_noise_end=None, **cond):
        h = self.inp(torch.cat([x, c_noise[:, None].to(x)], 1))
        if c_noise_end is not None:
            h = h + self.end(c_noise_end[:, None].to(x))
        return self.out(self.drop(torch.nn.functional.silu(h)))


class Spy(nn.Module):
    """Wraps a function and records, per call, whether autograd was recording and the output."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = []

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        self.calls.append({"grad_enabled": torch.is_grad_enabled(), "out": out, "args": args})
        return out


MIX = GaussianMixture([[-1.0, 0.0], [1.0, 0.5]], [0.3, 0.3], tol=1e-10)


def _x0(n=32, seed=0):
    return MIX.sample(n, torch.Generator().manual_seed(seed)).float()


CONSISTENCY_OBJECTIVES = {
    "ct": lambda: ConsistencyTraining(100),
    "ict": lambda: ImprovedConsistencyTraining(100),
    "cd": lambda: ConsistencyDistillation(MIX.as_denoiser(), 18),
    "ect": lambda: EasyConsistencyTuning(10),
    "direct-cm": lambda: DirectConsistencyDistillation(MIX.as_denoiser(), 40, 4),
}


@pytest.mark.parametrize("name", sorted(CONSISTENCY_OBJECTIVES))
def test_target_branch_carries_no_gradient(name):
    obj = CONSISTENCY_OBJECTIVES[name]()
    spy = Spy(ConsistencyFunction(TinyNet()))
    loss, stats = obj(spy, _x0(), step=40, generator=torch.Generator().manual_seed(1))
    assert loss.shape == (32,) and torch.isfinite(loss).all()
    with_grad = [c for c in spy.calls if c["grad_enabled"]]
    without = [c for c in spy.calls if not c["grad_enabled"]]
    assert len(with_grad) == 1 and with_grad[0]["out"].requires_grad
    if name != "direct-cm":  # Direct CM's target is the teacher's, not the student's
        assert len(without) == 1 and not without[0]["out"].requires_grad
    loss.mean().backward()
    used = [*spy.inner.net.inp.parameters(), *spy.inner.net.out.parameters()]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in used)


class MaskNet(nn.Module):
    """Outputs its own dropout mask (0 or 2 per element), so outputs reveal the mask drawn."""

    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.5)
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x, c_noise, c_noise_end=None, **cond):
        return self.drop(torch.ones_like(x) * self.w)


def _masks(spy):
    out = []
    for call in spy.calls:
        x, sigma = call["args"][0], call["args"][1]
        c_skip, c_out, _ = spy.inner.scalings(torch.as_tensor(sigma, dtype=torch.float32))
        out.append(((call["out"] - c_skip[:, None] * x) / c_out[:, None]).detach().round())
    return out


@pytest.mark.parametrize("name, step", [("ict", 50), ("ect", 0), ("ect", 50)])
def test_student_and_target_share_the_dropout_mask(name, step):
    # ECT at stage 0 has r = 0 for most samples: the mask must still match row by row.
    obj = {"ict": lambda: ImprovedConsistencyTraining(100), "ect": lambda: EasyConsistencyTuning(1)}[name]()
    spy = Spy(ConsistencyFunction(MaskNet(), boundary="edm"))
    x0 = _x0(256)
    obj(spy, x0, step=step, generator=torch.Generator().manual_seed(2))
    target_mask, student_mask = _masks(spy)[-2:]
    assert target_mask.shape == student_mask.shape and torch.equal(target_mask, student_mask)
    assert set(student_mask.unique().tolist()) == {0.0, 2.0}  # a real mask was drawn
    # Without the replay, two calls draw different masks.
    spy.calls.clear()
    spy(x0, torch.full((256,), 1.0))
    spy(x0, torch.full((256,), 1.0))
    a, b = _masks(spy)
    assert not torch.equal(a, b)


def test_ect_target_is_the_data_where_r_is_zero():
    obj = EasyConsistencyTuning(10_000)  # stage 0: r(t) = 0 for every t below ~4
    spy = Spy(ConsistencyFunction(TinyNet(), boundary="edm"))
    x0 = _x0(64)
    loss, stats = obj(spy, x0, step=0, generator=torch.Generator().manual_seed(4))
    # Recompute the loss by hand: r = 0 samples compare with y itself.
    gen = torch.Generator().manual_seed(4)
    t = (-1.1 + 2.0 * torch.randn(64, generator=gen, dtype=torch.float64)).exp()
    from cm_core import ect_r

    r = ect_r(t, 0)
    eps = torch.randn(x0.shape, generator=gen)
    pred = spy.calls[-1]["out"]
    torch.testing.assert_close(spy.calls[-1]["args"][0], x0 + t[:, None].float() * eps)
    zero = r == 0
    assert zero.any()
    expect = (pred[zero] - x0[zero]).norm(dim=1) / (t[zero] - r[zero]).float()
    torch.testing.assert_close(loss[zero], expect.to(loss.dtype))


def test_frozen_call_passes_gradient_to_inputs_only():
    net = TinyNet()
    f = BidirectionalConsistencyFunction(net)
    x = torch.randn(4, 2, requires_grad=True)
    out = frozen_call(f, x, torch.full((4,), 3.0))
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in net.parameters())


def test_bcm_soft_term_with_exact_jumps_reduces_to_the_ict_term():
    # With the exact PF-ODE jumps, f(f(x_t, t→t3), t3→σ_min) = f(x_t, t→σ_min).
    exact = GaussianMixture(MIX.means, MIX.stds, tol=1e-7).as_bidirectional_function()
    outputs = []

    def f(x, sigma, sigma_end=None, **cond):
        out = exact(x.double(), sigma, sigma_end).to(x.dtype)
        outputs.append(out)
        return out

    obj = BidirectionalConsistency(num_scales=21, huber_c=0.03)
    loss, stats = obj(f, _x0(16).double(), step=0, generator=torch.Generator().manual_seed(5))
    target, pred, jumped, pred_soft = outputs
    assert (pred_soft - pred).abs().max() < 1e-5
    assert stats["loss_soft"] > 0 and stats["sigma_end"] != stats["sigma"]


def test_bcm_gradient_reaches_the_inner_jump():
    f = Spy(BidirectionalConsistencyFunction(TinyNet()))
    loss, _ = BidirectionalConsistency(num_scales=41)(f, _x0(), step=0, generator=torch.Generator().manual_seed(6))
    grads = [c["grad_enabled"] for c in f.calls]
    assert grads == [False, True, True, True]
    loss.mean().backward()
    assert f.inner.net.end.weight.grad.abs().sum() > 0  # only the σ_end path uses this layer


# One Gaussian: the consistency function has a closed form, so loss values are exact to fp64.
GAUSS = GaussianMixture([[0.5, -0.3]], 0.4)


def _f_exact(perturb=0.0):
    """The exact consistency function, optionally perturbed by a smooth σ-dependent offset."""
    u = torch.tensor([1.0, -0.5], dtype=torch.float64)

    def f(x, sigma, **cond):
        s = torch.as_tensor(sigma, dtype=torch.float64)
        s = s.expand(x.shape[0]) if s.ndim == 0 else s
        out = GAUSS.consistency(x.double(), s)
        return out + perturb * ((s - 0.002) / (s + 1.0))[:, None] * u

    return f


def _mean_loss(obj, f, n=4000, seed=7):
    x0 = GAUSS.sample(n, torch.Generator().manual_seed(seed))
    loss, _ = obj(f, x0, step=0, generator=torch.Generator().manual_seed(seed + 1))
    return loss.mean().item()


def _per_sigma_sq(s, s_next, sd):
    return 1 / (s - s_next) ** 2


def test_cd_target_error_vanishes_as_n_grows():
    counts = [10, 20, 40, 80]
    exact = [
        _mean_loss(ConsistencyDistillation(GAUSS.as_denoiser(), n, distance="l2", weight=_per_sigma_sq), _f_exact())
        for n in counts
    ]
    perturbed = [
        _mean_loss(ConsistencyDistillation(GAUSS.as_denoiser(), n, distance="l2", weight=_per_sigma_sq), _f_exact(0.5))
        for n in counts
    ]
    # Heun's local error is O(Δ³): the Δ²-normalized loss of f* falls like Δ² (slope ≈ −2 per N).
    slope = np.polyfit(np.log(counts), np.log(exact), 1)[0]
    assert slope < -1.5, (exact, slope)
    # A function that is not consistent keeps a loss ≈ E|∂f/∂σ along the ODE|² > 0.
    assert min(perturbed) > 0.01 and perturbed[-1] > 0.5 * perturbed[0], perturbed
    assert exact[-1] < 1e-3 * perturbed[-1]


def test_ct_loss_of_the_exact_function_vanishes_and_it_is_the_minimizer():
    def ct(n):
        return ConsistencyTraining(1, s0=n - 1, s1=n - 1, distance="l2")  # fixed N = n

    counts = [10, 40, 160]
    raw = [_mean_loss(ct(n), _f_exact()) for n in counts]
    assert raw[0] > 4 * raw[1] > 16 * raw[2] * 0.5, raw  # → 0 roughly like 1/N²

    def normalized(n, f):
        obj = ConsistencyTraining(1, s0=n - 1, s1=n - 1, distance="l2", weight=_per_sigma_sq)
        return _mean_loss(obj, f)

    # CT's single-sample score estimate leaves a Δ²-sized variance term for every f, so the
    # normalized loss does not vanish; what must hold is that f* has the smaller one, by a
    # margin that does not shrink with N.
    gaps = [normalized(n, _f_exact(0.5)) - normalized(n, _f_exact()) for n in counts]
    assert min(gaps) > 0.02 and gaps[-1] > 0.5 * gaps[0], gaps


def test_ict_loss_of_the_exact_function_vanishes():
    losses = []
    for n in (11, 41, 161):
        obj = ImprovedConsistencyTraining(1, s0=n - 1, s1=n - 1, distance="l2")
        losses.append(_mean_loss(obj, _f_exact()))
    # λ = 1/Δσ times a Δσ²-sized squared difference: → 0 like Δσ.
    assert losses[0] > losses[1] > losses[2] and losses[2] < losses[0] / 4, losses


def test_direct_cm_with_exact_teacher_and_student():
    errors = []
    for steps in (10, 20, 40):
        obj = DirectConsistencyDistillation(GAUSS.as_denoiser(), 40, ode_steps=steps, distance="l2")
        errors.append(_mean_loss(obj, _f_exact(), n=400))
    # The only residual is the teacher's Heun error: second order, so the loss falls ~16× per doubling.
    assert errors[0] > 8 * errors[1] > 64 * errors[2], errors
    perturbed = _mean_loss(obj, _f_exact(0.5), n=400)
    assert errors[-1] < 1e-5 and perturbed > 1000 * errors[-1]


def test_edm_loss_of_the_exact_denoiser_is_one():
    # Data N(0, σ_d² I): λ(σ)·MMSE(σ) = (σ²+σ_d²)/(σσ_d)² · σ_d²σ²/(σ²+σ_d²) = 1 for every σ.
    g = GaussianMixture([[0.0] * 4], 0.5)
    x0 = g.sample(20_000, torch.Generator().manual_seed(9))
    loss, _ = EDMDenoising()(g.as_denoiser(), x0, generator=torch.Generator().manual_seed(10))
    # Each sample's mean over 4 dims of a χ²-like variable: SE ≈ √(2/4)/√n.
    assert abs(loss.mean().item() - 1) < 5 * math.sqrt(0.5 / 20_000)


def test_cdm_chains_are_independent_and_follow_euler_maruyama():
    calls = []

    def den(x, s, **c):
        calls.append((x.clone(), torch.as_tensor(s).clone()))
        return MIX.denoise(x, s)

    x0 = MIX.sample(8, torch.Generator().manual_seed(20))
    ConsistentDiffusion(chain_steps=3)(den, x0, generator=torch.Generator().manual_seed(21))
    (x_sigma, sigma), (x_a, t_a), (x_b, t_b), (x_end, t_end) = calls
    # Both chains start at the same x_σ and end at different points (independent noise).
    torch.testing.assert_close(x_a, torch.cat([x_sigma, x_sigma]))
    assert not torch.allclose(x_end[:8], x_end[8:])
    # Re-derive the first Euler–Maruyama step: x' = x + 2(t' − t)·d + √(2|t − t'|·t)·n, so
    # (x' − x − 2(t'−t)d)/√(2|t−t'|t) must be standard normal noise.
    d = (x_a - MIX.denoise(x_a, t_a)) / t_a[:, None]
    noise = (x_b - x_a - 2 * (t_b - t_a)[:, None] * d) / (2 * (t_a - t_b).abs() * t_a).sqrt()[:, None]
    assert noise.abs().max() < 6 and 0.3 < noise.std() < 2.0
    assert (t_b < t_a).all() and (t_end <= t_b).all()


def test_cdm_martingale_term_is_near_zero_for_the_exact_denoiser():
    x0 = MIX.sample(4000, torch.Generator().manual_seed(11))
    loss, stats = ConsistentDiffusion()(MIX.as_denoiser(), x0, generator=torch.Generator().manual_seed(12))
    assert abs(stats["martingale"]) < 0.02 * stats["loss_edm"]
    # A denoiser that is not a martingale in σ shows a clearly positive term.
    bad = lambda x, s, **c: MIX.denoise(x, s) + 2.0 * torch.as_tensor(s, dtype=x.dtype).reshape(-1, 1)
    _, bad_stats = ConsistentDiffusion(eps_max=0.5)(bad, x0, generator=torch.Generator().manual_seed(12))
    assert bad_stats["martingale"] > 10 * abs(stats["martingale"])


def test_diffusion_objectives_train_a_denoiser_module():
    den = EDMDenoiser(TinyNet())
    for obj in (EDMDenoising(), ConsistentDiffusion()):
        loss, _ = obj(den, _x0(), generator=torch.Generator().manual_seed(13))
        loss.mean().backward()
        assert all(p.grad is not None for p in den.net.inp.parameters())


def test_registry_and_errors():
    assert isinstance(create_objective("ict", total_steps=10), ImprovedConsistencyTraining)
    with pytest.raises(ValueError, match="objective must be one of"):
        create_objective("gan")
    with pytest.raises(ValueError, match="x0"):
        ConsistencyTraining(10)(ConsistencyFunction(TinyNet()), torch.zeros(0, 2), step=0)
    with pytest.raises(ValueError, match="exactly one"):
        BidirectionalConsistency(num_scales=None)
    with pytest.raises(ValueError, match="solver"):
        ConsistencyDistillation(MIX.as_denoiser(), solver="rk4")
    with pytest.raises(ValueError, match="distance"):
        ConsistencyTraining(10, distance="l3")
    with pytest.raises(ValueError, match="too small"):
        ImprovedConsistencyTraining(3)(ConsistencyFunction(TinyNet()), _x0(), step=0)


def test_step_counts_accept_numpy_and_torch_integers():
    import numpy as np
    from cm_core import ct_num_scales, ict_num_scales

    assert ct_num_scales(np.int64(5), 100) == ct_num_scales(5, 100)
    assert ict_num_scales(torch.tensor(5), 100) == ict_num_scales(5, 100)
    with pytest.raises(TypeError, match="step"):
        ct_num_scales(2.5, 100)

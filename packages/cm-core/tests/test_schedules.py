"""Noise grids, discretization curricula (schedules.py) and EMA rules (ema.py).

Every expected value is computed independently: numpy float64 for the Karras grid, the curriculum
formulas evaluated by hand, and the power-function EMA checked against its continuous limit.
"""

import math

import numpy as np
import pytest
import torch
from cm_core import (
    ICT_TARGET_EMA,
    ct_num_scales,
    ct_target_ema,
    ect_r,
    ect_stage,
    edm_sampling_sigmas,
    ema_update_,
    gamma_to_sigma_rel,
    ict_num_scales,
    karras_sigmas,
    power_function_ema,
    sigma_rel_to_gamma,
)


def _karras_numpy(n, sigma_min, sigma_max, rho):
    i = np.arange(n, dtype=np.float64)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (lo + i / (n - 1) * (hi - lo)) ** rho


# ---- karras_sigmas -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, sigma_min, sigma_max, rho",
    [
        (2, 0.002, 80.0, 7.0),
        (11, 0.002, 80.0, 7.0),
        (18, 0.002, 80.0, 7.0),
        (201, 0.002, 80.0, 7.0),
        (1281, 0.002, 80.0, 7.0),
        (40, 0.01, 1.0, 3.0),
        (7, 0.5, 2.0, 1.0),  # ρ = 1: a linear grid
        (33, 1e-4, 500.0, 10.0),
    ],
)
def test_karras_sigmas_matches_numpy(n, sigma_min, sigma_max, rho):
    got = karras_sigmas(n, sigma_min, sigma_max, rho)
    want = _karras_numpy(n, sigma_min, sigma_max, rho)
    assert got.dtype == torch.float64
    assert got.shape == (n,)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=0)
    # Exact ends (the boundary condition needs σ_0 == σ_min bit for bit).
    assert got[0].item() == sigma_min
    assert got[-1].item() == sigma_max
    assert bool((got[1:] > got[:-1]).all()), "grid must be strictly ascending"


def test_karras_sigmas_linear_when_rho_is_one():
    got = karras_sigmas(5, 1.0, 3.0, 1.0)
    np.testing.assert_allclose(got.numpy(), [1.0, 1.5, 2.0, 2.5, 3.0], rtol=1e-15)


def test_karras_sigmas_default_arguments():
    got = karras_sigmas(18)
    np.testing.assert_allclose(got.numpy(), _karras_numpy(18, 0.002, 80.0, 7.0), rtol=1e-12)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(n=1), "n"),
        (dict(n=10, sigma_min=0.0), "sigma_min"),
        (dict(n=10, sigma_min=-1.0), "sigma_min"),
        (dict(n=10, sigma_max=float("inf")), "sigma_max"),
        (dict(n=10, sigma_min=5.0, sigma_max=1.0), "sigma_min"),
        (dict(n=10, rho=0.0), "rho"),
    ],
)
def test_karras_sigmas_errors(kwargs, name):
    with pytest.raises(ValueError, match=name):
        karras_sigmas(**kwargs)


def test_karras_sigmas_rejects_non_integer_n():
    with pytest.raises(TypeError, match="n"):
        karras_sigmas(10.5)


# ---- edm_sampling_sigmas ---------------------------------------------------------------------


@pytest.mark.parametrize("num_steps", [2, 18, 40])
def test_edm_sampling_sigmas(num_steps):
    got = edm_sampling_sigmas(num_steps)
    assert got.dtype == torch.float64
    assert got.shape == (num_steps + 1,)
    want = np.concatenate([_karras_numpy(num_steps, 0.002, 80.0, 7.0)[::-1], [0.0]])
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=0)
    assert got[0].item() == 80.0
    assert got[num_steps - 1].item() == 0.002
    assert got[-1].item() == 0.0
    assert bool((got[1:] < got[:-1]).all()), "sampling steps must be strictly descending"


# ---- ct_num_scales -------------------------------------------------------------------------


def _ct_formula(k, K, s0, s1):
    return math.ceil(math.sqrt(k / K * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1) + 1


@pytest.mark.parametrize("s0, s1", [(2, 150), (2, 200), (10, 1280)])
def test_ct_num_scales_endpoints(s0, s1):
    K = 600_000
    assert ct_num_scales(0, K, s0, s1) == s0
    assert ct_num_scales(K, K, s0, s1) == s1 + 1
    # Beyond K the curriculum is clamped at its final value.
    assert ct_num_scales(K + 1, K, s0, s1) == s1 + 1
    assert ct_num_scales(10 * K, K, s0, s1) == s1 + 1


def test_ct_num_scales_mid_value_by_hand():
    # k = K/2, s0 = 2, s1 = 150: √(½·(151² − 2²) + 2²) − 1 = √11402.5 − 1 = 105.78… → ⌈·⌉ + 1 = 107.
    assert ct_num_scales(500, 1000, 2, 150) == 107
    # k = K/4, s0 = 2, s1 = 200: √(¼·(201² − 4) + 4) − 1 = √10103.25 − 1 = 99.51… → 100 + 1 = 101.
    assert ct_num_scales(250, 1000, 2, 200) == 101


def test_ct_num_scales_matches_formula_and_is_monotone():
    K, s0, s1 = 10_000, 2, 150
    values = [ct_num_scales(k, K, s0, s1) for k in range(0, K + 1, 7)]
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert values[0] == s0
    for k in range(1, K + 1, 97):
        assert ct_num_scales(k, K, s0, s1) == _ct_formula(k, K, s0, s1), k
    # The curriculum visits every size in between (it grows by at most one in small steps).
    assert set(range(s0, s1 + 2)) <= {ct_num_scales(k, K, s0, s1) for k in range(K + 1)}


def test_ct_num_scales_errors():
    with pytest.raises(ValueError, match="step"):
        ct_num_scales(-1, 100)
    with pytest.raises(ValueError, match="total_steps"):
        ct_num_scales(0, 0)
    with pytest.raises(ValueError, match="s1"):
        ct_num_scales(0, 100, s0=10, s1=5)


# ---- ict_num_scales ------------------------------------------------------------------------

# K = 800k, s0 = 10, s1 = 1280: K' = ⌊800000 / (log2(128) + 1)⌋ = ⌊800000 / 8⌋ = 100000.
ICT_EXPECTED = [
    (0, 11),
    (1, 11),
    (99_999, 11),
    (100_000, 21),
    (199_999, 21),
    (200_000, 41),
    (300_000, 81),
    (400_000, 161),
    (500_000, 321),
    (599_999, 321),
    (600_000, 641),
    (699_999, 641),
    (700_000, 1281),
    (799_999, 1281),
    (800_000, 1281),
    (5_000_000, 1281),
]


@pytest.mark.parametrize("step, expected", ICT_EXPECTED)
def test_ict_num_scales_paper_curriculum(step, expected):
    assert ict_num_scales(step, 800_000, 10, 1280) == expected


def test_ict_num_scales_default_arguments_and_monotone():
    values = [ict_num_scales(k, 800_000) for k in range(0, 900_000, 5_000)]
    assert values[0] == 11 and values[-1] == 1281
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert sorted(set(values)) == [11, 21, 41, 81, 161, 321, 641, 1281]


def test_ict_num_scales_non_power_of_two_ratio():
    # s1/s0 = 10: K' = ⌊1000 / (log2(10) + 1)⌋ = ⌊1000 / 4.3219…⌋ = 231; N = min(s0·2^⌊k/K'⌋, s1) + 1.
    assert ict_num_scales(230, 1000, 5, 50) == 6
    assert ict_num_scales(231, 1000, 5, 50) == 11
    assert ict_num_scales(462, 1000, 5, 50) == 21
    assert ict_num_scales(693, 1000, 5, 50) == 41
    assert ict_num_scales(924, 1000, 5, 50) == 51  # 5·16 = 80 clamps to s1 = 50


def test_ict_num_scales_too_few_steps():
    with pytest.raises(ValueError, match="total_steps"):
        ict_num_scales(0, 5, 10, 1280)


# ---- ect_stage / ect_r ---------------------------------------------------------------------


def test_ect_stage():
    assert ect_stage(0, 100) == 0
    assert ect_stage(99, 100) == 0
    assert ect_stage(100, 100) == 1
    assert ect_stage(1234, 100) == 12
    with pytest.raises(ValueError, match="double_steps"):
        ect_stage(5, 0)
    with pytest.raises(ValueError, match="step"):
        ect_stage(-1, 10)


def test_ect_r_hand_value():
    # t = 2, stage = 3, q = 2, k = 8, b = 1:
    # sigmoid(−2) = 1/(1 + e²) = 0.11920292202211755; 1 + 8·that = 1.9536233761769404;
    # q^−4 = 1/16 → ratio = 1 − 0.12210146101105878 = 0.8778985389889412; r = 1.7557970779778824.
    r = ect_r(torch.tensor([2.0], dtype=torch.float64), stage=3, q=2.0, k=8.0, b=1.0)
    assert r.dtype == torch.float64
    assert r.item() == pytest.approx(1.7557970779778824, rel=1e-13)


def test_ect_r_matches_numpy_formula():
    g = np.random.default_rng(0)
    t = np.exp(g.normal(-1.1, 2.0, size=1000))
    for stage, q, k, b in [(0, 2.0, 8.0, 1.0), (2, 2.0, 8.0, 1.0), (1, 4.0, 8.0, 1.0), (5, 3.0, 4.0, 0.5)]:
        want = np.maximum(0.0, t * (1 - q ** -(stage + 1) * (1 + k / (1 + np.exp(b * t)))))
        got = ect_r(torch.from_numpy(t), stage, q, k, b).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-300)


def test_ect_r_bounds_and_convergence():
    t = torch.exp(torch.linspace(-8, 5, 200, dtype=torch.float64))
    prev_gap = None
    for stage in range(0, 20):
        r = ect_r(t, stage)
        assert bool((r >= 0).all())
        assert bool((r < t).all()), stage
        gap = t - r
        if prev_gap is not None:
            assert bool((gap <= prev_gap).all()), "Δt must shrink as the stage grows"
        prev_gap = gap
    # Stage 19, q = 2: Δt/t = 2^−20·(1 + 8·sigmoid(−t)) ≤ 5·2^−20.
    assert float((prev_gap / t).max()) <= 5 * 2.0**-20 * (1 + 1e-9)


def test_ect_r_clamps_to_zero():
    # Stage 0, q = 2, small t: ratio = 1 − ½·(1 + 8·sigmoid(−t)) ≈ 1 − ½·5 < 0 → r = 0.
    t = torch.tensor([1e-3, 0.05, 0.5], dtype=torch.float64)
    assert torch.equal(ect_r(t, 0), torch.zeros(3, dtype=torch.float64))
    # Large t at stage 0 stays positive: sigmoid(−20) ≈ 2e-9 → r ≈ t/2.
    assert ect_r(torch.tensor([20.0], dtype=torch.float64), 0).item() == pytest.approx(10.0, rel=1e-7)


def test_ect_r_errors():
    t = torch.ones(3)
    with pytest.raises(ValueError, match="q"):
        ect_r(t, 0, q=1.0)
    with pytest.raises(ValueError, match="q"):
        ect_r(t, 0, q=-2.0)
    with pytest.raises(ValueError, match="stage"):
        ect_r(t, -1)
    with pytest.raises(ValueError, match="t must"):
        ect_r(torch.tensor([1.0, -0.5]), 0)


# ---- EMA -----------------------------------------------------------------------------------


def test_ct_target_ema_at_step_zero():
    assert ct_target_ema(0, 1000) == pytest.approx(0.95, abs=1e-15)
    assert ct_target_ema(0, 1000, variant="openai") == pytest.approx(0.9025, abs=1e-15)
    assert ICT_TARGET_EMA == 0.0


def test_ct_target_ema_later_value_by_hand():
    # k = K/2 with s0 = 2, s1 = 150: N = 107 (see test_ct_num_scales_mid_value_by_hand).
    assert ct_target_ema(500, 1000) == pytest.approx(0.95 ** (2 / 107), rel=1e-14)
    assert ct_target_ema(500, 1000, variant="openai") == pytest.approx(0.95 ** (2 / 106), rel=1e-14)
    assert ct_target_ema(500, 1000) == pytest.approx(0.9990417063, abs=1e-10)
    # End of the curriculum: N = 151.
    assert ct_target_ema(1000, 1000) == pytest.approx(0.95 ** (2 / 151), rel=1e-14)
    # ImageNet-64: s0 = 2, s1 = 200, μ0 = 0.95, N(K) = 201.
    assert ct_target_ema(10, 10, s0=2, s1=200) == pytest.approx(0.95 ** (2 / 201), rel=1e-14)


def test_ct_target_ema_increases_toward_one():
    values = [ct_target_ema(k, 10_000) for k in range(0, 10_001, 250)]
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert all(0.95 <= v < 1 for v in values)


def test_ct_target_ema_errors():
    with pytest.raises(ValueError, match="variant"):
        ct_target_ema(0, 10, variant="kinyugo")
    with pytest.raises(ValueError, match="mu0"):
        ct_target_ema(0, 10, mu0=1.0)
    with pytest.raises(ValueError, match="mu0"):
        ct_target_ema(0, 10, mu0=0.0)


def _sigma_rel_formula(gamma):
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


@pytest.mark.parametrize("sigma_rel", [0.01, 0.05, 0.1, 0.2, 0.28])
def test_sigma_rel_gamma_round_trip(sigma_rel):
    gamma = sigma_rel_to_gamma(sigma_rel)
    assert gamma > -1
    assert _sigma_rel_formula(gamma) == pytest.approx(sigma_rel, rel=1e-10)
    assert gamma_to_sigma_rel(gamma) == pytest.approx(sigma_rel, rel=1e-10)
    assert sigma_rel_to_gamma(gamma_to_sigma_rel(gamma)) == pytest.approx(gamma, rel=1e-9)


def test_sigma_rel_known_values():
    # EDM2 (Karras et al. 2024): σ_rel = 0.10 ↔ γ ≈ 6.94, σ_rel = 0.05 ↔ γ ≈ 16.97.
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.005)
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.005)
    # γ = 0: σ_rel² = 1/(4·3) = 1/12; γ = 1: 2/(9·4) = 1/18.
    assert gamma_to_sigma_rel(0.0) == pytest.approx(1 / math.sqrt(12), rel=1e-15)
    assert gamma_to_sigma_rel(1.0) == pytest.approx(1 / math.sqrt(18), rel=1e-15)


def test_sigma_rel_errors():
    with pytest.raises(ValueError, match="sigma_rel"):
        sigma_rel_to_gamma(0.0)
    with pytest.raises(ValueError, match="sigma_rel"):
        sigma_rel_to_gamma(0.3)
    with pytest.raises(ValueError, match="gamma"):
        gamma_to_sigma_rel(-1.0)


def test_power_function_ema_formula():
    assert power_function_ema(0, 6.94) == 0.0
    assert power_function_ema(1, 6.94) == 0.0  # (1 − 1/1)^{γ+1}: the first step copies
    assert power_function_ema(10, 2.0) == pytest.approx(0.9**3, rel=1e-15)
    assert power_function_ema(100, 0.5, step_size=10) == pytest.approx(0.9**1.5, rel=1e-15)
    assert power_function_ema(5, 1.0, step_size=10) == 0.0


@pytest.mark.parametrize("gamma", [0.0, 1.0, 6.94, 16.97])
def test_power_function_ema_averages_with_power_density(gamma):
    """With θ_t = t, the EMA after T steps is ∫ τ·(γ+1)τ^γ dτ / T^{γ+1} = T·(γ+1)/(γ+2)."""
    T = 2000
    ema = torch.zeros(3, dtype=torch.float64)
    for t in range(1, T + 1):
        ema_update_([ema], [torch.full((3,), float(t), dtype=torch.float64)], power_function_ema(t, gamma))
    want = T * (gamma + 1) / (gamma + 2)
    # The discrete sum differs from the integral by O(1/T) relatively (≈ 0.5/T here).
    np.testing.assert_allclose(ema.numpy(), want, rtol=1e-3)
    # A plain constant EMA (β = 0.999) is far from this: the check is discriminating.
    const = torch.zeros(1, dtype=torch.float64)
    for t in range(1, T + 1):
        ema_update_([const], [torch.tensor([float(t)], dtype=torch.float64)], 0.999)
    assert abs(const.item() - want) / want > 0.05


def test_ema_update_formula():
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(4, 5, generator=g), torch.randn(7, generator=g, dtype=torch.float64)]
    ema = [torch.randn(4, 5, generator=g), torch.randn(7, generator=g, dtype=torch.float64)]
    before = [e.clone() for e in ema]
    ema_update_(ema, params, 0.9)
    for e, b, p in zip(ema, before, params):
        want = 0.9 * b.double() + 0.1 * p.double()
        torch.testing.assert_close(e.double(), want, rtol=1e-6, atol=1e-6)
    # decay 0 copies, decay 1 keeps.
    ema_update_(ema, params, 0.0)
    for e, p in zip(ema, params):
        torch.testing.assert_close(e, p, rtol=0, atol=1e-7)
    frozen = [e.clone() for e in ema]
    ema_update_(ema, [p + 1 for p in params], 1.0)
    for e, f in zip(ema, frozen):
        assert torch.equal(e, f)


def test_ema_update_parameters_and_dtype():
    model = torch.nn.Linear(3, 2)
    ema_model = torch.nn.Linear(3, 2).double()
    ema_update_(ema_model.parameters(), model.parameters(), 0.0)
    assert ema_model.weight.dtype == torch.float64
    torch.testing.assert_close(ema_model.weight, model.weight.double(), rtol=0, atol=0)
    assert ema_model.weight.grad is None


def test_ema_update_errors():
    a = [torch.zeros(3)]
    with pytest.raises(ValueError, match="decay"):
        ema_update_(a, [torch.ones(3)], 1.5)
    with pytest.raises(ValueError, match="decay"):
        ema_update_(a, [torch.ones(3)], -0.1)
    with pytest.raises(ValueError, match="tensors"):
        ema_update_(a, [torch.ones(3), torch.ones(3)], 0.5)
    with pytest.raises(ValueError, match="shape"):
        ema_update_(a, [torch.ones(4)], 0.5)

"""The sampler registry (sampling.py): names, one calling convention, σ defaults and NFE."""

import math

import pytest
import torch
from cm_core import (
    FUNCTIONS,
    SAMPLERS,
    FunctionKind,
    GaussianMixture,
    Sampler,
    bcm_ancestral_sample,
    bcm_mixture_sample,
    edm_sampling_sigmas,
    get_sampler,
    inversion_sigmas,
    karras_sigmas,
    multistep_sample,
    onestep_sample,
    register_function,
    register_sampler,
    solve,
)


def test_every_function_kinds_samplers_are_registered():
    assert list(SAMPLERS) == ["onestep", "multistep", "bcm-ancestral", "bcm-zigzag", "bcm-mixture", "heun", "lcm", "trigflow", "meanflow"]
    for kind in FUNCTIONS.values():
        assert set(kind.samplers) <= set(SAMPLERS), kind.name
    with pytest.raises(ValueError, match=r"samplers \['ddim'\] that are not registered"):
        register_function(FunctionKind("x", lambda net, **kw: net, samplers=("ddim",), default_sampler="ddim"))
    assert "x" not in FUNCTIONS


def test_get_and_register():
    assert get_sampler("heun") is SAMPLERS["heun"] and get_sampler(SAMPLERS["heun"]) is SAMPLERS["heun"]
    with pytest.raises(ValueError, match="unknown sampler 'bcm'; known: onestep, multistep"):
        get_sampler("bcm")
    with pytest.raises(TypeError):
        register_sampler(multistep_sample)
    with pytest.raises(ValueError, match="count"):
        Sampler("x", multistep_sample, lambda *a: [], lambda *a: 0, count="steps")
    mine = Sampler("mine", SAMPLERS["multistep"].run, SAMPLERS["multistep"].schedule, SAMPLERS["multistep"].cost)
    try:
        assert register_sampler(mine) is get_sampler("mine")
    finally:
        del SAMPLERS["mine"]


def test_default_sigmas():
    # The defaults cm sample, cm edit, cm eval, the trainer's grids and the demo use.
    k3 = karras_sigmas(4, 0.002, 80.0).flip(0).tolist()
    ms = SAMPLERS["multistep"]
    assert SAMPLERS["onestep"].default_sigmas() == [80.0] == ms.default_sigmas(1)
    assert ms.default_sigmas(3) == k3[:-1] and ms.default_sigmas(2)[1] == pytest.approx(2.5152, abs=1e-4)
    assert ms.default_sigmas(2, recipe=(80.0, 0.821)) == [80.0, 0.821]  # the recipe when it has n points
    assert ms.default_sigmas(3, recipe=(80.0, 0.821)) == k3[:-1]
    assert ms.default_sigmas(1, sigma_min=0.003, sigma_max=40.0) == [40.0]
    assert SAMPLERS["bcm-ancestral"].default_sigmas(1) == [80.0, 0.002]
    assert SAMPLERS["bcm-ancestral"].default_sigmas(3) == k3
    assert SAMPLERS["bcm-zigzag"].default_sigmas(sigma_max=70.0) == [70.0, 0.002]
    assert SAMPLERS["bcm-mixture"].default_sigmas() == [80.0, 3.0, 0.002]
    assert SAMPLERS["heun"].default_sigmas() == edm_sampling_sigmas(18).tolist()
    assert SAMPLERS["heun"].default_sigmas(3, sigma_min=0.01) == edm_sampling_sigmas(3, 0.01).tolist()
    with pytest.raises(ValueError, match="onestep takes one"):
        SAMPLERS["onestep"].default_sigmas(2)
    with pytest.raises(ValueError, match="fixed recipe"):
        SAMPLERS["bcm-mixture"].default_sigmas(4)
    with pytest.raises(ValueError, match="nfe must be >= 1"):
        ms.default_sigmas(0)
    with pytest.raises(ValueError, match="sigma_min must be < sigma_max"):
        ms.default_sigmas(2, sigma_min=80.0)
    assert inversion_sigmas() == [0.07, 15.0, 80.0] and inversion_sigmas(sigma_max=40.0) == [0.07, 15.0, 40.0]
    assert inversion_sigmas(1) == [0.07, 80.0] and inversion_sigmas(3) == karras_sigmas(4, 0.07, 80.0).tolist()


def test_nfe():
    assert SAMPLERS["onestep"].nfe([80.0]) == 1 and SAMPLERS["multistep"].nfe([80.0, 2.0, 0.5]) == 3
    assert SAMPLERS["bcm-ancestral"].nfe([80.0, 2.4, 0.002]) == 2
    assert SAMPLERS["bcm-zigzag"].nfe([80.0, 0.002]) == 3  # BCM's 3-NFE recipe
    assert SAMPLERS["bcm-mixture"].nfe([80.0, 3.0, 0.002]) == 4  # and 4-NFE
    assert SAMPLERS["bcm-mixture"].nfe([80.0, 0.002], zigzag=[(0.1, 1.2), (0.2, 2.0)]) == 5
    heun = SAMPLERS["heun"]
    assert heun.nfe(heun.default_sigmas()) == 35 and heun.nfe(edm_sampling_sigmas(3)) == 5
    assert heun.nfe(torch.tensor([80.0, 1.0, 0.5])) == 4  # no final 0: Heun all the way


def test_registry_calls_equal_the_functions_bit_for_bit():
    g = GaussianMixture([[-1.0, 0.0], [1.0, 0.5]], stds=0.3)
    f, d = g.as_consistency_function(), g.as_denoiser()
    fb = lambda x, t, t_end: g.flow(x, t, t_end)
    z = torch.randn(6, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    gen = lambda: torch.Generator().manual_seed(1)
    assert torch.equal(SAMPLERS["onestep"](f, z, [80.0], clip=1.0), onestep_sample(f, z, 80.0, clip=1.0))
    assert torch.equal(
        SAMPLERS["multistep"](f, z, [80.0, 0.8], generator=gen(), renoise="ect"),
        multistep_sample(f, z, [80.0, 0.8], generator=gen(), renoise="ect"),
    )
    assert torch.equal(SAMPLERS["bcm-ancestral"](fb, z, [80.0, 2.4, 0.002]), bcm_ancestral_sample(fb, z))
    assert torch.equal(SAMPLERS["bcm-mixture"](fb, z, [80.0, 3.0, 0.002], generator=gen()),
                       bcm_mixture_sample(fb, z, generator=gen()))  # fmt: skip
    assert torch.equal(
        SAMPLERS["bcm-zigzag"](fb, z, [80.0, 0.002], generator=gen()),
        bcm_mixture_sample(fb, z, [80.0, 0.002], [(0.1, 1.2)], generator=gen()),
    )
    ts = edm_sampling_sigmas(5)
    assert torch.equal(SAMPLERS["heun"](d, z, ts), solve(d, 80.0 * z, ts))
    assert torch.equal(
        SAMPLERS["heun"](d, z, ts, s_churn=2.0, generator=gen()), solve(d, 80.0 * z, ts, s_churn=2.0, generator=gen())
    )
    for name in ("onestep", "bcm-ancestral"):  # deterministic, but the same contract
        with pytest.raises(ValueError, match="not both"):
            SAMPLERS[name](
                f, z, [80.0, 0.002][: 1 if name == "onestep" else 2], generator=gen(), randn_like=torch.randn_like
            )
    with pytest.raises(ValueError, match="onestep takes one σ"):
        SAMPLERS["onestep"](f, z, [80.0, 1.0])
    assert SAMPLERS["multistep"].with_defaults({"renoise": "ect"}) == {"sigma_min": 0.002, "renoise": "ect"}
    assert SAMPLERS["heun"].options["s_tmax"] == math.inf

"""Kinds of trained function: how a raw network becomes one, and which samplers fit it.

An objective declares the kind of function it trains (``Objective.function``); the trainer,
``cm_train.load_trained`` and the CLI build the function and pick samplers from this registry, so
none of them needs to know the objective. Built in:

  "consistency"  f(x, σ): :class:`~cm_core.ConsistencyFunction` (CT, iCT, CD, ECT, Direct CM)
  "bcm"          f(x, σ, σ_end): :class:`~cm_core.BidirectionalConsistencyFunction` (BCM); with
                 σ_end = σ_min it is a consistency function, so the consistency samplers fit too
  "latent-consistency"  LCM's f(x_t, t) on a text-to-image model's discrete timesteps
                 (:class:`~cm_core.discrete.LatentConsistencyFunction`; lcm, latent-direct-cm),
                 sampled by "lcm" (diffusers' LCMScheduler), its "σ list" being timesteps
  "trigflow"     sCM's f(x_t, t) = cos t·x_t − sin t·σ_d·F on TrigFlow time (sct, scd), sampled by
                 "trigflow" (its list holds TrigFlow times t, from π/2)
  "average-velocity"  MeanFlow's u(z_t, r, t) (meanflow), sampled by "meanflow" (flow-matching times
                 from 1 to 0)
  "diffusion"    a denoiser D(x, σ): :class:`~cm_core.EDMDenoiser` (EDM, CDM), sampled by solving
                 the PF-ODE

A plugin adds a kind with :func:`register_function` (e.g. a TrigFlow function) and declares it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
from torch import nn

from .continuous import HALF_PI, AverageVelocityFunction, TrigFlowFunction
from .discrete import LatentConsistencyFunction, lcm_inference_timesteps, lcm_sample
from .parameterization import BidirectionalConsistencyFunction, ConsistencyFunction, EDMDenoiser
from .sampling import SAMPLERS, Sampler, register_sampler

__all__ = ["FunctionKind", "FUNCTIONS", "register_function", "function_kind"]


@dataclasses.dataclass(frozen=True)
class FunctionKind:
    """A kind of trained function.

    ``build(net, *, sigma_data, sigma_min, c_noise, boundary)`` wraps a raw network
    ``net(x_in, c_noise, **cond)``; ``samplers`` are the names of the registered samplers that fit
    (:data:`cm_core.SAMPLERS`; the CLI's ``--sampler`` choices), ``default_sampler`` the one
    ``--sampler auto`` picks for several steps.
    """

    name: str
    build: Callable[..., nn.Module]
    samplers: tuple[str, ...]
    default_sampler: str
    doc: str = ""

    def __post_init__(self):
        if self.default_sampler not in self.samplers:
            raise ValueError(
                f"function kind {self.name!r}: default sampler {self.default_sampler!r} not in its samplers"
            )


FUNCTIONS: dict[str, FunctionKind] = {}


def register_function(kind: FunctionKind) -> FunctionKind:
    """Add (or replace) a kind of trained function; returns it. Its samplers must be registered
    (:func:`cm_core.register_sampler` first for a new one)."""
    if not isinstance(kind, FunctionKind):
        raise TypeError(f"register_function takes a cm_core.FunctionKind, got {type(kind).__name__}")
    unknown = [name for name in kind.samplers if name not in SAMPLERS]
    if unknown:
        raise ValueError(
            f"function kind {kind.name!r} lists samplers {unknown} that are not registered; "
            f"known: {', '.join(SAMPLERS)} (cm_core.register_sampler adds one)"
        )
    FUNCTIONS[kind.name] = kind
    return kind


def function_kind(name: str) -> FunctionKind:
    try:
        return FUNCTIONS[name]
    except KeyError:
        raise ValueError(f"unknown function kind {name!r}; known: {', '.join(sorted(FUNCTIONS))}") from None


register_function(
    FunctionKind(
        "consistency",
        lambda net, *, sigma_data, sigma_min, c_noise, boundary: ConsistencyFunction(
            net, sigma_data, sigma_min, c_noise, boundary
        ),
        samplers=("onestep", "multistep"),
        default_sampler="multistep",
        doc="f(x, σ) with f(x, σ_min) = x",
    )
)
register_function(
    FunctionKind(
        "bcm",
        lambda net, *, sigma_data, sigma_min, c_noise, boundary: BidirectionalConsistencyFunction(
            net, sigma_data, sigma_min, c_noise
        ),
        samplers=("onestep", "multistep", "bcm-ancestral", "bcm-zigzag", "bcm-mixture"),
        default_sampler="bcm-ancestral",
        doc="f(x, σ, σ_end): jumps along the PF-ODE in both directions",
    )
)
register_function(
    FunctionKind(
        "diffusion",
        lambda net, *, sigma_data, sigma_min, c_noise, boundary: EDMDenoiser(net, sigma_data, c_noise),
        samplers=("heun",),
        default_sampler="heun",
        doc="a denoiser D(x, σ) (EDM preconditioning), sampled by solving the PF-ODE",
    )
)


def _lcm_run(f, z, timesteps, *, generator=None, randn_like=None, clip=None, **cond):
    x = lcm_sample(f, f.vp, z, timesteps, generator=generator, randn_like=randn_like, **cond)
    return x if clip is None else x.clamp(-clip, clip)


register_sampler(
    Sampler(
        "lcm",
        _lcm_run,
        lambda n, sigma_min, sigma_max, recipe: lcm_inference_timesteps(n).tolist(),
        lambda ts, options: len(ts),
        default_count=4,
        doc="LCMScheduler: x = f(z, t_0), then x = f(√ᾱ_t·x + √(1−ᾱ_t)·ε, t) for each next timestep t "
        "(its list holds discrete timesteps, descending, not σ values)",
    )
)
register_function(
    FunctionKind(
        "latent-consistency",
        lambda net, *, sigma_data, sigma_min, c_noise, boundary: LatentConsistencyFunction(net, sigma_data),
        samplers=("lcm",),
        default_sampler="lcm",
        doc="LCM's f(x_t, t) on a text-to-image model's discrete timesteps (LoRA on a diffusers UNet)",
    )
)


def _trigflow_times(n, sigma_min, sigma_max, recipe):
    """π/2, then sCM's 2-step intermediate t = 1.1; more steps: n − 1 times spaced evenly on [0.2, 1.1]."""
    if n == 1:
        return [HALF_PI]
    return [HALF_PI] + torch.linspace(1.1, 0.2, n - 1, dtype=torch.float64).tolist()


def _trigflow_run(f, z, ts, *, generator=None, randn_like=None, clip=None, sigma_data=0.5, **cond):
    """x = f(σ_d·z, t_0); for each next t: x = f(cos t·x + sin t·σ_d·ε, t) (sCM's multistep sampling)."""
    from ._random import noise_source

    ts = [float(t) for t in (ts.tolist() if torch.is_tensor(ts) else ts)]
    if not ts or any(b >= a for a, b in zip(ts, ts[1:])) or ts[0] > HALF_PI + 1e-9 or ts[-1] <= 0:
        raise ValueError(f"TrigFlow times must descend within (0, π/2], got {ts}")
    sd = float(getattr(f, "sigma_data", sigma_data))
    draw = noise_source(generator, randn_like)
    x = f(sd * z, torch.full((z.shape[0],), ts[0], dtype=z.dtype, device=z.device), **cond)
    for t in ts[1:]:
        x_t = math.cos(t) * x + math.sin(t) * sd * draw(x)
        x = f(x_t, torch.full((z.shape[0],), t, dtype=z.dtype, device=z.device), **cond)
    return x if clip is None else x.clamp(-clip, clip)


def _meanflow_times(n, sigma_min, sigma_max, recipe):
    """n steps from t = 1 to 0, evenly spaced (one step: [1, 0])."""
    return torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64).tolist()


def _meanflow_run(u, z, ts, *, generator=None, randn_like=None, clip=None, **cond):
    """z_1 = ε; for consecutive times (t, r): z_r = z_t − (t − r)·u(z_t, r, t) (one step: x = ε − u(ε, 0, 1))."""
    ts = [float(t) for t in (ts.tolist() if torch.is_tensor(ts) else ts)]
    if len(ts) < 2 or any(b >= a for a, b in zip(ts, ts[1:])) or ts[0] > 1 or ts[-1] < 0:
        raise ValueError(f"MeanFlow times must descend within [0, 1] with at least two (e.g. [1, 0]), got {ts}")
    x = z
    b = z.shape[0]
    for t, r in zip(ts, ts[1:]):
        tt = torch.full((b,), t, dtype=z.dtype, device=z.device)
        rr = torch.full((b,), r, dtype=z.dtype, device=z.device)
        x = x - (t - r) * u(x, rr, tt, **cond)
    return x if clip is None else x.clamp(-clip, clip)


register_sampler(Sampler("trigflow", _trigflow_run, _trigflow_times, lambda ts, o: len(ts), default_count=1,
                         doc="sCM: x = f(σ_d·z, π/2), then f(cos t·x + sin t·σ_d·ε, t) per next TrigFlow time t"))  # fmt: skip
register_sampler(Sampler("meanflow", _meanflow_run, _meanflow_times, lambda ts, o: len(ts) - 1, default_count=1,
                         doc="MeanFlow: z_r = z_t − (t − r)·u(z_t, r, t) along flow-matching times 1 → 0"))  # fmt: skip
register_function(
    FunctionKind(
        "trigflow",
        lambda net, *, sigma_data, sigma_min, c_noise, boundary: TrigFlowFunction(
            net, sigma_data, "edm" if c_noise == "edm" else "trig"
        ),
        samplers=("trigflow",),
        default_sampler="trigflow",
        doc="sCM's f(x_t, t) = cos t·x_t − sin t·σ_d·F(x_t/σ_d, c_noise(t)) on TrigFlow time",
    )
)
register_function(
    FunctionKind(
        "average-velocity",
        lambda net, *, sigma_data, sigma_min, c_noise, boundary: AverageVelocityFunction(net),
        samplers=("meanflow",),
        default_sampler="meanflow",
        doc="MeanFlow's average velocity u(z_t, r, t) on flow-matching time",
    )
)

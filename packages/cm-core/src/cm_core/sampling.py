"""The sampler registry: every sampler by name, in one calling convention, with its σ defaults.

cm-eval, the trainer's sample grids, the CLI and the demo pick samplers here, by the names that
:class:`~cm_core.FunctionKind` lists as the samplers fitting a trained function:

  onestep        x = f(σ_max·z, σ_max)                                   CM Algorithm 1, one step
  multistep      x ← f(x + s(σ)·ε, σ) for each next σ                    CM Algorithm 1 (renoise cm | ect)
  bcm-ancestral  jumps x ← f(x, σ_i, σ_{i+1}) down a chain to σ_min      BCM ancestral sampling
  bcm-zigzag     one jump σ_max → σ_min, then zigzag rounds              BCM zigzag (3 NFE)
  bcm-mixture    an ancestral chain, then zigzag rounds                  BCM mixture (4 NFE)
  heun           a denoiser D's PF-ODE solved to σ = 0                    EDM Algorithm 1 (2 with churn)

Each :class:`Sampler` is called as ``sampler(f, z, sigmas, *, generator=None, randn_like=None,
clip=None, **options, **cond)``: ``options`` are the keys of ``Sampler.options`` (their defaults
filled in), every other keyword goes to the network as conditioning (``class_labels``). Noise comes
from ``randn_like(x)`` (EDM's argument: x → ε shaped like x, e.g. cm_eval's one generator per image)
or else from ``generator``. ``default_sigmas(n, sigma_min=, sigma_max=, recipe=)`` is the σ list
used when none is given, for n of the sampler's ``count``; ``nfe(sigmas, **options)`` the network
evaluations a σ list costs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from . import _validate as check
from ._random import NoiseSource
from .samplers import (
    BCM_INVERT_SIGMAS,
    BCM_MIXTURE_SIGMAS,
    BCM_MIXTURE_ZIGZAG,
    BCM_ZIGZAG,
    _clip,
    bcm_ancestral_sample,
    bcm_mixture_sample,
    multistep_sample,
    onestep_sample,
)
from .schedules import edm_sampling_sigmas, karras_sigmas
from .solvers import solve

__all__ = [
    "Sampler",
    "SAMPLERS",
    "register_sampler",
    "get_sampler",
    "inversion_sigmas",
    "ECT_TWO_STEP_SIGMAS",
    "EDM_HEUN_STEPS",
]

ECT_TWO_STEP_SIGMAS = (80.0, 0.821)  # ECT's 2-step σ list (CIFAR-10; Geng et al. 2024)
EDM_HEUN_STEPS = 18  # EDM's CIFAR-10 sampler: 18 time steps, 35 NFE


@dataclasses.dataclass(frozen=True)
class Sampler:
    """A sampler of the registry.

    ``run(f, z, sigmas, *, generator, randn_like, clip, **options, **cond)`` samples;
    ``schedule(n, sigma_min, sigma_max, recipe)`` gives its default σ list; ``cost(sigmas, options)``
    its NFE. ``count`` names what n counts: ``"nfe"`` (network evaluations), ``"heun-steps"`` (EDM
    time steps: n σ values > 0 and a final 0, NFE 2n − 1) or None (a fixed recipe, no n);
    ``default_count`` is n when none is given. ``options``: option names and their defaults.
    ``jumps``: the σ list is a BCM chain of jumps that includes its end σ (σ_min).
    """

    name: str
    run: Callable[..., torch.Tensor]
    schedule: Callable[[int | None, float, float, tuple[float, ...]], list[float]]
    cost: Callable[[list[float], Mapping[str, Any]], int]
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    count: str | None = "nfe"
    default_count: int | None = 1
    jumps: bool = False
    doc: str = ""

    def __post_init__(self):
        if self.count not in ("nfe", "heun-steps", None):
            raise ValueError(f"sampler {self.name!r}: count must be 'nfe', 'heun-steps' or None, got {self.count!r}")
        if (self.count is None) != (self.default_count is None):
            raise ValueError(f"sampler {self.name!r}: default_count goes with a count (None for a fixed recipe)")

    def __call__(
        self,
        f,
        z: torch.Tensor,
        sigmas: Sequence[float] | torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        randn_like: NoiseSource | None = None,
        clip: float | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Sample from noise z ~ N(0, I) [B, ...] along ``sigmas``; ``kwargs``: options, then cond."""
        if generator is not None and randn_like is not None:
            raise ValueError("pass generator= or randn_like=, not both")
        return self.run(
            f, z, sigmas, generator=generator, randn_like=randn_like, clip=clip, **self.with_defaults(kwargs)
        )

    def with_defaults(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """``options`` with this sampler's option defaults filled in."""
        return {**self.options, **options}

    def default_sigmas(
        self,
        n: int | None = None,
        *,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        recipe: Sequence[float] = (),
    ) -> list[float]:
        """The σ list for ``n`` of :attr:`count` (``default_count`` when None) on [σ_min, σ_max].

        ``recipe``: a trained model's own multistep σ list (a config's ``model.sample_sigmas``);
        the consistency samplers take it when it has n points.
        """
        if self.count is None:
            if n is not None:
                raise ValueError(f"{self.name} samples a fixed recipe: give its σ list and options, not a count n={n}")
        else:
            n = check.integer_at_least(self.count, self.default_count if n is None else n, 1)
        sigma_min, sigma_max = check.sigma_range(sigma_min, sigma_max)
        return self.schedule(n, sigma_min, sigma_max, tuple(float(s) for s in recipe))

    def nfe(self, sigmas: Sequence[float] | torch.Tensor, **options) -> int:
        """Network evaluations of one sample along ``sigmas`` with these options."""
        ts = sigmas.tolist() if torch.is_tensor(sigmas) else [float(s) for s in sigmas]
        return self.cost(ts, self.with_defaults(options))


SAMPLERS: dict[str, Sampler] = {}


def register_sampler(sampler: Sampler) -> Sampler:
    """Add (or replace) a sampler; returns it."""
    if not isinstance(sampler, Sampler):
        raise TypeError(f"register_sampler takes a cm_core.Sampler, got {type(sampler).__name__}")
    SAMPLERS[sampler.name] = sampler
    return sampler


def get_sampler(name: str | Sampler) -> Sampler:
    """The registered sampler ``name`` (a :class:`Sampler` is returned as is)."""
    if isinstance(name, Sampler):
        return name
    try:
        return SAMPLERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown sampler {name!r}; known: {', '.join(SAMPLERS)}") from None


def inversion_sigmas(
    jumps: int | None = None, *, sigma_max: float = 80.0, sigma_start: float = BCM_INVERT_SIGMAS[0]
) -> list[float]:
    """BCM inversion's increasing σ list: None → BCM's recipe σ_start → 15 → σ_max (2 jumps);
    k → k + 1 Karras points (ρ = 7) from σ_start up to σ_max."""
    if jumps is None:
        return [float(sigma_start), *BCM_INVERT_SIGMAS[1:-1], float(sigma_max)]
    jumps = check.integer_at_least("jumps", jumps, 1)
    return karras_sigmas(jumps + 1, sigma_start, sigma_max).tolist()


# ---- schedules (n, σ_min, σ_max, recipe) → descending σ list ---------------------------------------


def _consistency_sigmas(n, sigma_min, sigma_max, recipe):
    # The recipe when it has n points (ECT: 80, 0.821); else the first n points of the descending
    # Karras grid with n + 1 points σ_max → σ_min: σ_min itself is left out, since f(x, σ_min) = x.
    if len(recipe) == n:
        return list(recipe)
    return karras_sigmas(n + 1, sigma_min, sigma_max).flip(0).tolist()[:-1]


def _onestep_sigmas(n, sigma_min, sigma_max, recipe):
    if n != 1:
        raise ValueError(f"onestep takes one σ (nfe=1), got nfe={n}; use multistep")
    return _consistency_sigmas(n, sigma_min, sigma_max, recipe)


def _chain_sigmas(n, sigma_min, sigma_max, recipe):
    # A BCM chain of n jumps: the Karras grid σ_max → σ_min, both ends included.
    return karras_sigmas(n + 1, sigma_min, sigma_max).flip(0).tolist()


def _zigzag_sigmas(n, sigma_min, sigma_max, recipe):
    return [sigma_max, sigma_min]


def _mixture_sigmas(n, sigma_min, sigma_max, recipe):
    return [sigma_max, *BCM_MIXTURE_SIGMAS[1:-1], sigma_min]


def _heun_sigmas(n, sigma_min, sigma_max, recipe):
    return edm_sampling_sigmas(n, sigma_min, sigma_max).tolist()


# ---- costs (σ list, options) → NFE ---------------------------------------------------------------


def _one_per_sigma(ts, options):
    return len(ts)


def _jumps_and_rounds(ts, options):
    return len(ts) - 1 + 2 * len(options.get("zigzag", ()))


def _heun_cost(ts, options):
    # Heun steps cost 2 evaluations; the last step to σ = 0 is Euler (EDM Algorithm 1, line 6).
    return sum(1 if t_next == 0 else 2 for t_next in ts[1:])


# ---- runs in the registry's calling convention ----------------------------------------------------


def _onestep(f, z, sigmas, *, generator=None, randn_like=None, clip=None, **cond):
    ts = check.sigma_list("sigmas", sigmas, decreasing=True)
    if len(ts) != 1:
        raise ValueError(f"onestep takes one σ (σ_max), got {ts}; use multistep for more")
    return onestep_sample(f, z, ts[0], clip=clip, **cond)


def _ancestral(f, z, sigmas, *, generator=None, randn_like=None, clip=None, **cond):
    return bcm_ancestral_sample(f, z, sigmas, clip=clip, **cond)  # deterministic: no noise drawn


def _zigzag_rounds(f, z, sigmas, *, zigzag, generator=None, randn_like=None, clip=None, **cond):
    return bcm_mixture_sample(f, z, sigmas, zigzag, generator=generator, randn_like=randn_like, clip=clip, **cond)


def _heun(f, z, sigmas, *, generator=None, randn_like=None, clip=None, **kw):
    ts = check.sigma_list("sigmas", sigmas, decreasing=True)
    x = solve(f, ts[0] * z, ts, method="heun", generator=generator, randn_like=randn_like, **kw)
    return _clip(x, clip)


for _sampler in (
    Sampler(
        "onestep",
        _onestep,
        _onestep_sigmas,
        _one_per_sigma,
        doc="x = f(σ_max·z, σ_max) (CM Algorithm 1, one step)",
    ),
    Sampler(
        "multistep",
        multistep_sample,
        _consistency_sigmas,
        _one_per_sigma,
        options={"sigma_min": 0.002, "renoise": "cm"},
        default_count=2,
        doc="x ← f(x + s(σ)·ε, σ), s = √(σ² − σ_min²) (cm) or σ (ect) (CM Algorithm 1)",
    ),
    Sampler(
        "bcm-ancestral",
        _ancestral,
        _chain_sigmas,
        _jumps_and_rounds,
        jumps=True,
        doc="BCM ancestral: jumps f(x, σ_i, σ_{i+1}) down a Karras chain σ_max → σ_min",
    ),
    Sampler(
        "bcm-zigzag",
        _zigzag_rounds,
        _zigzag_sigmas,
        _jumps_and_rounds,
        options={"zigzag": BCM_ZIGZAG},
        count=None,
        default_count=None,
        jumps=True,
        doc="BCM zigzag: one jump σ_max → σ_min, then rounds (σ_noise, σ_up): add noise, jump up, jump down",
    ),
    Sampler(
        "bcm-mixture",
        _zigzag_rounds,
        _mixture_sigmas,
        _jumps_and_rounds,
        options={"zigzag": BCM_MIXTURE_ZIGZAG},
        count=None,
        default_count=None,
        jumps=True,
        doc="BCM mixture: the chain σ_max → 3.0 → σ_min, then zigzag rounds",
    ),
    Sampler(
        "heun",
        _heun,
        _heun_sigmas,
        _heun_cost,
        options={"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": math.inf, "s_noise": 1.0},
        count="heun-steps",
        default_count=EDM_HEUN_STEPS,
        doc="EDM's Heun sampler for a denoiser D(x, σ), σ list ending at 0 (EDM Algorithms 1-2)",
    ),
):
    register_sampler(_sampler)
del _sampler

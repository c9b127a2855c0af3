"""What an objective declares, and the registry of objectives (built in, registered, or plugins).

An objective is a callable ``objective(f, x0, *, step, generator=None, **cond) -> (loss [B], stats)``
whose class says what it trains and needs, so that the trainer, ``cm_train.load_trained``, the CLI
and the demo never name an objective:

  function       the kind of function it trains, a key of :data:`cm_core.FUNCTIONS` ("consistency"
                 f(x, σ), "bcm" f(x, σ, σ_end), "diffusion" D(x, σ), or one a plugin registers);
                 the samplers that fit come with the kind
  needs_teacher  it distils a pretrained denoiser D(x, σ), passed as ``teacher=``
  takes_target   it can use an EMA target network θ⁻ (the trainer sets ``.target``); without one
                 θ⁻ is the stop-gradient of the online network. ``target_rule``: its paper's EMA
                 rule ("ct": CM's μ(N(k)), "constant": a fixed μ), for ``objective.target = "paper"``
  run_defaults   constructor arguments that depend on the run (its length, a doubling period)
  extra_modules  trainable modules beside the network (e.g. a learned loss weighting), which the
                 trainer optimizes, all-reduces and checkpoints with the network

Another installed package adds objectives through the entry-point group ``cm.objectives``
(``name = "package.module:Class"``) or at run time with :func:`register_objective`.
"""

from __future__ import annotations

import importlib.metadata
import warnings
from typing import Any, ClassVar

from torch import nn

from ..functions import FUNCTIONS

__all__ = [
    "Objective",
    "OBJECTIVES",
    "ENTRY_POINT_GROUP",
    "register_objective",
    "get_objective",
    "objective_names",
    "create_objective",
]

ENTRY_POINT_GROUP = "cm.objectives"
TARGET_RULES = ("ct", "ct-openai", "constant")


class Objective:
    """Base class of every objective; the class attributes are its declarations (see the module)."""

    function: ClassVar[str] = "consistency"
    needs_teacher: ClassVar[bool] = False
    takes_target: ClassVar[bool] = False
    target_rule: ClassVar[str | None] = None

    target = None  # θ⁻, set by the trainer when it keeps an EMA target network

    @classmethod
    def run_defaults(cls, *, total_steps: int) -> dict[str, Any]:
        """Constructor arguments derived from the run when the config does not give them."""
        return {}

    def extra_modules(self) -> dict[str, nn.Module]:
        """Trainable modules beside the network, by name (none by default)."""
        return {}

    def __call__(self, f, x0, *, step: int, generator=None, **cond):
        raise NotImplementedError


OBJECTIVES: dict[str, type[Objective]] = {}
_broken_plugins: dict[str, str] = {}  # entry-point name → why it did not load


def register_objective(name: str, cls: type[Objective]) -> type[Objective]:
    """Make ``cls`` trainable as ``objective.name = name``; returns ``cls`` (usable as a decorator
    helper). It must subclass :class:`cm_core.Objective` and declare a known function kind."""
    if not isinstance(name, str) or not name.strip() or name != name.strip():
        raise ValueError(f"objective name must be a non-empty string without surrounding spaces, got {name!r}")
    if not (isinstance(cls, type) and issubclass(cls, Objective)):
        raise TypeError(f"objective {name!r} must be a subclass of cm_core.Objective, got {cls!r}")
    if cls.function not in FUNCTIONS:
        raise ValueError(
            f"objective {name!r} trains function {cls.function!r}, which is not registered "
            f"(known: {', '.join(sorted(FUNCTIONS))}; add one with cm_core.register_function)"
        )
    if cls.target_rule is not None and cls.target_rule not in TARGET_RULES:
        raise ValueError(f"objective {name!r}: target_rule must be one of {TARGET_RULES} or None")
    OBJECTIVES[name] = cls
    return cls


def _discover() -> None:
    """Register the objectives that installed packages declare in the ``cm.objectives`` group."""
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in OBJECTIVES or ep.name in _broken_plugins:
            continue
        try:
            register_objective(ep.name, ep.load())
        except Exception as err:  # noqa: BLE001  a broken plugin must not break the built-ins
            _broken_plugins[ep.name] = f"{ep.value}: {type(err).__name__}: {err}"
            warnings.warn(f"cm.objectives plugin {ep.name!r} did not load ({_broken_plugins[ep.name]})", stacklevel=3)


def objective_names() -> list[str]:
    """Every objective name: built in, registered and installed plugins."""
    _discover()
    return sorted(OBJECTIVES)


def get_objective(name: str) -> type[Objective]:
    """The objective class registered as ``name`` (plugins are looked up when needed)."""
    if name not in OBJECTIVES:
        _discover()
    if name in OBJECTIVES:
        return OBJECTIVES[name]
    if name in _broken_plugins:
        raise ValueError(f"objective {name!r} is an installed plugin that failed to load: {_broken_plugins[name]}")
    raise ValueError(f"unknown objective {name!r}: objective must be one of {', '.join(objective_names())}")


def create_objective(name: str, **kwargs) -> Objective:
    """Build an objective by its name (see :func:`objective_names`)."""
    return get_objective(name)(**kwargs)

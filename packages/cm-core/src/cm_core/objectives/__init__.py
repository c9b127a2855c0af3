"""Training objectives: ``objective(f, x0, *, step, generator=None, **cond) -> (loss [B], stats)``.

``stats`` holds floats for logging and ``per_sample_sigma`` ([B], the noise level each sample's
loss was computed at).

Consistency objectives take a consistency function f(x, σ) (BCM: f(x, σ, σ_end)); diffusion
objectives take a denoiser D(x, σ). The trainer owns the optimizer, EMA and step counter.
"""

from .bcm import BidirectionalConsistency
from .consistency import (
    ConsistencyDistillation,
    ConsistencyTraining,
    DirectConsistencyDistillation,
    EasyConsistencyTuning,
    ImprovedConsistencyTraining,
)
from .diffusion import ConsistentDiffusion, EDMDenoising

OBJECTIVES = {
    "ct": ConsistencyTraining,
    "ict": ImprovedConsistencyTraining,
    "cd": ConsistencyDistillation,
    "ect": EasyConsistencyTuning,
    "bcm": BidirectionalConsistency,
    "direct-cm": DirectConsistencyDistillation,
    "edm": EDMDenoising,
    "cdm": ConsistentDiffusion,
}


def create_objective(name: str, **kwargs):
    """Build an objective by its short name (see ``OBJECTIVES``)."""
    try:
        cls = OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"objective must be one of {sorted(OBJECTIVES)}, got {name!r}") from None
    return cls(**kwargs)


__all__ = [
    "OBJECTIVES",
    "create_objective",
    "ConsistencyTraining",
    "ImprovedConsistencyTraining",
    "ConsistencyDistillation",
    "EasyConsistencyTuning",
    "BidirectionalConsistency",
    "DirectConsistencyDistillation",
    "EDMDenoising",
    "ConsistentDiffusion",
]

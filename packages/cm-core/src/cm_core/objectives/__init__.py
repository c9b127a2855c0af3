"""Training objectives: ``objective(f, x0, *, step, generator=None, **cond) -> (loss [B], stats)``.

``stats`` holds floats for logging and ``per_sample_sigma`` ([B], the noise level each sample's
loss was computed at). Each objective subclasses :class:`Objective` and declares what it trains
(a consistency function f(x, σ), BCM's f(x, σ, σ_end), a denoiser D(x, σ), …) and needs (see
``base.py``); the trainer owns the optimizer, EMA and step counter.

Adding an algorithm is one file: a subclass of :class:`Objective`, registered here, with
:func:`register_objective`, or from another package through the ``cm.objectives`` entry points.
"""

from .base import (
    ENTRY_POINT_GROUP,
    OBJECTIVES,
    Objective,
    create_objective,
    get_objective,
    objective_names,
    register_objective,
)
from .bcm import BidirectionalConsistency
from .consistency import (
    ConsistencyDistillation,
    ConsistencyTraining,
    DirectConsistencyDistillation,
    EasyConsistencyTuning,
    ImprovedConsistencyTraining,
)
from .diffusion import ConsistentDiffusion, EDMDenoising
from .latent import LatentConsistencyDistillation, LatentDirectConsistency
from .meanflow import MeanFlow
from .scm import SCD, SCT

for _name, _cls in {
    "ct": ConsistencyTraining,
    "ict": ImprovedConsistencyTraining,
    "cd": ConsistencyDistillation,
    "ect": EasyConsistencyTuning,
    "bcm": BidirectionalConsistency,
    "direct-cm": DirectConsistencyDistillation,
    "edm": EDMDenoising,
    "cdm": ConsistentDiffusion,
    "lcm": LatentConsistencyDistillation,
    "latent-direct-cm": LatentDirectConsistency,
    "sct": SCT,
    "scd": SCD,
    "meanflow": MeanFlow,
}.items():
    register_objective(_name, _cls)

__all__ = [
    "ENTRY_POINT_GROUP",
    "OBJECTIVES",
    "Objective",
    "create_objective",
    "get_objective",
    "objective_names",
    "register_objective",
    "ConsistencyTraining",
    "ImprovedConsistencyTraining",
    "ConsistencyDistillation",
    "EasyConsistencyTuning",
    "BidirectionalConsistency",
    "DirectConsistencyDistillation",
    "EDMDenoising",
    "ConsistentDiffusion",
    "LatentConsistencyDistillation",
    "LatentDirectConsistency",
    "SCT",
    "SCD",
    "MeanFlow",
]

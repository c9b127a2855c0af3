"""cm_core: the mathematics of consistency models, for tensors of any shape [B, ...].

Schedules and curricula, the consistency parameterization, losses, training objectives,
PF-ODE solvers, samplers (one-step, multistep, BCM; one registry, ``SAMPLERS``), zero-shot editing,
EMA rules, and an exact Gaussian-mixture oracle.
"""

from .editing import (
    Colorization,
    Identity,
    LinearOperator,
    SuperResolution,
    colorize,
    edit,
    inpaint,
    interpolate,
    slerp,
    stroke_edit,
    super_resolve,
)
from .ema import (
    ICT_TARGET_EMA,
    ct_target_ema,
    ema_update_,
    gamma_to_sigma_rel,
    power_function_ema,
    sigma_rel_to_gamma,
)
from .functions import FUNCTIONS, FunctionKind, function_kind, register_function
from .gaussian import GaussianMixture
from .losses import LPIPS, default_huber_c, l1, l2_norm, pseudo_huber, pseudo_huber_reference, squared_l2, weighting
from .objectives import (
    OBJECTIVES,
    Objective,
    create_objective,
    get_objective,
    objective_names,
    register_objective,
)
from .parameterization import (
    BidirectionalConsistencyFunction,
    ConsistencyFunction,
    EDMDenoiser,
    bcm_scalings,
    c_noise,
    consistency_scalings,
    edm_scalings,
)
from .samplers import (
    bcm_ancestral_sample,
    bcm_invert,
    bcm_mixture_sample,
    bcm_reconstruct,
    bcm_zigzag_sample,
    multistep_sample,
    onestep_sample,
)
from .sampling import (
    ECT_TWO_STEP_SIGMAS,
    EDM_HEUN_STEPS,
    SAMPLERS,
    Sampler,
    get_sampler,
    inversion_sigmas,
    register_sampler,
)
from .scheduler import ConsistencyScheduler, SchedulerOutput
from .schedules import ct_num_scales, ect_r, ect_stage, edm_sampling_sigmas, ict_num_scales, karras_sigmas
from .solvers import euler_step, heun_step, solve
from .timesteps import lognormal_index_probs, lognormal_indices, lognormal_sigmas, uniform_indices

__all__ = [
    "BidirectionalConsistencyFunction",
    "Colorization",
    "ConsistencyFunction",
    "ConsistencyScheduler",
    "ECT_TWO_STEP_SIGMAS",
    "EDMDenoiser",
    "EDM_HEUN_STEPS",
    "FUNCTIONS",
    "FunctionKind",
    "GaussianMixture",
    "ICT_TARGET_EMA",
    "Identity",
    "LPIPS",
    "LinearOperator",
    "OBJECTIVES",
    "Objective",
    "SAMPLERS",
    "Sampler",
    "SchedulerOutput",
    "SuperResolution",
    "bcm_ancestral_sample",
    "bcm_invert",
    "bcm_mixture_sample",
    "bcm_reconstruct",
    "bcm_scalings",
    "bcm_zigzag_sample",
    "c_noise",
    "colorize",
    "consistency_scalings",
    "create_objective",
    "ct_num_scales",
    "ct_target_ema",
    "default_huber_c",
    "ect_r",
    "ect_stage",
    "edit",
    "edm_sampling_sigmas",
    "edm_scalings",
    "ema_update_",
    "euler_step",
    "function_kind",
    "gamma_to_sigma_rel",
    "get_objective",
    "get_sampler",
    "heun_step",
    "ict_num_scales",
    "inpaint",
    "interpolate",
    "inversion_sigmas",
    "karras_sigmas",
    "l1",
    "l2_norm",
    "lognormal_index_probs",
    "lognormal_indices",
    "lognormal_sigmas",
    "multistep_sample",
    "objective_names",
    "onestep_sample",
    "power_function_ema",
    "pseudo_huber",
    "pseudo_huber_reference",
    "register_function",
    "register_objective",
    "register_sampler",
    "sigma_rel_to_gamma",
    "slerp",
    "solve",
    "squared_l2",
    "stroke_edit",
    "super_resolve",
    "uniform_indices",
    "weighting",
]

__version__ = "0.1.0"

"""Consistency training and distillation objectives: CT, iCT, CD, ECT and Direct CM.

Each objective is called as ``objective(f, x0, *, step, generator=None, **cond)`` where ``f`` is
a consistency function f(x, σ, **cond) (e.g. :class:`cm_core.ConsistencyFunction`), and returns
``(per_sample_loss [B], stats)``. Targets are computed under ``torch.no_grad()``: the target
branch never carries gradient (the papers' stop-gradient θ⁻).

Symbols, as ECT writes them: the student sees the larger noise level ``t``, the target the smaller
``r`` (CT/iCT/CD: t = σ_{i+1}, r = σ_i on the grid). ``distance=`` names the per-sample distance in
every objective (``huber_c`` is pseudo-Huber's c).
"""

from __future__ import annotations

import torch

from .. import _validate as check
from ..losses import weighting
from ..schedules import ct_num_scales, ect_r, ect_stage, ict_num_scales, karras_sigmas, rho_grid
from ..timesteps import ICT_P_MEAN, ICT_P_STD, lognormal_indices, lognormal_sigmas, uniform_indices
from ._common import SharedRandomness, bcast, check_batch, distance_fn, draw_device, randn_like, stats_of
from .base import Objective

__all__ = [
    "ConsistencyTraining",
    "ImprovedConsistencyTraining",
    "ConsistencyDistillation",
    "EasyConsistencyTuning",
    "DirectConsistencyDistillation",
]


class _DiscreteConsistency(Objective):
    """Shared body of CT / iCT / CD: a pair of neighbouring σ on a Karras grid of N(k) points."""

    takes_target = True

    def __init__(self, sigma_min, sigma_max, rho, sigma_data, distance, huber_c, weight, target):
        self.sigma_min, self.sigma_max = check.sigma_range(sigma_min, sigma_max)
        self.rho = check.positive("rho", rho)
        self.sigma_data = check.positive("sigma_data", sigma_data)
        self.distance = distance_fn(distance, huber_c)
        self.weight = weight
        self.target = target  # θ⁻: an EMA copy kept by the trainer, or None = stop-grad of f

    def num_scales(self, step: int) -> int:
        raise NotImplementedError

    def draw_indices(self, sigmas, batch, x0, generator):
        return uniform_indices(len(sigmas), batch, generator=generator, device=draw_device(generator, x0)).cpu()

    def grid(self, step: int) -> torch.Tensor:
        return karras_sigmas(self.num_scales(step), self.sigma_min, self.sigma_max, self.rho)

    def target_point(self, f, x0, z, t, r, **cond):
        """x at the target's noise level r (CT: the same noise; CD: a teacher ODE step from t)."""
        return x0 + bcast(r, x0) * z

    def __call__(self, f, x0, *, step: int, generator=None, **cond):
        x0 = check_batch(x0)
        sigmas = self.grid(step)
        i = self.draw_indices(sigmas, x0.shape[0], x0, generator)
        t, r = sigmas[i + 1].to(x0.device), sigmas[i].to(x0.device)  # the student's σ_{i+1}, the target's σ_i
        z = randn_like(x0, generator)
        x_t = x0 + bcast(t, x0) * z
        rng = SharedRandomness(x0.device)
        with torch.no_grad():
            x_r = self.target_point(f, x0, z, t, r, **cond)
            with rng.replay():
                target = (f if self.target is None else self.target)(x_r, r, **cond)
        with rng.replay():
            pred = f(x_t, t, **cond)
        lam = weighting(self.weight, t, r, self.sigma_data).to(pred.dtype)
        loss = lam * self.distance(pred, target.detach())  # λ(t, r)·d(f_θ(x_t, t), f_θ⁻(x_r, r))
        return loss, stats_of(num_scales=len(sigmas), sigma=t, weight=lam)


class ConsistencyTraining(_DiscreteConsistency):
    """CT (Song et al. 2023, Algorithm 3): d(f_θ(x + σ_{i+1}z, σ_{i+1}), f_θ⁻(x + σ_i z, σ_i)).

    N(k) follows the CT curriculum (s0, s1 over ``total_steps``); i ~ U{0, …, N−2}; θ⁻ is the EMA
    target network the trainer keeps with :func:`cm_core.ct_target_ema` (set ``.target``).
    """

    target_rule = "ct"

    @classmethod
    def run_defaults(cls, *, total_steps: int) -> dict:
        return {"total_steps": total_steps}

    def __init__(
        self,
        total_steps: int,
        s0: int = 2,
        s1: int = 150,
        *,
        sigma_min=0.002,
        sigma_max=80.0,
        rho=7.0,
        sigma_data=0.5,
        distance="l2",
        huber_c=None,
        weight="uniform",
        target=None,
    ):
        super().__init__(sigma_min, sigma_max, rho, sigma_data, distance, huber_c, weight, target)
        self.total_steps = check.integer_at_least("total_steps", total_steps, 1)
        self.s0, self.s1 = s0, s1

    def num_scales(self, step):
        return ct_num_scales(step, self.total_steps, self.s0, self.s1)


class ImprovedConsistencyTraining(_DiscreteConsistency):
    """iCT (Song & Dhariwal 2023): doubling curriculum, lognormal σ pairs, pseudo-Huber, λ = 1/Δσ.

    The target is the stop-gradient of the online network (no EMA), run with the same dropout mask.
    """

    @classmethod
    def run_defaults(cls, *, total_steps: int) -> dict:
        return {"total_steps": total_steps}

    def __init__(
        self,
        total_steps: int,
        s0: int = 10,
        s1: int = 1280,
        *,
        p_mean=ICT_P_MEAN,
        p_std=ICT_P_STD,
        sigma_min=0.002,
        sigma_max=80.0,
        rho=7.0,
        sigma_data=0.5,
        distance="pseudo-huber",
        huber_c=None,
        weight="ict",
        target=None,
    ):
        super().__init__(sigma_min, sigma_max, rho, sigma_data, distance, huber_c, weight, target)
        self.total_steps = check.integer_at_least("total_steps", total_steps, 1)
        self.s0, self.s1 = s0, s1
        self.p_mean, self.p_std = float(p_mean), check.positive("p_std", p_std)

    def num_scales(self, step):
        return ict_num_scales(step, self.total_steps, self.s0, self.s1)

    def draw_indices(self, sigmas, batch, x0, generator):
        device = draw_device(generator, x0)
        return lognormal_indices(sigmas, batch, self.p_mean, self.p_std, generator=generator, device=device).cpu()


class ConsistencyDistillation(_DiscreteConsistency):
    """CD (Song et al. 2023, Algorithm 2): the target point comes from one ODE step of a teacher.

    x̂_{σ_i} = Φ(x_{σ_{i+1}}, σ_{i+1} → σ_i; D_teacher) with Φ = Euler or Heun; fixed N (18 CIFAR, 40
    ImageNet/LSUN); θ⁻ is an EMA with μ = 0.95 kept by the trainer.
    """

    needs_teacher = True
    target_rule = "constant"

    def __init__(
        self,
        teacher,
        num_scales: int = 18,
        *,
        solver: str = "heun",
        sigma_min=0.002,
        sigma_max=80.0,
        rho=7.0,
        sigma_data=0.5,
        distance="l2",
        huber_c=None,
        weight="uniform",
        target=None,
    ):
        from ..solvers import SOLVERS

        super().__init__(sigma_min, sigma_max, rho, sigma_data, distance, huber_c, weight, target)
        self.teacher = teacher
        self.fixed_scales = check.integer_at_least("num_scales", num_scales, 2)
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {sorted(SOLVERS)}, got {solver!r}")
        self.solver = SOLVERS[solver]

    def num_scales(self, step):
        return self.fixed_scales

    def target_point(self, f, x0, z, t, r, **cond):
        x_t = x0 + bcast(t, x0) * z
        return self.solver(self.teacher, x_t, t, r, **cond)  # x̂_r = Φ(x_t, t → r; D_teacher)


class EasyConsistencyTuning(Objective):
    """ECT (Geng et al. 2024): continuous-time consistency with a shrinking Δt = t − r(t).

    t ~ lognormal(P_mean, P_std); r = ect_r(t, stage) with stage = step // double_steps; the same ε
    for both points; loss = λ·d(f(y + tε, t), sg f(y + rε, r)), target = y where r = 0.
    ``distance="l2-norm"`` is ECT's CIFAR-10 distance ‖·‖₂, ``"pseudo-huber"`` with ``huber_c``
    its alternative; ``weight="ict"`` is 1/(t − r) (CIFAR-10), ``"snr+1"`` 1/t² + 1/σ_d² (ImageNet).
    """

    takes_target = True

    @classmethod
    def run_defaults(cls, *, total_steps: int) -> dict:
        return {"double_steps": max(1, total_steps // 8)}  # 8 stages of Δt halving over the run

    def __init__(
        self,
        double_steps: int,
        *,
        q: float = 2.0,
        k: float = 8.0,
        b: float = 1.0,
        p_mean=ICT_P_MEAN,
        p_std=ICT_P_STD,
        distance="l2-norm",
        huber_c: float | None = None,
        weight: str = "ict",
        sigma_data=0.5,
        target=None,
    ):
        self.double_steps = check.integer_at_least("double_steps", double_steps, 1)
        self.q, self.k, self.b = float(q), float(k), float(b)
        self.p_mean, self.p_std = float(p_mean), check.positive("p_std", p_std)
        self.distance = distance_fn(distance, huber_c)
        self.weight = weight
        self.sigma_data = check.positive("sigma_data", sigma_data)
        self.target = target

    def __call__(self, f, x0, *, step: int, generator=None, **cond):
        x0 = check_batch(x0)
        device = draw_device(generator, x0)
        t = lognormal_sigmas(
            x0.shape[0], self.p_mean, self.p_std, generator=generator, device=device, dtype=torch.float64
        ).to(x0.device)
        stage = ect_stage(step, self.double_steps)
        r = ect_r(t, stage, self.q, self.k, self.b)
        eps = randn_like(x0, generator)
        rng = SharedRandomness(x0.device)
        live = r > 0
        with torch.no_grad():
            target = x0
            if live.any():
                # The whole batch runs, so every row gets the student's dropout mask; rows with
                # r = 0 are evaluated at t (any valid σ) and then replaced by y itself.
                r_eval = torch.where(live, r, t)
                net = f if self.target is None else self.target
                with rng.replay():
                    out = net(x0 + bcast(r_eval, x0) * eps, r_eval, **cond)
                target = torch.where(bcast(live, x0).bool(), out, x0)
        with rng.replay():
            pred = f(x0 + bcast(t, x0) * eps, t, **cond)
        dist = self.distance(pred, target)
        lam = weighting(self.weight, t, r, self.sigma_data).to(dist.dtype)
        return lam * dist, stats_of(sigma=t, r=r, stage=stage, weight=lam)


class DirectConsistencyDistillation(Objective):
    """Direct CM: regress f(x_t, t) on the teacher's full ODE solution from the same x_t.

    x_t = x0 + t·z with t drawn from the Karras grid (uniform index); the target solves the
    teacher's PF-ODE from t down to σ_min in ``ode_steps`` Heun steps on a Karras sub-grid
    (no grad). The student learns the ODE's end point directly instead of self-consistency.
    """

    needs_teacher = True

    def __init__(
        self,
        teacher,
        num_scales: int = 40,
        ode_steps: int = 18,
        *,
        sigma_min=0.002,
        sigma_max=80.0,
        rho=7.0,
        distance="l2",
        huber_c=None,
        p_mean=None,
        p_std=2.0,
    ):
        self.teacher = teacher
        self.num_scales = check.integer_at_least("num_scales", num_scales, 2)
        self.ode_steps = check.integer_at_least("ode_steps", ode_steps, 1)
        self.sigma_min, self.sigma_max = check.sigma_range(sigma_min, sigma_max)
        self.rho = check.positive("rho", rho)
        self.distance = distance_fn(distance, huber_c)
        self.p_mean, self.p_std = p_mean, p_std

    @torch.no_grad()
    def teacher_solution(self, x_t: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        """Heun from t (per sample) to σ_min on a ρ-spaced grid of ``ode_steps`` steps."""
        from ..solvers import heun_step

        grid = rho_grid(t, self.sigma_min, self.ode_steps + 1, self.rho)  # [B, steps+1], t → σ_min
        x = x_t
        for j in range(self.ode_steps):
            x = heun_step(self.teacher, x, grid[:, j], grid[:, j + 1], **cond)
        return x

    def __call__(self, f, x0, *, step: int, generator=None, **cond):
        x0 = check_batch(x0)
        sigmas = karras_sigmas(self.num_scales, self.sigma_min, self.sigma_max, self.rho)
        device = draw_device(generator, x0)
        if self.p_mean is None:
            i = uniform_indices(self.num_scales, x0.shape[0], generator=generator, device=device).cpu()
        else:
            i = lognormal_indices(
                sigmas, x0.shape[0], self.p_mean, self.p_std, generator=generator, device=device
            ).cpu()
        t = sigmas[i + 1].to(x0.device)
        x_t = x0 + bcast(t, x0) * randn_like(x0, generator)
        target = self.teacher_solution(x_t, t, **cond)
        pred = f(x_t, t, **cond)
        return self.distance(pred, target), stats_of(sigma=t)

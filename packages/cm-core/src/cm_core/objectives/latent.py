"""Latent text-to-image distillation of a pretrained diffusion model into a few-step consistency
model, trained as LoRA on the model itself: LCM's consistency distillation ("lcm") and Direct CM
("latent-direct-cm"; Vouitsis et al. 2024, "Inconsistencies in Consistency Models").

Both train the :class:`~cm_core.discrete.LatentConsistencyFunction` f of a text-to-image network
(cm_nets' diffusers adapter): the teacher is the same network with its LoRA adapters disabled, the
conditioning is the batch's captions (and SDXL's micro-conditioning), and everything runs on the
teacher's discrete timesteps (:mod:`cm_core.discrete`). Per step and sample:

  n ~ U{0 … N−1}, t = grid[n] (``lcm_grid``: k−1 … T−1, k = T // N), t' = max(t − skip·k, 0)
  x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε
  lcm:               target = f⁻(Φ(x_t; t → t'), t')   one guided solver step, then the stop-gradient
                                                     student (LCM-LoRA keeps no EMA target)
  latent-direct-cm:  target = Φ(x_t; t → 0)          the guided teacher's whole ODE solution, in
                                                     solver steps of skip·k timesteps
  loss = d(f(x_t, t), target), d = mean over elements of √((p − q)² + c²) − c ("huber", LCM's c =
  0.001) or of (p − q)² ("l2")

Guidance uses diffusers' scale w (w = 1 + LCM's ω): ``guidance_scale`` fixed, or ``guidance_range``
= [w_min, w_max] drawn uniformly per sample (LCM-LoRA: ω ∈ [3, 15], i.e. w ∈ [4, 16]).
"""

from __future__ import annotations

import torch

from .. import _validate as check
from ..discrete import SOLVERS, lcm_grid, solver_step
from ._common import check_batch, draw_device, stats_of
from .base import Objective

__all__ = ["LatentConsistencyDistillation", "LatentDirectConsistency", "latent_distance"]


def latent_distance(name: str, huber_c: float = 0.001):
    """Per-sample distance [B] as LCM's scripts compute the loss: an element mean."""
    if name == "huber":
        c = check.positive("huber_c", huber_c)
        return lambda p, q: (((p.float() - q.float()) ** 2 + c * c).sqrt() - c).flatten(1).mean(1)
    if name == "l2":
        return lambda p, q: ((p.float() - q.float()) ** 2).flatten(1).mean(1)
    raise ValueError(f"distance must be 'huber' or 'l2', got {name!r}")


class _LatentDistillation(Objective):
    function = "latent-consistency"

    def __init__(
        self,
        num_original_inference_steps: int = 50,
        skip: int = 1,
        solver: str = "ddim",
        guidance_scale: float = 8.0,
        guidance_range: tuple[float, float] | list[float] | None = None,
        distance: str = "huber",
        huber_c: float = 0.001,
    ):
        self.num_steps = check.integer_at_least("num_original_inference_steps", num_original_inference_steps, 1)
        self.skip = check.integer_at_least("skip", skip, 1)
        if self.skip >= self.num_steps:
            raise ValueError(f"skip ({skip}) must be smaller than num_original_inference_steps ({num_original_inference_steps})")
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
        self.solver = solver
        if guidance_range is not None:
            lo, hi = (float(v) for v in guidance_range)
            if not 0 <= lo <= hi:
                raise ValueError(f"guidance_range must be [w_min, w_max] with 0 <= w_min <= w_max, got {list(guidance_range)}")
            self.guidance_range = (lo, hi)
        else:
            self.guidance_range = None
        self.guidance_scale = float(guidance_scale)
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0 (diffusers' scale; 1 = no guidance), got {guidance_scale}")
        self.distance_name = distance
        self.distance = latent_distance(distance, huber_c)

    def _draw(self, f, x0, generator):
        """(x0 latents, t, t', x_t, guidance w) for a batch: the draws both objectives share."""
        x0 = f.latents(check_batch(x0))
        vp = f.vp
        T = vp.num_train_timesteps
        grid = lcm_grid(T, self.num_steps)
        k = T // self.num_steps
        b = x0.shape[0]
        device = draw_device(generator, x0)
        n = torch.randint(0, self.num_steps, (b,), generator=generator, device=device).cpu()
        t = grid[n]
        t_prev = (t - self.skip * k).clamp(min=0)
        noise = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype).to(x0.device)
        x_t = vp.add_noise(x0, noise, t)
        if self.guidance_range is not None:
            lo, hi = self.guidance_range
            u = torch.rand(b, generator=generator, device=device, dtype=torch.float64).cpu()
            w = lo + (hi - lo) * u
        else:
            w = self.guidance_scale
        return x0, t, t_prev, x_t, w, k

    def _teacher(self, f, embeddings, w):
        wt = w.to(torch.float32) if torch.is_tensor(w) else w

        def x0_eps(x, t):
            return f.teacher_x0_eps(x, t, embeddings, wt)

        return x0_eps


class LatentConsistencyDistillation(_LatentDistillation):
    """LCM: one guided teacher solver step from t to t', then the stop-gradient student at t'."""

    def __call__(self, f, x0, *, step: int, generator=None, **cond):
        embeddings = f.encode(**cond)
        x0, t, t_prev, x_t, w, _ = self._draw(f, x0, generator)
        with torch.no_grad():
            x_prev = solver_step(f.vp, self._teacher(f, embeddings, w), x_t, t, t_prev, self.solver)
            target = f(x_prev, t_prev, **embeddings)
        pred = f(x_t, t, **embeddings)
        loss = self.distance(pred, target)
        return loss, stats_of(timestep=t.float(), guidance=w if torch.is_tensor(w) else float(w))


class LatentDirectConsistency(_LatentDistillation):
    """Direct CM: the student regresses on the guided teacher's whole ODE solution from x_t to t = 0."""

    @torch.no_grad()
    def teacher_solution(self, f, x_t, t, embeddings, w, k) -> torch.Tensor:
        """Solver steps of skip·k timesteps from each sample's t down to 0 (samples that arrive
        early keep their value while the others go on)."""
        x, cur = x_t, t.clone()
        teacher = self._teacher(f, embeddings, w)
        while bool((cur > 0).any()):
            prev = (cur - self.skip * k).clamp(min=0)
            stepped = solver_step(f.vp, teacher, x, cur, prev, self.solver)
            active = (cur > 0).to(x.device).reshape(-1, *([1] * (x.ndim - 1)))
            x = torch.where(active, stepped, x)
            cur = torch.where(cur > 0, prev, cur)
        return x

    def __call__(self, f, x0, *, step: int, generator=None, **cond):
        embeddings = f.encode(**cond)
        x0, t, _, x_t, w, k = self._draw(f, x0, generator)
        target = self.teacher_solution(f, x_t, t, embeddings, w, k)
        pred = f(x_t, t, **embeddings)
        loss = self.distance(pred, target)
        return loss, stats_of(timestep=t.float(), guidance=w if torch.is_tensor(w) else float(w))

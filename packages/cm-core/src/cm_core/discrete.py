"""Discrete-time variance-preserving diffusion (DDPM/Stable Diffusion), exactly as diffusers' schedulers
compute it, and the pieces latent consistency distillation (LCM, Direct CM) builds on.

A pretrained text-to-image model is trained on timesteps t = 0 … T−1 with
x_t = √ᾱ_t · x0 + √(1 − ᾱ_t) · ε (ᾱ = ``alphas_cumprod``). In EDM's terms x_t/√ᾱ_t = x0 + σ_t·ε with
σ_t = √((1 − ᾱ_t)/ᾱ_t), so the model is an EDM denoiser D(x, σ_t) on a discrete set of noise levels
(:meth:`DiscreteVP.denoiser`), and DDIM (η = 0) is exactly Euler's method on the PF-ODE in that
σ-space (:func:`solver_step` computes both, as two independent formulas; the tests compare them).

LCM's conventions (Luo et al. 2023; diffusers' ``train_lcm_distill_*`` scripts and ``LCMScheduler``):
the teacher's solver runs on a skipping grid ``lcm_grid(T, N)`` = k−1, 2k−1, …, T−1 (k = T // N,
N = ``num_original_inference_steps``, e.g. 50), the target network sits k·skip timesteps lower, and the
student's boundary scalings are :func:`lcm_scalings` (c_skip(0) = 1, c_out(0) = 0: f(x, 0) = x).
Guidance uses diffusers' scale: x̂ = x̂_u + w·(x̂_c − x̂_u), w = 1 + the original formulation's ω.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = [
    "PREDICTION_TYPES",
    "DiscreteVP",
    "lcm_grid",
    "lcm_inference_timesteps",
    "lcm_scalings",
    "guided",
    "solver_step",
    "SOLVERS",
    "lcm_sample",
    "LatentConsistencyFunction",
]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SOLVERS = ("ddim", "euler", "heun")


def _col(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-sample [B] (or scalar) coefficient shaped to broadcast over ``like`` [B, ...]."""
    v = v.to(device=like.device)
    return v.reshape(v.shape + (1,) * (like.ndim - v.ndim)) if v.ndim else v


class DiscreteVP:
    """ᾱ_t on the timesteps 0 … T−1 of a diffusers scheduler, and the prediction-type conversions.

    ``alphas_cumprod``: the scheduler's own tensor (e.g. ``DDIMScheduler(...).alphas_cumprod``); kept in
    float64, coefficients are cast to the data's dtype where they are applied. A timestep < 0 (one step
    past the end of a solver's grid) has ᾱ = ``final_alpha_cumprod`` (diffusers: 1 with
    ``set_alpha_to_one``, else ᾱ_0; LCM's solver uses ᾱ_0).
    """

    def __init__(self, alphas_cumprod, prediction_type: str = "epsilon", final_alpha_cumprod: float | None = None):
        a = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float64).flatten()
        if a.numel() < 2 or not bool(((a > 0) & (a < 1)).all()) or not bool((a[1:] <= a[:-1]).all()):
            raise ValueError("alphas_cumprod must be a decreasing sequence in (0, 1) with at least 2 entries")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}")
        self.alphas_cumprod = a
        self.prediction_type = prediction_type
        self.final_alpha_cumprod = float(a[0]) if final_alpha_cumprod is None else float(final_alpha_cumprod)

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.numel()

    def alpha(self, t) -> torch.Tensor:
        """ᾱ_t (float64) for integer timesteps ``t`` (a tensor or int); t < 0 gives the final ᾱ."""
        t = torch.as_tensor(t, dtype=torch.long).cpu()
        if bool((t >= self.num_train_timesteps).any()):
            raise ValueError(f"timesteps must be < {self.num_train_timesteps}, got {int(t.max())}")
        out = self.alphas_cumprod[t.clamp(min=0)]
        return torch.where(t < 0, torch.full_like(out, self.final_alpha_cumprod), out)

    def sigma(self, t) -> torch.Tensor:
        """EDM's σ_t = √((1 − ᾱ_t)/ᾱ_t) (float64)."""
        a = self.alpha(t)
        return ((1 - a) / a).sqrt()

    def coefficients(self, t, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(√ᾱ_t, √(1−ᾱ_t)) shaped and typed for ``like``."""
        a = self.alpha(t)
        return _col(a.sqrt(), like).to(like.dtype), _col((1 - a).sqrt(), like).to(like.dtype)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε (diffusers' ``add_noise``)."""
        s, n = self.coefficients(t, x0)
        return s * x0 + n * noise

    def x0_eps(self, output: torch.Tensor, x_t: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        """(x̂0, ε̂) from the network's raw ``output`` at (x_t, t), per its prediction type."""
        s, n = self.coefficients(t, x_t)
        if self.prediction_type == "epsilon":
            eps = output
            x0 = (x_t - n * eps) / s
        elif self.prediction_type == "v_prediction":
            x0 = s * x_t - n * output
            eps = s * output + n * x_t
        else:
            x0 = output
            eps = (x_t - s * x0) / n
        return x0, eps

    def denoiser(self, x0_fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """EDM's D(x, σ) of a model given as ``x0_fn(x_t, t, **cond) -> x̂0``, on its own noise levels:
        D(x, σ_t) = x̂0(√ᾱ_t·x, t). σ must be one of the σ_t (to relative 1e-6): per sample, or scalar."""
        sig_all = self.sigma(torch.arange(self.num_train_timesteps))

        def D(x: torch.Tensor, sigma, **cond) -> torch.Tensor:
            sig = torch.as_tensor(sigma, dtype=torch.float64).cpu().reshape(-1)
            t = (sig_all[None, :] - sig[:, None]).abs().argmin(dim=1)
            if not torch.allclose(sig_all[t], sig, rtol=1e-6, atol=0):
                raise ValueError("σ is not one of this model's discrete noise levels σ_t (DiscreteVP.sigma)")
            t = t.expand(x.shape[0]) if t.numel() == 1 else t
            s, _ = self.coefficients(t, x)
            return x0_fn(s * x, t, **cond)

        return D


def lcm_grid(num_train_timesteps: int = 1000, num_steps: int = 50) -> torch.Tensor:
    """LCM's skipping-step grid, ascending: k−1, 2k−1, …, N·k−1 with k = T // N (N = 50: 19 … 999)."""
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_original_inference_steps must be in 1 … {num_train_timesteps}, got {num_steps}")
    k = num_train_timesteps // num_steps
    return torch.arange(1, num_steps + 1, dtype=torch.long) * k - 1


def lcm_inference_timesteps(num_inference_steps: int, num_train_timesteps: int = 1000, original_steps: int = 50):
    """The timesteps ``LCMScheduler.set_timesteps`` picks (descending): evenly spaced indices into the
    reversed LCM grid (2 steps of 50: 999, 499)."""
    grid = lcm_grid(num_train_timesteps, original_steps).flip(0)
    if not 1 <= num_inference_steps <= original_steps:
        raise ValueError(f"steps must be in 1 … {original_steps} (num_original_inference_steps), got {num_inference_steps}")
    idx = [math.floor(i * original_steps / num_inference_steps) for i in range(num_inference_steps)]
    return grid[torch.tensor(idx)]


def lcm_scalings(t, sigma_data: float = 0.5, timestep_scaling: float = 10.0) -> tuple[torch.Tensor, torch.Tensor]:
    """LCM's boundary scalings for discrete timesteps (float64): with s = t·timestep_scaling,
    c_skip = σ_d²/(s² + σ_d²), c_out = s/√(s² + σ_d²)."""
    s = torch.as_tensor(t, dtype=torch.float64).cpu() * timestep_scaling
    return sigma_data**2 / (s**2 + sigma_data**2), s / (s**2 + sigma_data**2).sqrt()


def guided(cond: torch.Tensor, uncond: torch.Tensor, scale) -> torch.Tensor:
    """Classifier-free guidance, diffusers' scale: uncond + w·(cond − uncond) (w = 1: no guidance)."""
    if isinstance(scale, torch.Tensor) and scale.ndim:
        scale = _col(scale, cond).to(cond.dtype)
    return uncond + scale * (cond - uncond)


def solver_step(
    vp: DiscreteVP,
    x0_eps_fn: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    x_t: torch.Tensor,
    t: torch.Tensor,
    t_prev: torch.Tensor,
    solver: str = "ddim",
) -> torch.Tensor:
    """One step of the teacher's PF-ODE from timestep ``t`` to ``t_prev`` (< t; per sample [B]).

    ``x0_eps_fn(x, t) -> (x̂0, ε̂)`` is the (guided) teacher. "ddim": x_prev = √ᾱ'·x̂0 + √(1−ᾱ')·ε̂
    (diffusers' DDIMScheduler.step with η = 0, LCM's DDIMSolver). "euler": the same step written in
    σ-space, x̃ = x/√ᾱ, x̃' = x̃ + (σ' − σ)(x̃ − x̂0)/σ, x' = √ᾱ'·x̃' (equal to DDIM up to rounding).
    "heun": Euler plus EDM's second-order correction with the teacher at t_prev (2 evaluations).
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
    t = torch.as_tensor(t, dtype=torch.long).reshape(-1).expand(x_t.shape[0])
    t_prev = torch.as_tensor(t_prev, dtype=torch.long).reshape(-1).expand(x_t.shape[0])
    x0, eps = x0_eps_fn(x_t, t)
    if solver == "ddim":
        s_p, n_p = vp.coefficients(t_prev, x_t)
        return s_p * x0 + n_p * eps
    s, _ = vp.coefficients(t, x_t)
    s_p, _ = vp.coefficients(t_prev, x_t)
    sig, sig_p = _col(vp.sigma(t), x_t).to(x_t.dtype), _col(vp.sigma(t_prev), x_t).to(x_t.dtype)
    x = x_t / s
    d = (x - x0) / sig
    x_next = x + (sig_p - sig) * d
    if solver == "heun":
        x0_p, _ = x0_eps_fn(s_p * x_next, t_prev)
        d_p = (x_next - x0_p) / sig_p
        x_next = x + (sig_p - sig) * 0.5 * (d + d_p)
    return s_p * x_next


def lcm_sample(
    f: Callable[..., torch.Tensor],
    vp: DiscreteVP,
    z: torch.Tensor,
    timesteps,
    *,
    generator: torch.Generator | None = None,
    randn_like: Callable[[torch.Tensor], torch.Tensor] | None = None,
    **cond,
) -> torch.Tensor:
    """LCM's multistep sampling (``LCMScheduler``): x = f(z, t_0); for each next t: x = f(√ᾱ_t·x +
    √(1−ᾱ_t)·ε, t), ε = ``torch.randn(x.shape, generator=generator)`` drawn once per step, in order
    (as diffusers' ``randn_tensor`` on the CPU), or ``randn_like(x)``.

    ``f(x_t, t, **cond)`` is a consistency function on discrete timesteps; ``timesteps`` descending.
    """
    ts = [int(t) for t in torch.as_tensor(timesteps).reshape(-1)]
    if not ts or any(b >= a for a, b in zip(ts, ts[1:])):
        raise ValueError(f"timesteps must be a non-empty descending sequence, got {ts}")
    batch = z.shape[0]
    x = f(z, torch.full((batch,), ts[0], dtype=torch.long), **cond)
    for t in ts[1:]:
        if randn_like is not None:
            noise = randn_like(x)
        else:
            noise = torch.randn(x.shape, generator=generator, device="cpu" if generator is None else generator.device,
                                dtype=x.dtype).to(x.device)  # fmt: skip
        x_t = vp.add_noise(x, noise, torch.full((batch,), t, dtype=torch.long))
        x = f(x_t, torch.full((batch,), t, dtype=torch.long), **cond)
    return x


class LatentConsistencyFunction(torch.nn.Module):
    """LCM's consistency function on a text-to-image network's discrete timesteps:
    f(x_t, t) = c_skip(t)·x_t + c_out(t)·x̂0(net(x_t, t, **embeddings)) (:func:`lcm_scalings`).

    ``net`` follows cm_nets' text-to-image interface (e.g. ``cm_nets.diffusers_net.DiffusersNet``): ``net(x_t, t,
    **embeddings)`` returns the raw UNet output; ``net.alphas_cumprod``, ``net.prediction_type`` and
    ``net.final_alpha_cumprod`` define its :class:`DiscreteVP` (``self.vp``; or ``net.schedule``);
    ``net.encode_text(prompts, **micro) -> embeddings`` and ``net.null_text(embeddings)`` (the
    unconditional branch of guidance) run without gradients; ``net.adapters_disabled()`` is a
    context in which it is the base (teacher) model; ``net.latent_channels`` and
    ``net.encode_images(x)`` (pixels in [−1, 1] → scaled latents) serve pixel batches.
    """

    def __init__(self, net: torch.nn.Module, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
        super().__init__()
        self.net = net
        self.sigma_data, self.timestep_scaling = float(sigma_data), float(timestep_scaling)
        schedule = getattr(net, "schedule", None)
        self.vp = schedule if isinstance(schedule, DiscreteVP) else DiscreteVP(
            net.alphas_cumprod, net.prediction_type, getattr(net, "final_alpha_cumprod", None)
        )

    def forward(self, x_t: torch.Tensor, t, **embeddings) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.long).reshape(-1).expand(x_t.shape[0])
        x0, _ = self.vp.x0_eps(self.net(x_t, t.to(x_t.device), **embeddings), x_t, t)
        c_skip, c_out = lcm_scalings(t, self.sigma_data, self.timestep_scaling)
        return _col(c_skip, x_t).to(x_t.dtype) * x_t + _col(c_out, x_t).to(x_t.dtype) * x0

    def encode(self, prompts=None, **micro) -> dict:
        """The embeddings of a batch's conditioning (the dataset's ``prompts`` and SDXL micro-conditioning)."""
        if prompts is None:
            raise ValueError("a text-to-image model needs prompts: train on a caption dataset (data.source = captions/latents)")
        with torch.no_grad():
            return self.net.encode_text(list(prompts), **micro)

    def latents(self, x0: torch.Tensor) -> torch.Tensor:
        """``x0`` as latents: pixel batches (3 channels, where the model's latents have another count) are
        encoded by the model's VAE."""
        if x0.ndim == 4 and x0.shape[1] == 3 and self.net.latent_channels != 3:
            with torch.no_grad():
                return self.net.encode_images(x0)
        return x0

    @torch.no_grad()
    def teacher_x0_eps(self, x_t: torch.Tensor, t: torch.Tensor, embeddings: dict, guidance=1.0):
        """The base model's (x̂0, ε̂) at (x_t, t), guided with diffusers' scale ``guidance`` (per sample or
        scalar); conditional and unconditional branches in one batch ([uncond, cond], as the pipelines)."""
        t = torch.as_tensor(t, dtype=torch.long).reshape(-1).expand(x_t.shape[0]).to(x_t.device)
        plain = not torch.is_tensor(guidance) and float(guidance) == 1.0
        with self.net.adapters_disabled():
            if plain:
                return self.vp.x0_eps(self.net(x_t, t, **embeddings), x_t, t)
            null = self.net.null_text(embeddings)
            both = {k: _cat(null[k], embeddings[k]) for k in embeddings}
            out_u, out_c = self.net(torch.cat([x_t, x_t]), torch.cat([t, t]), **both).chunk(2)
        x0_u, eps_u = self.vp.x0_eps(out_u, x_t, t)
        x0_c, eps_c = self.vp.x0_eps(out_c, x_t, t)
        return guided(x0_c, x0_u, guidance), guided(eps_c, eps_u, guidance)


def _cat(a, b):
    if isinstance(a, dict):
        return {k: _cat(a[k], b[k]) for k in a}
    return torch.cat([a, b])

"""A diffusers-style scheduler over :func:`cm_core.multistep_sample`.

For users who know ``CMStochasticIterativeScheduler``: ``set_timesteps`` picks the σ list,
``scale_model_input`` applies c_in, ``step`` applies the boundary scalings and re-noises.
The loop below gives exactly ``multistep_sample(ConsistencyFunction(net, c_noise=…), z, sigmas)``:

    sched = ConsistencyScheduler(); sched.set_timesteps(timesteps=[0, 22, 39])
    x = z * sched.init_noise_sigma
    for t in sched.timesteps:
        out = net(sched.scale_model_input(x, t), t.expand(len(x)))
        x = sched.step(out, t, x, generator=gen).prev_sample
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import _validate as check
from ._random import NoiseSource, noise_source
from .parameterization import C_NOISE_CONVENTIONS, consistency_scalings
from .samplers import RENOISE_RULES
from .schedules import karras_sigmas

__all__ = ["ConsistencyScheduler", "SchedulerOutput"]


@dataclass
class SchedulerOutput:
    prev_sample: torch.Tensor
    denoised: torch.Tensor


class ConsistencyScheduler:
    """Multistep consistency sampling in the ``set_timesteps`` / ``scale_model_input`` / ``step`` idiom.

    ``num_train_timesteps`` is the size of the Karras grid that ``timesteps=[…]`` indexes from
    σ_max down (openai's ``--ts 0,22,39 --steps 40``). ``timesteps`` yielded by the scheduler are
    the network's noise inputs c_noise(σ) (250·ln σ for ``"openai"``, as diffusers' ``sigma_to_t``).
    """

    def __init__(
        self,
        num_train_timesteps: int = 40,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = 7.0,
        sigma_data: float = 0.5,
        c_noise: str = "openai",
        renoise: str = "cm",
    ):
        self.num_train_timesteps = check.integer_at_least("num_train_timesteps", num_train_timesteps, 2)
        self.sigma_min, self.sigma_max = check.sigma_range(sigma_min, sigma_max)
        self.rho = check.positive("rho", rho)
        self.sigma_data = check.positive("sigma_data", sigma_data)
        if c_noise not in C_NOISE_CONVENTIONS:
            raise ValueError(f"c_noise must be one of {sorted(C_NOISE_CONVENTIONS)}, got {c_noise!r}")
        if renoise not in RENOISE_RULES:
            raise ValueError(f"renoise must be one of {sorted(RENOISE_RULES)}, got {renoise!r}")
        self.c_noise, self.renoise = c_noise, renoise
        self.sigmas: torch.Tensor | None = None
        self.timesteps: torch.Tensor | None = None
        self._index = 0

    @property
    def init_noise_sigma(self) -> float:
        return float(self.sigmas[0]) if self.sigmas is not None else self.sigma_max

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        *,
        timesteps: Sequence[int] | None = None,
        sigmas: Sequence[float] | None = None,
    ) -> None:
        """Choose the σ list: evenly spaced grid indices, explicit indices, or explicit σ values."""
        given = sum(v is not None for v in (num_inference_steps, timesteps, sigmas))
        if given != 1:
            raise ValueError("give exactly one of num_inference_steps, timesteps or sigmas")
        grid = karras_sigmas(self.num_train_timesteps, self.sigma_min, self.sigma_max, self.rho).flip(0)
        if num_inference_steps is not None:
            n = check.integer_at_least("num_inference_steps", num_inference_steps, 1)
            if n > self.num_train_timesteps:
                raise ValueError(f"num_inference_steps={n} exceeds num_train_timesteps={self.num_train_timesteps}")
            # diffusers' spacing: indices 0, r, 2r, … with r = N // n (σ_max first).
            ratio = self.num_train_timesteps // n
            timesteps = [i * ratio for i in range(n)]
        if timesteps is not None:
            idx = [int(i) for i in timesteps]
            if any(i < 0 or i >= self.num_train_timesteps for i in idx) or any(b <= a for a, b in zip(idx, idx[1:])):
                raise ValueError(
                    f"timesteps must be strictly increasing indices in [0, {self.num_train_timesteps - 1}], got {idx}"
                )
            values = grid[idx]
        else:
            values = torch.tensor(check.sigma_list("sigmas", sigmas, decreasing=True), dtype=torch.float64)
            if values[-1] < self.sigma_min:
                raise ValueError(f"sigmas must end at or above sigma_min={self.sigma_min}, got {values[-1].item()}")
        self.sigmas = values
        self.timesteps = C_NOISE_CONVENTIONS[self.c_noise](values)
        self._index = 0

    def _sigma(self, timestep) -> float:
        if self.sigmas is None:
            raise RuntimeError("call set_timesteps(...) before sampling")
        value = torch.as_tensor(timestep, dtype=torch.float64).flatten()[0]
        gap = (self.timesteps - value).abs()
        # Tolerant match: pipelines often pass the timestep back as float32 (≈1e-5 relative error).
        index = int(gap.argmin())
        if gap[index] > 1e-4 * (1 + value.abs()):
            raise ValueError(f"timestep {float(timestep)} is not one of this scheduler's timesteps")
        self._index = index
        return float(self.sigmas[self._index])

    def scale_model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """c_in(σ)·x: the network's input at this step."""
        sigma = self._sigma(timestep)
        return sample / math.sqrt(sigma**2 + self.sigma_data**2)

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        randn_like: NoiseSource | None = None,
        clip: float | None = None,
    ) -> SchedulerOutput:
        """x̂ = c_skip·x + c_out·F; then x̂ + s(σ_next)·ε unless this was the last step
        (ε from ``randn_like(x̂)`` when given, else from ``generator``)."""
        sigma = self._sigma(timestep)
        c_skip, c_out, _ = (float(v) for v in consistency_scalings(sigma, self.sigma_data, self.sigma_min))
        denoised = c_skip * sample + c_out * model_output.to(sample.dtype)
        if clip is not None:
            denoised = denoised.clamp(-clip, clip)
        eps = noise_source(generator, randn_like)
        if self._index + 1 >= len(self.sigmas):
            return SchedulerOutput(denoised, denoised)
        sigma_next = float(self.sigmas[self._index + 1])
        noise = RENOISE_RULES[self.renoise](sigma_next, self.sigma_min) * eps(denoised)
        return SchedulerOutput(denoised + noise, denoised)

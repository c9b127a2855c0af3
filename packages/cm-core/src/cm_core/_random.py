"""Noise draws shared by samplers, solvers and editing."""

from __future__ import annotations

from collections.abc import Callable

import torch

NoiseSource = Callable[[torch.Tensor], torch.Tensor]


def draw_device(generator: torch.Generator | None, x: torch.Tensor) -> torch.device:
    """Where random numbers for ``x`` are drawn: on the generator's device, so a seed gives the
    same draws wherever x lives (a CPU generator for CUDA data); without a generator, on x's."""
    return generator.device if generator is not None else x.device


def randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """``torch.randn(x.shape, generator=generator)`` on :func:`draw_device`, then moved to x.

    Drawn in the default dtype (float32), so a seed gives the same noise
    whatever x's dtype or device; float64 callers get float32-precision noise values.
    """
    return torch.randn(x.shape, generator=generator, device=draw_device(generator, x)).to(x)


def noise_source(generator: torch.Generator | None, randn_like_fn: NoiseSource | None) -> NoiseSource:
    """The ε source of a sampler: ``randn_like`` as given (EDM's sampler argument: x → noise shaped
    like x, e.g. cm_eval's one generator per image), else :func:`randn_like` with ``generator``."""
    if randn_like_fn is None:
        return lambda x: randn_like(x, generator)
    if generator is not None:
        raise ValueError(
            "pass generator= or randn_like=, not both: randn_like replaces the generator's draws "
            "(seed your noise source instead)"
        )
    if not callable(randn_like_fn):
        raise TypeError(f"randn_like must be a callable x -> noise shaped like x, got {type(randn_like_fn).__name__}")

    def checked(x: torch.Tensor) -> torch.Tensor:
        eps = randn_like_fn(x)
        if not torch.is_tensor(eps) or eps.shape != x.shape:
            got = tuple(eps.shape) if torch.is_tensor(eps) else type(eps).__name__
            raise ValueError(f"randn_like(x) must return a tensor of x's shape {tuple(x.shape)}, got {got}")
        return eps

    return checked

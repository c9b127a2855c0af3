"""Noise draws shared by samplers, solvers and editing."""

from __future__ import annotations

import torch


def draw_device(generator: torch.Generator | None, x: torch.Tensor) -> torch.device:
    """Where random numbers for ``x`` are drawn: on the generator's device, so a seed gives the
    same draws wherever x lives (a CPU generator for CUDA data); without a generator, on x's."""
    return generator.device if generator is not None else x.device


def randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """``torch.randn(x.shape, generator=generator)`` on :func:`draw_device`, then moved to x.

    Drawn in the default dtype (float32) as DESIGN.md specifies, so a seed gives the same noise
    whatever x's dtype or device; float64 callers get float32-precision noise values.
    """
    return torch.randn(x.shape, generator=generator, device=draw_device(generator, x)).to(x)

"""Noise draws shared by samplers, solvers and editing."""

from __future__ import annotations

import torch


def randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """``torch.randn(x.shape, generator=generator)`` on the generator's device, then moved to x.

    Drawn in the default dtype (float32) as DESIGN.md specifies, so a seed gives the same noise
    whatever x's dtype or device; float64 callers get float32-precision noise values.
    """
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device).to(x)

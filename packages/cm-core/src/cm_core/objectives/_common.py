"""Pieces shared by the objectives: noise draws, dropout-mask sharing, stop-gradient calls."""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn

from .._random import draw_device, randn_like
from .._validate import bcast
from ..losses import LPIPS, distance, pseudo_huber

__all__ = [
    "SharedRandomness",
    "bcast",
    "check_batch",
    "distance_fn",
    "draw_device",
    "frozen_call",
    "rand",
    "randn_like",
    "stats_of",
]


def check_batch(x0) -> torch.Tensor:
    if not torch.is_tensor(x0) or not x0.is_floating_point() or x0.ndim < 1 or x0.shape[0] == 0:
        raise ValueError("x0 must be a floating-point tensor of shape [B, ...] with B >= 1")
    return x0


def rand(n: int, x: torch.Tensor, generator) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=draw_device(generator, x), dtype=torch.float64).to(x.device)


def distance_fn(name, huber_c: float | None = None, *, divide_by_sqrt_d: bool = False):
    """The per-sample distance d(pred, target) → [B] every objective takes as ``distance=``: a name
    of ``cm_core.losses.DISTANCES`` ("l2", "l2-norm", "l1", "pseudo-huber"), a callable or an LPIPS
    module. ``huber_c``: pseudo-Huber's c (None: iCT's 0.00054·√d); ``divide_by_sqrt_d``: BCM's
    extra 1/√d of the pseudo-Huber distance."""
    if isinstance(name, LPIPS) or callable(name) and not isinstance(name, str):
        return name
    if name == "pseudo-huber":
        return functools.partial(pseudo_huber, c=huber_c, divide_by_sqrt_d=divide_by_sqrt_d)
    if huber_c is not None or divide_by_sqrt_d:
        raise ValueError(f"huber_c and divide_by_sqrt_d apply to distance='pseudo-huber', not {name!r}")
    return distance(name)


class SharedRandomness:
    """Replays the global RNG state so two forward passes see the same dropout masks.

    iCT/ECT/BCM evaluate student and target with the same dropout mask (the iCT paper's
    fix for the dropout-induced bias). ``with rng.replay():`` restores the state captured at
    construction before running its block.
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None

    @contextlib.contextmanager
    def replay(self):
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)
        yield


def frozen_call(net, *args, **kwargs):
    """net(*args) with gradients flowing to the inputs but not to net's own parameters.

    This is BCM's "target network with requires_grad=False" applied to the online weights,
    which iCT/BCM use as the target (EMA rate 0).
    """
    if isinstance(net, nn.Module):
        params = {k: v.detach() for k, v in net.named_parameters()}
        buffers = dict(net.named_buffers())
        return torch.func.functional_call(net, {**params, **buffers}, args, kwargs)
    return net(*args, **kwargs)


def stats_of(**values) -> dict:
    """Means as floats for logging, plus ``per_sample_sigma`` [B] (detached) when σ is per sample,
    so a trainer can break the loss down by noise level."""
    out = {}
    for key, v in values.items():
        out[key] = float(v.float().mean()) if torch.is_tensor(v) else float(v)
    sigma = values.get("sigma")
    if torch.is_tensor(sigma) and sigma.ndim == 1:
        out["per_sample_sigma"] = sigma.detach()
    return out

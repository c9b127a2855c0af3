"""Inversion evaluation for bidirectional consistency models (BCM, Li & He 2024, Sec. 4.3).

For each test image: add a little noise (σ_0 = 0.07), jump up the PF-ODE to noise with k
jumps (0.07 → 15 → 80 by default: k = 2), reconstruct with m jumps down (80 → 0.002: m = 1),
and report the per-pixel MSE (images in [-1, 1], as BCM reports it) and the PSNR.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from cm_core import bcm_invert, bcm_reconstruct
from cm_core.samplers import BCM_INVERT_SIGMAS
from cm_nets.files import image_grid, save_png

from .features import to_uint8
from .sampling import PerImageNoise, check_labels

__all__ = ["inversion_error", "psnr"]


def psnr(mse: float, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB, 10·log10(range²/MSE); range 2 for images in [-1, 1]."""
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


@torch.no_grad()
def inversion_error(
    f,
    images: torch.Tensor,
    *,
    invert_sigmas: Sequence[float] = BCM_INVERT_SIGMAS,
    reconstruct_sigmas: Sequence[float] = (80.0, 0.002),
    add_noise: bool = True,
    seeds: Sequence[int] | None = None,
    batch_size: int = 64,
    side_by_side: str | Path | None = None,
    max_pairs: int = 32,
    labels=None,
    progress=None,
    **cond,
) -> dict:
    """Invert then reconstruct ``images`` [N, ...] (float, in [-1, 1]) with a BCM f(x, σ, σ_end).

    The σ_0 noise of image i comes from generator ``seeds[i]`` (default i), so results do not
    depend on ``batch_size``. ``side_by_side``: a PNG path for originals (top row) over
    reconstructions (bottom row) of the first ``max_pairs`` images (4-D images only). ``labels``:
    one class per image for a conditional model. ``progress`` wraps the batch iterator (e.g. tqdm).
    Returns ``{"mse", "psnr", "mse_per_image", "num_images", ...}``.
    """
    if not torch.is_tensor(images) or not images.is_floating_point() or images.ndim < 2 or len(images) == 0:
        raise ValueError("images must be a non-empty float tensor [N, ...] in [-1, 1]")
    seeds = list(range(len(images))) if seeds is None else [int(s) for s in seeds]
    if len(seeds) != len(images):
        raise ValueError(f"need one seed per image: {len(seeds)} seeds for {len(images)} images")
    labels = check_labels(labels, len(images), per="image")
    recon = []
    starts = range(0, len(images), batch_size)
    for i in progress(starts) if progress else starts:
        x = images[i : i + batch_size]
        if labels is not None:
            cond = dict(cond, class_labels=labels[i : i + batch_size])
        noise = PerImageNoise(seeds[i : i + batch_size])
        latent = bcm_invert(f, x, invert_sigmas, add_noise=add_noise, randn_like=noise.like, **cond)
        recon.append(bcm_reconstruct(f, latent, reconstruct_sigmas, **cond))
    recon = torch.cat(recon)
    err = (recon.double() - images.double()).square().flatten(1).mean(1)
    mse = err.mean().item()
    result = {
        "mse": mse,
        "psnr": psnr(mse),
        "mse_per_image": err.tolist(),
        "num_images": len(images),
        "invert_sigmas": [float(s) for s in invert_sigmas],
        "reconstruct_sigmas": [float(s) for s in reconstruct_sigmas],
        "add_noise": add_noise,
        "nfe": len(invert_sigmas) - 1 + len(reconstruct_sigmas) - 1,
    }
    if side_by_side is not None:
        if images.ndim != 4:
            raise ValueError("side_by_side needs image tensors [N, C, H, W]")
        n = min(max_pairs, len(images))
        both = np.concatenate([to_uint8(images[:n]), to_uint8(recon[:n])])
        save_png(side_by_side, image_grid(both, ncol=n))
        result["side_by_side"] = str(side_by_side)
    return result

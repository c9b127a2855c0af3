"""Sample grids as PNG files: the trainer's quantization on top of ``cm_nets.files``' grid and
PNG writer (zlib only, no imaging dependency; written atomically)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from cm_nets.files import image_grid, save_png

__all__ = ["make_grid", "write_png"]


def make_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 1) -> np.ndarray:
    """[N, C, H, W] in [−1, 1] → one uint8 [H', W', C] mosaic (C = 1 or 3), ``nrow`` images per row
    (default ⌈√N⌉, torchvision's meaning of the name)."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"make_grid needs images [N, 1|3, H, W], got {tuple(images.shape)}")
    nrow = nrow or math.ceil(math.sqrt(images.shape[0]))
    # Round to nearest (not cm_eval.to_uint8's EDM truncation): the trainer's grids always did.
    img = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return image_grid(img.permute(0, 2, 3, 1).numpy(), ncol=nrow, pad=pad)


def write_png(path: str | os.PathLike, array: np.ndarray, scale: int = 1) -> Path:
    """Write uint8 [H, W] / [H, W, 1|3] as PNG (nearest-neighbour upscaled by ``scale``), atomically."""
    arr = np.asarray(array, dtype=np.uint8)
    if scale > 1:
        arr = arr.repeat(scale, 0).repeat(scale, 1)
    return save_png(path, arr)

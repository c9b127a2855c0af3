"""Image folders as arrays (the writers and the PNG codec are ``cm_nets.files``')."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from cm_nets.files import load_png

__all__ = ["load_image_folder"]


def load_image_folder(folder, limit: int | None = None) -> np.ndarray:
    """All ``*.png`` files of ``folder`` (sorted by name; e.g. ``generate``'s ``{seed:06d}.png``) as
    one uint8 [N, H, W, C] array, the layout ``compute_stats`` and ADM's evaluator take."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    files = sorted(folder.glob("*.png"))[:limit]
    if not files:
        raise ValueError(f"no .png files in {folder}")
    images = [load_png(p) for p in files]
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise ValueError(f"images in {folder} differ in size or channels: {sorted(shapes)}")
    return np.stack(images)

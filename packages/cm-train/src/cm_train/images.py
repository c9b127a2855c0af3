"""Sample grids as PNG files, written with zlib alone (no imaging dependency), atomically."""

from __future__ import annotations

import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

__all__ = ["make_grid", "write_png"]


def make_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 1) -> np.ndarray:
    """[N, C, H, W] in [−1, 1] → one uint8 [H', W', C] mosaic (C = 1 or 3)."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"make_grid needs images [N, 1|3, H, W], got {tuple(images.shape)}")
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    img = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    grid = np.full((ncol * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = img[
            i
        ].transpose(1, 2, 0)
    return grid


def write_png(path: str | os.PathLike, array: np.ndarray, scale: int = 1) -> Path:
    """Write uint8 [H, W] / [H, W, 1|3] as PNG (nearest-neighbour upscaled by ``scale``)."""
    arr = np.asarray(array, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[..., None]
    if scale > 1:
        arr = arr.repeat(scale, 0).repeat(scale, 1)
    h, w, c = arr.shape
    color = {1: 0, 3: 2}[c]
    raw = b"".join(b"\x00" + arr[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(png)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path

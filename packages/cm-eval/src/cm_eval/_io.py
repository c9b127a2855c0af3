"""Atomic file writing and a dependency-free PNG codec (8-bit grayscale / RGB / RGBA).

Every file is written to a temporary file in the destination's directory, flushed and fsynced,
then moved over the destination with ``os.replace``: a reader sees the old file or the new one,
never half of one, and an interrupted run leaves no truncated PNG that a resume would skip.
"""

from __future__ import annotations

import io
import json
import os
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np

__all__ = [
    "atomic_write_bytes",
    "atomic_save_npz",
    "atomic_write_json",
    "encode_png",
    "decode_png",
    "save_png",
    "load_png",
    "load_image_folder",
]


def atomic_write_bytes(path, data: bytes) -> Path:
    """Write ``data`` to a temporary file in the same folder, fsync, then os.replace it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are meant to be shared like any written file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_save_npz(path, **arrays) -> Path:
    """np.savez (uncompressed, readable by EDM / pytorch-fid / ADM tools) written atomically."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return atomic_write_bytes(path, buf.getvalue())


def atomic_write_json(path, obj) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


_COLOR_TYPES = {1: 0, 3: 2, 4: 6}  # channels -> PNG colour type (gray, RGB, RGBA)


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a uint8 array [H, W] or [H, W, C] with C in {1, 3, 4}. Deterministic output."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise TypeError(f"encode_png needs a uint8 array, got {image.dtype}; convert with cm_eval.to_uint8 first")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in _COLOR_TYPES or 0 in image.shape:
        raise ValueError(f"encode_png needs [H, W] or [H, W, C] with C in 1, 3, 4, got shape {image.shape}")
    h, w, c = image.shape
    raw = np.concatenate([np.zeros((h, 1), np.uint8), image.reshape(h, w * c)], axis=1)  # filter 0 per row
    header = struct.pack(">IIBBBBB", w, h, 8, _COLOR_TYPES[c], 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(raw.tobytes(), 6))
        + _chunk(b"IEND", b"")
    )


def _paeth(a, b, c):
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))


def decode_png(data: bytes) -> np.ndarray:
    """Decode an 8-bit, non-interlaced grayscale/RGB/RGBA PNG to uint8 [H, W, C]."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG file (bad signature)")
    pos, idat, header = 8, [], None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        tag, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if tag == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif tag == b"IDAT":
            idat.append(body)
        elif tag == b"IEND":
            break
    if header is None:
        raise ValueError("PNG has no IHDR chunk")
    w, h, depth, ctype, _, _, interlace = header
    channels = {v: k for k, v in _COLOR_TYPES.items()}.get(ctype)
    if depth != 8 or channels is None or interlace:
        raise ValueError(f"only 8-bit non-interlaced gray/RGB/RGBA PNGs are supported (depth {depth}, type {ctype})")
    rows = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8).reshape(h, 1 + w * channels)
    out = np.zeros((h, w * channels), np.int32)
    prev = np.zeros(w * channels, np.int32)
    for y in range(h):
        ftype, line = rows[y, 0], rows[y, 1:].astype(np.int32)
        if ftype == 0:
            cur = line
        elif ftype == 2:
            cur = (line + prev) & 0xFF
        else:  # Sub, Average, Paeth depend on the left neighbour: pixel by pixel
            cur = np.zeros_like(line)
            for i in range(len(line)):
                a = cur[i - channels] if i >= channels else 0
                c = prev[i - channels] if i >= channels else 0
                pred = {1: a, 3: (a + prev[i]) // 2, 4: int(_paeth(np.int32(a), prev[i], np.int32(c)))}.get(int(ftype))
                if pred is None:
                    raise ValueError(f"bad PNG filter type {ftype}")
                cur[i] = (line[i] + pred) & 0xFF
        out[y], prev = cur, cur
    return out.astype(np.uint8).reshape(h, w, channels)


def save_png(path, image: np.ndarray) -> Path:
    return atomic_write_bytes(path, encode_png(image))


def load_png(path) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"PNG file not found: {path}")
    return decode_png(path.read_bytes())


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

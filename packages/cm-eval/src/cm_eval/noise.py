"""Fixed initial noise for text-to-image evaluation (Direct CM's SDXL runs sample every model from
one ``init_noise.pt``, so that student, teacher and baselines start from the same latents).

Image i's noise is drawn from its own CPU generator seeded with ``_image_seed(seed, i)``, a hash of
(seed, i): it does not depend on ``num``, so the first k images of a file made with ``num=N`` are a
file made with ``num=k``, and the streams of different seeds share no image. Noise is always drawn in
float32 and then cast, so a float16 file is the rounding of the float32 one.

File format (``.pt``, read with ``torch.load(weights_only=True)``: no pickled code):
``{"noise": Tensor [num, *shape], "seed": int, "shape": list[int] (one image's shape),
"format": "cm-noise", "version": 1}``.
"""

from __future__ import annotations

import hashlib
import pickle
import zipfile
from pathlib import Path

import torch
from cm_nets.files import atomic_path

__all__ = ["make_noise", "save_noise", "load_noise"]

FORMAT = "cm-noise"
VERSION = 1
_MAKE = "make one with cm_eval.make_noise + save_noise (or `cm eval make-noise`)"


def _image_seed(seed: int, i: int) -> int:
    """A 63-bit generator seed for image ``i`` of stream ``seed`` (BLAKE2b of both as 8-byte ints):
    neighbouring (seed, i) pairs get unrelated seeds, and (s, i) never collides with (s', i')
    in the way ``seed + i`` would."""
    digest = hashlib.blake2b(
        int(seed).to_bytes(8, "little", signed=True) + int(i).to_bytes(8, "little", signed=True),
        digest_size=8,
        person=b"cm-noise",
    ).digest()
    return int.from_bytes(digest, "little") >> 1


def _check_shape(shape) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise ValueError(f"noise shape must be a sequence of positive integers, got {shape!r}") from None
    if not shape or min(shape) < 1:
        raise ValueError(f"noise shape must be non-empty positive integers, e.g. (4, 128, 128), got {shape}")
    return shape


def make_noise(shape: tuple[int, ...], num: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise [num, *shape]; image i depends only on (seed, i). ``seed``: any int
    that fits in 64 bits (signed)."""
    shape = _check_shape(shape)
    if int(num) < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    if not -(2**63) <= int(seed) < 2**63:
        raise ValueError(f"seed must fit in a signed 64-bit integer, got {seed}")
    if not dtype.is_floating_point:
        raise ValueError(f"noise dtype must be a floating-point dtype, got {dtype}")
    out = torch.empty((int(num), *shape), dtype=dtype)
    for i in range(int(num)):
        g = torch.Generator().manual_seed(_image_seed(seed, i))
        out[i] = torch.randn(shape, generator=g, dtype=torch.float32)
    return out


def save_noise(path, noise: torch.Tensor, *, seed: int, overwrite: bool = False) -> Path:
    """Write ``noise`` [num, *shape] and its seed to ``path`` (.pt) atomically: a temporary file in
    the same folder, fsynced and renamed, so a reader never sees half a file. An existing file is
    refused unless ``overwrite``."""
    path = Path(path)
    if not torch.is_tensor(noise) or not noise.is_floating_point() or noise.ndim < 2:
        raise ValueError(f"cannot write {path}: noise must be a floating-point tensor [num, *shape]")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (`--overwrite`) to replace it")
    record = {
        "noise": noise.detach().to("cpu").contiguous(),
        "seed": int(seed),
        "shape": list(noise.shape[1:]),
        "format": FORMAT,
        "version": VERSION,
    }
    with atomic_path(path) as tmp:
        torch.save(record, tmp)
    return path


def load_noise(path) -> tuple[torch.Tensor, dict]:
    """``(noise [num, *shape], {"seed", "shape", "format", "version"})`` from a file of :func:`save_noise`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"noise file {path} not found; {_MAKE}")
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as e:
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise ValueError(f"{path}: not a readable noise file ({reason}); re-create it: {_MAKE}") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"{path}: not a cm-noise file (no format 'cm-noise'); {_MAKE}")
    if record.get("version") != VERSION:
        raise ValueError(
            f"{path}: cm-noise version {record.get('version')!r}, this cm-eval reads version {VERSION}; "
            "upgrade cm-eval or re-create the file"
        )
    noise, seed, shape = record.get("noise"), record.get("seed"), record.get("shape")
    if (
        not torch.is_tensor(noise)
        or not noise.is_floating_point()
        or not isinstance(seed, int)
        or not isinstance(shape, list)
        or list(noise.shape[1:]) != shape
    ):
        raise ValueError(f"{path}: damaged cm-noise file (noise, seed or shape missing or inconsistent); {_MAKE}")
    return noise, {"seed": seed, "shape": shape, "format": FORMAT, "version": VERSION}

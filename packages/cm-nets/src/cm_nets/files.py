"""Files written whole or not at all, and a dependency-free PNG codec (8-bit gray / RGB / RGBA).

One implementation for the workspace: cm-train (checkpoints, run records, sample grids) and
cm-eval (samples, statistics, reports) both write through it. It lives in cm-nets, the lowest
package that already writes files (``save``): cm-core must not know about files and cm-kernels
holds ops, while cm-train and cm-eval must not need each other for it.

Atomic: a temporary file (or folder) in the destination's folder is written, fsynced, and moved
over the destination with ``os.replace``, so a reader sees the old file or the new one, never half
of one, and an interrupted run leaves no truncated file that a resume would take for a finished one.
(cm-kernels' build keeps its own small writer: its setup cannot import an installed package.)
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import struct
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

__all__ = [
    "atomic_dir",
    "atomic_path",
    "atomic_save_npz",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "decode_png",
    "encode_png",
    "file_mode",
    "fsync_path",
    "image_grid",
    "load_png",
    "restore_aside",
    "save_png",
]


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a folder by name (a folder's fsync makes the renames inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_mode() -> int:
    """The mode ``open()`` gives a new file: 0o666 less the process umask. Temporary files (mkstemp)
    and safetensors' ``save_file`` create 0600 files; every output gets this mode before it is
    renamed into place, so colleagues on a shared filesystem read checkpoints like any other file."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # no /proc: read the umask by setting it (and restore it at once)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, sync_dir: bool = False) -> Iterator[Path]:
    """A temporary path beside ``path`` (``.<name>.*.tmp``) for the block to write; when the block
    ends without an error the file is fsynced and renamed over ``path`` (and with ``sync_dir`` the
    folder is fsynced too, so that the rename survives a power cut), else it is removed.

    For writers that take a path (``safetensors.torch.save_file``); nest two for a pair of files."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:  # name the file the user asked for, not our temporary
        raise type(exc)(exc.errno, f"cannot write {path}: {exc.strerror}") from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        fsync_path(tmp)
        os.chmod(tmp, file_mode())  # mkstemp creates 0600; outputs are shared like any written file
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_path(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, sync_dir: bool = False) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder (fsync, rename)."""
    path = Path(path)
    with atomic_path(path, sync_dir=sync_dir) as tmp:
        tmp.write_bytes(data)
    return path


def atomic_write_text(path: str | os.PathLike, text: str, *, sync_dir: bool = False) -> Path:
    """``atomic_write_bytes`` of ``text`` in UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"), sync_dir=sync_dir)


def atomic_write_json(path: str | os.PathLike, obj) -> Path:
    """``obj`` as indented JSON with sorted keys and a final newline, written atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_save_npz(path: str | os.PathLike, **arrays) -> Path:
    """np.savez (uncompressed, readable by EDM / pytorch-fid / ADM tools) written atomically."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return atomic_write_bytes(path, buf.getvalue())


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, sync: bool = True) -> Iterator[Path]:
    """A fresh temporary folder ``.<name>.tmp-<pid>`` beside ``path`` for the block to fill; when
    the block ends without an error it takes ``path``'s place (a folder already there is renamed
    aside, then removed), else it is removed. With ``sync`` everything in it, the folder itself
    and, after the rename, its parent are fsynced. A killed process leaves the temporary folder
    (``.<name>.tmp-<pid>``, which the caller may sweep by that name on its next run) or, killed
    between the two renames of a swap, the previous folder as ``.<name>.old-<pid>``: a whole copy
    that :func:`restore_aside` puts back when ``path`` is missing (never swept as a temporary)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
    except OSError as exc:
        raise type(exc)(exc.errno, f"cannot write {path}: {exc.strerror}") from None
    try:
        yield tmp
        mode = file_mode()
        for entry in tmp.rglob("*"):  # writers such as safetensors' save_file create 0600 files
            if entry.is_file() and not entry.is_symlink():
                os.chmod(entry, mode)
        if sync:
            for entry in sorted(tmp.rglob("*"), reverse=True):  # files before the folders that hold them
                fsync_path(entry)
            fsync_path(tmp)
        if path.exists():
            aside = path.with_name(f".{path.name}.old-{os.getpid()}")
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(path, aside)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(aside, path)
                raise
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if sync:
        fsync_path(path.parent)


def restore_aside(path: str | os.PathLike) -> Path | None:
    """After a kill in the middle of an :func:`atomic_dir` swap: when ``path`` is missing, put the
    previous folder (``.<name>.old-<pid>``) back and return it; when ``path`` exists, the swap had
    finished, so a leftover previous folder is removed. None when there was nothing to do."""
    path = Path(path)
    restored = None
    for aside in sorted(path.parent.glob(f".{path.name}.old-*")):
        if not path.exists():
            os.replace(aside, path)
            restored = path
        else:
            shutil.rmtree(aside, ignore_errors=True)
    return restored


# --- PNG -----------------------------------------------------------------------------------------

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


def save_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    """``encode_png(image)`` written atomically to ``path``."""
    return atomic_write_bytes(path, encode_png(image))


def load_png(path: str | os.PathLike) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"PNG file not found: {path}")
    try:
        return decode_png(path.read_bytes())
    except (ValueError, zlib.error, IndexError, struct.error) as exc:  # truncated or corrupt data
        raise ValueError(f"{path}: not a readable PNG ({exc}); re-create or remove the file") from None


def image_grid(images: np.ndarray, ncol: int, pad: int = 1, fill: int = 255) -> np.ndarray:
    """Tile uint8 NHWC images into one uint8 [H', W', C] picture, ``ncol`` per row, ``pad`` pixels apart."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) == 0:
        raise ValueError(f"image_grid needs non-empty uint8 NHWC images, got {images.dtype} {images.shape}")
    n, h, w, c = images.shape
    ncol = max(1, min(ncol, n))
    nrow = -(-n // ncol)
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), fill, np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, ncol)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = img
    return grid

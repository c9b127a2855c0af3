"""cm_nets.files: atomic writers (files and folders) and the PNG codec and image grid that
cm-train and cm-eval share."""

import json
import os
import stat
import zlib

import numpy as np
import pytest
from cm_nets.files import (
    atomic_dir,
    atomic_path,
    atomic_save_npz,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    decode_png,
    encode_png,
    image_grid,
    load_png,
    save_png,
)


def _crash(*args):
    raise OSError("disk full")


# ---- atomic files -------------------------------------------------------------------------------


def test_atomic_writers_write_whole_files(tmp_path):
    assert atomic_write_bytes(tmp_path / "sub" / "a.bin", b"\x00\x01").read_bytes() == b"\x00\x01"
    assert atomic_write_text(tmp_path / "t.txt", "α\n", sync_dir=True).read_text(encoding="utf-8") == "α\n"
    assert json.loads(atomic_write_json(tmp_path / "j.json", {"b": 1, "a": [2]}).read_text()) == {"a": [2], "b": 1}
    assert (tmp_path / "j.json").read_text() == '{\n  "a": [\n    2\n  ],\n  "b": 1\n}\n'
    with np.load(atomic_save_npz(tmp_path / "x.npz", arr_0=np.arange(3))) as f:
        np.testing.assert_array_equal(f["arr_0"], np.arange(3))
    assert stat.S_IMODE((tmp_path / "sub" / "a.bin").stat().st_mode) == 0o644  # not mkstemp's 0600
    assert not list(tmp_path.rglob(".*.tmp"))  # atomic writes leave no temp files


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_outputs_take_the_umask_mode_not_0600(tmp_path, umask):
    """Checkpoint weights (safetensors' save_file writes 0600) and every atomic output get the mode
    open() would give under the process umask, so a shared run folder stays readable."""
    import torch
    from cm_nets import files

    old = os.umask(umask)
    try:
        want = 0o666 & ~umask
        assert files.file_mode() == want
        assert stat.S_IMODE(atomic_write_bytes(tmp_path / "a.bin", b"x").stat().st_mode) == want
        from safetensors.torch import save_file

        with files.atomic_dir(tmp_path / "ckpt") as d:
            save_file({"w": torch.zeros(2)}, str(d / "ema.safetensors"))
            (d / "meta.json").write_text("{}")
        for name in ("ema.safetensors", "meta.json"):
            assert stat.S_IMODE((tmp_path / "ckpt" / name).stat().st_mode) == want, name
    finally:
        os.umask(old)


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = atomic_write_bytes(tmp_path / "f.bin", b"old")
    monkeypatch.setattr(os, "replace", _crash)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(path, b"new")
    monkeypatch.undo()
    with pytest.raises(KeyboardInterrupt), atomic_path(path) as tmp:
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


# ---- atomic folders -----------------------------------------------------------------------------


def test_atomic_dir_creates_and_replaces_a_folder(tmp_path):
    out = tmp_path / "run"
    with atomic_dir(out) as work:
        assert work.parent == tmp_path and work.name.startswith(".run.tmp-") and not out.exists()
        (work / "sub").mkdir()
        (work / "sub" / "a.txt").write_text("1")
    assert (out / "sub" / "a.txt").read_text() == "1"
    with atomic_dir(out, sync=False) as work:
        (work / "b.txt").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]  # the old folder is gone, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_an_interrupted_atomic_dir_keeps_the_old_folder(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_dir(out) as work:
        (work / "new.txt").write_text("half")
        raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    real = os.replace
    calls = []

    def second_fails(src, dst):  # the old folder moves aside, then the new one cannot move in
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", second_fails)
    with pytest.raises(OSError, match="disk full"), atomic_dir(out) as work:
        (work / "new.txt").write_text("new")
    assert (out / "old.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


# ---- PNG ----------------------------------------------------------------------------------------


def test_png_codec_roundtrip_and_filters(tmp_path):
    rng = np.random.default_rng(0)
    for shape in [(5, 7), (5, 7, 1), (4, 6, 3), (3, 3, 4)]:
        img = rng.integers(0, 256, shape, dtype=np.uint8)
        out = decode_png(encode_png(img))
        np.testing.assert_array_equal(out.reshape(img.shape), img)
    assert encode_png(img) == encode_png(img.copy())  # deterministic bytes
    # Decode a PNG that uses the Sub/Up/Average/Paeth filters (as other encoders write them).
    img = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8).astype(np.int32)
    raw, prev = b"", np.zeros(15, np.int32)
    for y, ftype in enumerate([1, 2, 3, 4]):
        cur = img[y].reshape(-1)
        left = np.concatenate([np.zeros(3, np.int32), cur[:-3]])
        upleft = np.concatenate([np.zeros(3, np.int32), prev[:-3]])
        if ftype == 1:
            pred = left
        elif ftype == 2:
            pred = prev
        elif ftype == 3:
            pred = (left + prev) // 2
        else:
            p = left + prev - upleft
            pa, pb, pc = abs(p - left), abs(p - prev), abs(p - upleft)
            pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, prev, upleft))
        raw += bytes([ftype]) + ((cur - pred) & 0xFF).astype(np.uint8).tobytes()
        prev = cur
    png = bytearray(encode_png(img.astype(np.uint8)))
    import struct

    start = png.index(b"IDAT") - 4
    (length,) = struct.unpack(">I", png[start : start + 4])
    body = zlib.compress(raw)
    chunk = struct.pack(">I", len(body)) + b"IDAT" + body + struct.pack(">I", zlib.crc32(b"IDAT" + body))
    png = bytes(png[:start]) + chunk + bytes(png[start + 12 + length :])
    np.testing.assert_array_equal(decode_png(png), img.astype(np.uint8))
    with pytest.raises(TypeError, match="uint8"):
        encode_png(img.astype(np.float32))


def test_save_and_load_png(tmp_path):
    img = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    path = save_png(tmp_path / "a.png", img)
    assert path.read_bytes() == encode_png(img)
    np.testing.assert_array_equal(load_png(path), img)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_png(tmp_path / "missing.png")


def test_image_grid():
    assert image_grid(np.zeros((1, 2, 2, 1), np.uint8), ncol=3).shape == (4, 4, 1)
    images = np.stack([np.full((2, 3, 1), i, np.uint8) for i in range(5)])
    grid = image_grid(images, ncol=2, pad=1, fill=255)
    assert grid.shape == (3 * 3 + 1, 2 * 4 + 1, 1)
    assert grid[1, 1, 0] == 0 and grid[1, 5, 0] == 1 and grid[4, 1, 0] == 2 and grid[7, 1, 0] == 4
    assert grid[7, 5, 0] == 255 and grid[0, 0, 0] == 255  # the missing sixth tile and the padding
    with pytest.raises(ValueError, match="uint8 NHWC"):
        image_grid(images.astype(np.float32), ncol=2)

"""Atomic checkpoints: a folder per step, written under a temporary name and renamed when whole.

Layout of ``<run>/checkpoints/step-00001000/``:
  ``net.safetensors`` (+ ``net.json``)      online weights, loadable with ``cm_nets.load``
  ``ema-<name>.safetensors`` (+ ``.json``)  each EMA, likewise
  ``target.safetensors``                    the CT/CD target network, when there is one
  ``state.pt``                              optimizer, scaler, step, data position, RNG states of every
                                            rank (plain tensors and containers: ``weights_only`` loads it)
  ``meta.json``                             step, metrics, time, and ``files``: the sha256 of every
                                            other file (written last: the commit marker)
A process killed mid-write leaves only a ``.step-….tmp-<pid>`` folder, which is ignored and
removed by the next save; the previous checkpoint stays intact. Old checkpoints are pruned by
renaming them to such a temporary name first, so a kill mid-prune never leaves a folder that looks
committed but lacks files. ``load_checkpoint`` verifies the checksums (``CheckpointCorrupt`` names
the file); ``usable_checkpoint`` falls back to the newest checkpoint that verifies.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import time
import warnings
from pathlib import Path

import torch
from cm_nets import files

__all__ = [
    "CheckpointCorrupt",
    "atomic_write_text",
    "first_bad_file",
    "incomplete_checkpoints",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "restore_swapped",
    "save_checkpoint",
    "usable_checkpoint",
    "verify_checkpoint",
]


class CheckpointCorrupt(ValueError):
    """A checkpoint file is missing, truncated or altered; the message names the file."""

    def __init__(self, path, reason: str) -> None:
        self.path = Path(path)
        super().__init__(f"{self.path}: {reason}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()

_NAME = re.compile(r"^step-(\d{8})$")


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a small run-state text file atomically (``cm_nets.files``), its folder fsynced too."""
    return files.atomic_write_text(path, text, sync_dir=True)


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The committed checkpoints (a ``meta.json``), oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / "meta.json").exists()]
    return sorted(done, key=lambda p: int(_NAME.match(p.name).group(1)))


def incomplete_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """``step-*`` folders without their ``meta.json`` (never committed, or damaged since): skipped."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name) and not (p / "meta.json").exists())


def verify_checkpoint(path: str | os.PathLike) -> dict:
    """The checkpoint's meta, after checking every file against the sha256 in it (checkpoints
    written before checksums existed are checked for presence only). CheckpointCorrupt otherwise."""
    path = Path(path)
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise CheckpointCorrupt(meta_path, "missing: the checkpoint was never committed or was damaged")
    try:
        meta = json.loads(meta_path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointCorrupt(meta_path, f"unreadable ({exc})") from None
    bad = first_bad_file(path, meta)
    if bad is not None:
        raise CheckpointCorrupt(path / bad[0], bad[1])
    return meta


def first_bad_file(path: Path, meta: dict, names=None) -> tuple[str, str] | None:
    """(file name, reason) of the first of ``names`` (default: every file the checkpoint records)
    that is missing or differs from its recorded sha256; None when they all verify. Files the
    checkpoint records no checksum for are not checked."""
    sums = meta.get("files") or {}
    for name in sums if names is None else [n for n in names if n in sums]:
        f = Path(path) / name
        if not f.is_file():
            return name, "missing"
        if _sha256(f) != sums[name]:
            return name, "its contents differ from the checksum written with it (truncated or altered)"
    return None


def restore_swapped(run_dir: str | os.PathLike, say=None) -> list[Path]:
    """Checkpoints a kill left renamed aside in the middle of a same-step re-save (``.step-….old-<pid>``,
    a whole committed copy) are put back where their ``step-…`` folder is missing."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    names = {p.name.split(".old-")[0].lstrip(".") for p in root.glob(".step-*.old-*")}
    back = [p for n in sorted(names) if (p := files.restore_aside(root / n)) is not None]
    for p in back:
        (say or (lambda m: warnings.warn(m, stacklevel=3)))(f"restored {p.name}, left aside by an interrupted re-save")
    return back


def usable_checkpoint(run_dir: str | os.PathLike, say=None) -> Path | None:
    """The newest checkpoint that verifies; each newer one that does not is reported through
    ``say`` (or a warning) by file and reason, and left in place. None when there is none at all;
    CheckpointCorrupt when checkpoints exist but none verifies."""
    tell = say or (lambda m: warnings.warn(m, stacklevel=3))
    restore_swapped(run_dir, say=tell)
    for folder in incomplete_checkpoints(run_dir):
        tell(f"{folder} has no meta.json (never committed, or damaged): skipped")
    bad = []
    for ckpt in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(ckpt)
        except CheckpointCorrupt as exc:
            bad.append(str(exc))
            tell(f"checkpoint {ckpt.name} does not verify ({exc}); falling back to an older one (kept for inspection)")
            continue
        return ckpt
    if bad:
        raise CheckpointCorrupt(Path(run_dir) / "checkpoints", f"no checkpoint verifies: {'; '.join(bad)}")
    return None


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    networks: dict[str, tuple[dict[str, torch.Tensor], dict | None]],
    state: dict,
    meta: dict,
    *,
    keep_last: int = 3,
    protect: tuple[Path, ...] = (),
) -> Path:
    """Write one checkpoint atomically and prune old ones (``protect`` keeps e.g. the best)."""
    from safetensors.torch import save_file

    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    restore_swapped(run_dir)
    for stale in root.glob(".step-*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    name = f"step-{step:08d}"
    final = root / name
    # Written in .step-….tmp-<pid>, fsynced, then renamed over a checkpoint of the same step
    # (re-saved after a rollback), which is moved aside first: never half a checkpoint.
    with files.atomic_dir(final) as tmp:
        for key, (tensors, net_meta) in networks.items():
            flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
            header = {"cm_nets": json.dumps(net_meta)} if net_meta else None
            save_file(flat, str(tmp / f"{key}.safetensors"), metadata=header)
            if net_meta:
                (tmp / f"{key}.json").write_text(json.dumps(net_meta, indent=2) + "\n")
        _save_state(state, tmp / "state.pt", final / "state.pt")
        sums = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        record = {"step": step, "time": time.time(), **meta, "files": sums}
        (tmp / "meta.json").write_text(json.dumps(record, indent=2) + "\n")  # the commit marker, last
    keep = set(list_checkpoints(run_dir)[-max(keep_last, 1) :]) | {Path(p) for p in protect} | {final}
    for old in list_checkpoints(run_dir):
        if old not in keep:  # out of the listing first (one rename), then deleted: never half-listed
            aside = old.with_name(f".{old.name}.tmp-prune-{os.getpid()}")
            os.replace(old, aside)
            shutil.rmtree(aside, ignore_errors=True)
    return final


def _save_state(state: dict, path: Path, shown: Path) -> None:
    """torch.save with a clear message when the disk is full (torch's own says `unexpected pos`)."""
    try:
        torch.save(state, path)
    except (RuntimeError, OSError) as exc:
        free = shutil.disk_usage(path.parent).free
        if (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or free < (64 << 20):
            raise OSError(
                errno.ENOSPC,
                f"no space left on the device writing {shown} ({free / 2**20:.0f} MiB free): free some space "
                "and run the same command again to resume from the previous checkpoint",
            ) from None
        raise


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, dict[str, torch.Tensor]], dict, dict]:
    """(networks, state, meta) of a checkpoint folder, its checksums verified; no pickled code runs.
    CheckpointCorrupt names the file that is missing, truncated or altered."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "meta.json").exists():
        raise FileNotFoundError(f"{path} is not a complete cm-train checkpoint (no meta.json)")
    meta = verify_checkpoint(path)
    networks = {}
    for p in sorted(path.glob("*.safetensors")):
        try:
            networks[p.stem] = load_file(str(p))
        except Exception as exc:  # noqa: BLE001  safetensors raises its own error types
            raise CheckpointCorrupt(p, f"not a readable safetensors file ({exc})") from None
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  truncated zip, bad pickle: the file, not torch's advice
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointCorrupt(path / "state.pt", f"not readable ({first[:160]})") from None
    return networks, state, meta

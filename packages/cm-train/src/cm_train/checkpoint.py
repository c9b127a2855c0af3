"""Atomic checkpoints: a folder per step, written under a temporary name and renamed when whole.

Layout of ``<run>/checkpoints/step-00001000/``:
  ``net.safetensors`` (+ ``net.json``)      online weights, loadable with ``cm_nets.load``
  ``ema-<name>.safetensors`` (+ ``.json``)  each EMA, likewise
  ``target.safetensors``                    the CT/CD target network, when there is one
  ``state.pt``                              optimizer, scaler, step, data position, RNG states of every
                                            rank (plain tensors and containers: ``weights_only`` loads it)
  ``meta.json``                             step, metrics, time
A process killed mid-write leaves only a ``.step-….tmp-<pid>`` folder, which is ignored and
removed by the next save; the previous checkpoint stays intact.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import torch
from cm_nets import files

__all__ = ["save_checkpoint", "list_checkpoints", "latest_checkpoint", "load_checkpoint", "atomic_write_text"]

_NAME = re.compile(r"^step-(\d{8})$")


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a small run-state text file atomically (``cm_nets.files``), its folder fsynced too."""
    return files.atomic_write_text(path, text, sync_dir=True)


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / "meta.json").exists()]
    return sorted(done, key=lambda p: int(_NAME.match(p.name).group(1)))


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
        torch.save(state, tmp / "state.pt")
        (tmp / "meta.json").write_text(json.dumps({"step": step, "time": time.time(), **meta}, indent=2) + "\n")
    keep = set(list_checkpoints(run_dir)[-max(keep_last, 1) :]) | {Path(p) for p in protect} | {final}
    for old in list_checkpoints(run_dir):
        if old not in keep:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, dict[str, torch.Tensor]], dict, dict]:
    """(networks, state, meta) of a checkpoint folder; no pickled code runs."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "meta.json").exists():
        raise FileNotFoundError(f"{path} is not a complete cm-train checkpoint (no meta.json)")
    networks = {p.stem: load_file(str(p)) for p in path.glob("*.safetensors")}
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    meta = json.loads((path / "meta.json").read_text())
    return networks, state, meta

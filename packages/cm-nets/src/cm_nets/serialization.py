"""Our own checkpoint format: weights in safetensors, the architecture as a small JSON.

``save(module, "net.safetensors")`` writes ``net.safetensors`` (every state_dict tensor) and
``net.json`` (``{"format": "cm-nets", "version": 1, "preset": …, "overrides": {…}}``; the same
JSON also sits in the safetensors header metadata under ``"cm_nets"``, so the weights file alone
is enough). ``load`` rebuilds the module with :func:`cm_nets.create` and loads the tensors with
``strict=True``: nothing in the files is ever executed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .files import atomic_path
from .presets import create

FORMAT, VERSION = "cm-nets", 1


def _jsonable(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, where) for v in value]
    raise TypeError(
        f"{where} = {value!r} ({type(value).__name__}) cannot be stored in JSON; "
        "overrides must be numbers, strings, booleans, None or lists of them"
    )


def _paths(path: str | os.PathLike) -> tuple[Path, Path]:
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_name(path.name + ".safetensors")
    return path, path.with_suffix(".json")


def save(module: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``module``'s tensors to ``path`` (``.safetensors`` appended if missing) and its
    preset + overrides to the ``.json`` beside it. The module must come from ``cm_nets.create``."""
    from safetensors.torch import save_file

    config = getattr(module, "cm_nets_config", None)
    if config is None:
        raise ValueError(
            "module has no cm_nets_config: build it with cm_nets.create(name, **overrides) "
            "(or set module.cm_nets_config = {'preset': name, 'overrides': {...}})"
        )
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "preset": config["preset"],
        "overrides": {k: _jsonable(v, f"overrides[{k!r}]") for k, v in config["overrides"].items()},
    }
    tensors_path, json_path = _paths(path)
    state = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
    # Each file through a temporary one beside it (fsync, rename): a crash never leaves half a file.
    # The weights are renamed into place first, then the JSON (the inner block ends first).
    with atomic_path(json_path) as tmp_json, atomic_path(tensors_path) as tmp_tensors:
        save_file(state, str(tmp_tensors), metadata={"cm_nets": json.dumps(meta)})
        tmp_json.write_text(json.dumps(meta, indent=2) + "\n")
    return tensors_path


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON architecture record of a saved network (sidecar file, else the header metadata)."""
    from safetensors import safe_open

    tensors_path, json_path = _paths(path)
    if json_path.exists():
        meta = json.loads(json_path.read_text())
    else:
        if not tensors_path.exists():
            raise FileNotFoundError(f"no cm_nets checkpoint at {tensors_path}")
        with safe_open(str(tensors_path), framework="pt") as f:
            header = (f.metadata() or {}).get("cm_nets")
        if header is None:
            raise ValueError(
                f"{tensors_path} has no {json_path.name} and no 'cm_nets' metadata: not saved by cm_nets.save"
            )
        meta = json.loads(header)
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(
            f"{json_path}: format {meta.get('format')!r} version {meta.get('version')!r}; "
            f"expected {FORMAT!r} version {VERSION}"
        )
    return meta


def load(path: str | os.PathLike, *, map_location: str | torch.device = "cpu", **overrides: Any) -> nn.Module:
    """Rebuild and load a network written by :func:`save`. ``overrides`` may change arguments
    that do not alter the tensors (``attention_backend``, ``dropout``)."""
    from safetensors.torch import load_file

    meta = read_config(path)
    module = create(meta["preset"], **{**meta["overrides"], **overrides})
    state = load_file(str(_paths(path)[0]), device=str(map_location))
    module.load_state_dict(state, strict=True)
    module.cm_nets_config = {"preset": meta["preset"], "overrides": {**meta["overrides"], **overrides}}
    return module.to(map_location)

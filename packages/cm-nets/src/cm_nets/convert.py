"""Converters from the seeds' checkpoint formats, without running any code from the files.

- openai/consistency_models, iCT and BCM ``.pt`` files are state dicts: read with
  ``torch.load(weights_only=True)`` and loaded into :class:`~cm_nets.adm.ADMUNet` with
  ``strict=True`` (our key names are openai's).
- EDM / ECT / CDM ``.pkl`` snapshots pickle whole modules whose classes carry their source code
  (``torch_utils.persistence``); unpickling them normally *executes* that code. :func:`read_edm_pickle`
  uses an unpickler that resolves only an allow-list of globals to harmless stand-ins, never
  imports or executes anything named in the file, and extracts the tensors by module path.
"""

from __future__ import annotations

import collections
import io
import logging
import os
import pickle
from typing import Any

import torch
from torch import nn

from .presets import create

logger = logging.getLogger("cm_nets")

_ADM_PRESETS = ("adm-imagenet64", "adm-imagenet64-no32-qkv", "adm-imagenet64-bcm")


# --------------------------------------------------------------------------------------------
# openai / iCT / BCM state dicts


def read_openai_checkpoint(source: str | os.PathLike | dict) -> dict[str, torch.Tensor]:
    """A state dict from an openai-style ``.pt`` (``weights_only=True``) or a dict; strips a
    ``module.`` (DDP) prefix and unwraps ``{"state_dict"|"model"|"ema": …}`` containers."""
    sd = source if isinstance(source, dict) else torch.load(os.fspath(source), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "ema"):
        if key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError("not a state dict: some values are not tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def guess_adm_preset(state_dict: dict[str, torch.Tensor]) -> str:
    """Which ADM ImageNet-64 preset a state dict belongs to: ``time_embed_end`` → BCM; scale-shift
    norm (emb_layers twice as wide as the block) → openai CD/CT; otherwise iCT's no32 network.
    Normalized (cosine) attention has no parameters, so it cannot be seen: no-scale-shift
    checkpoints are assumed to be iCT/BCM's "no32_qkv" (override ``attention_normalize`` if not)."""
    if "time_embed_end.0.weight" in state_dict:
        return "adm-imagenet64-bcm"
    emb = state_dict.get("input_blocks.1.0.emb_layers.1.weight")
    conv = state_dict.get("input_blocks.1.0.in_layers.2.weight")
    if emb is not None and conv is not None and emb.shape[0] == 2 * conv.shape[0]:
        return "adm-imagenet64"
    return "adm-imagenet64-no32-qkv"


def from_openai(source: str | os.PathLike | dict, preset: str | None = None, **overrides: Any) -> nn.Module:
    """Build an ADM preset and load an openai / iCT / BCM checkpoint into it (``strict=True``).

    ``preset=None`` guesses from the keys (and logs the guess); ``overrides`` go to
    :func:`cm_nets.create` (e.g. ``attention_normalize="none"`` for a no-32 network trained
    without cosine attention, ``num_classes=None`` for an unconditional one)."""
    sd = read_openai_checkpoint(source)
    if preset is None:
        preset = guess_adm_preset(sd)
        logger.info("cm_nets.from_openai: state dict looks like preset %r", preset)
    elif preset not in _ADM_PRESETS and preset != "unet-tiny":
        raise ValueError(f"preset must be one of {_ADM_PRESETS} (or 'unet-tiny'), got {preset!r}")
    if "label_emb.weight" not in sd:
        overrides.setdefault("num_classes", None)
    with torch.device("meta"):
        module = create(preset, **overrides)
    module = module.to_empty(device="cpu")
    module.load_state_dict(sd, strict=True)
    return module


# --------------------------------------------------------------------------------------------
# EDM pickles


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle names a global outside the allow-list (it could run code)."""


class _Stub:
    """Stand-in for any pickled module object: keeps its state, runs nothing."""

    def __init__(self, *args, **kwargs):
        self.__dict__["_stub_args"] = args

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["_stub_state"] = state


class _StubDict(dict):
    """Stand-in for dict subclasses (dnnlib.EasyDict): a plain dict."""

    def __setstate__(self, state):
        if isinstance(state, dict):
            self.update(state)


def _persistent_obj(meta: dict) -> _Stub:
    """Stand-in for ``torch_utils.persistence._reconstruct_persistent_obj``: the class source in
    ``meta["module_src"]`` is ignored; only ``meta["state"]`` is kept."""
    if not isinstance(meta, dict) or "state" not in meta:
        raise UnsafePickleError("malformed persistent object record")
    obj = _Stub()
    obj.__dict__["_edm_class"] = meta.get("class_name")
    obj.__setstate__(meta["state"])
    return obj


def _storage_from_bytes(b: bytes):
    # torch.storage._load_from_bytes calls torch.load(weights_only=False); this one cannot run code.
    return torch.load(io.BytesIO(b), map_location="cpu", weights_only=True)


_TORCH_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch", "Size"): torch.Size,
    ("_codecs", "encode"): lambda s, enc="latin1": (
        s.encode(enc) if enc in ("latin1", "latin-1") else _refuse("_codecs", f"encode({enc})")
    ),
}
_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float64,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.uint8,
        torch.bool,
    )
}


def _refuse(module: str, name: str):
    raise UnsafePickleError(
        f"refusing to load global {module}.{name}: cm_nets reads tensors from pickles without "
        "running code, and this object is not on the allow-list"
    )


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _TORCH_GLOBALS:
            return _TORCH_GLOBALS[(module, name)]
        if module == "torch" and name in _DTYPES:
            return _DTYPES[name]
        if module == "torch_utils.persistence" and name == "_reconstruct_persistent_obj":
            return _persistent_obj
        if module == "dnnlib.util" and name == "EasyDict":
            return _StubDict
        # Module classes (EDM's own, or torch.nn's) become inert stubs; nothing is imported.
        if module.startswith(("training.", "torch.nn.modules.", "torch_utils.")) and name[:1].isupper():
            return _Stub
        if module in ("numpy.core.multiarray", "numpy._core.multiarray", "numpy") and name in (
            "_reconstruct",
            "ndarray",
            "dtype",
            "scalar",
        ):
            return _numpy_stub(module, name)
        _refuse(module, name)

    def persistent_load(self, pid):
        raise UnsafePickleError(
            f"persistent id {pid!r} not supported (torch.save zip files: use torch.load(weights_only=True))"
        )


def _numpy_stub(module: str, name: str):
    # numpy objects (augment pipeline constants, dataset kwargs) are not needed: read them as None.
    def make(*args, **kwargs):
        return None

    return make


def read_edm_pickle(path_or_file, key: str = "ema") -> dict[str, torch.Tensor]:
    """Tensors of the network ``key`` ("ema" for EDM/ECT snapshots) of an EDM-style pickle, as a
    flat state dict keyed by module path (EDM's ``EDMPrecond.model.…`` prefix removed)."""
    if isinstance(path_or_file, (str, os.PathLike)):
        with open(path_or_file, "rb") as f:
            data = _RestrictedUnpickler(f).load()
    else:
        data = _RestrictedUnpickler(path_or_file).load()
    net = data[key] if isinstance(data, dict) and key in data else data
    state: dict[str, torch.Tensor] = {}

    def walk(obj: Any, prefix: str) -> None:
        d = obj.__dict__ if isinstance(obj, _Stub) else {}
        for group in ("_parameters", "_buffers"):
            for name, t in (d.get(group) or {}).items():
                if isinstance(t, torch.Tensor):
                    state[prefix + name] = t.detach()
        for name, child in (d.get("_modules") or {}).items():
            if child is not None:
                walk(child, f"{prefix}{name}.")

    walk(net, "")
    if not state:
        top = list(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"no tensors found under {key!r}; top level: {top}")
    if all(k.startswith("model.") for k in state):
        state = {k.removeprefix("model."): v for k, v in state.items()}
    return state


def from_edm(source, preset: str, *, key: str = "ema", **overrides: Any) -> nn.Module:
    """Build ``preset`` (ddpmpp-cifar10, ncsnpp-cifar10, …) and load the tensors of an EDM
    ``.pkl`` snapshot into it with ``strict=True``. EDM CIFAR-10 snapshots were trained with
    ``augment_dim=9`` (pass it as an override); conditional ones with ``label_dim=10``."""
    state = read_edm_pickle(source, key=key)
    module = create(preset, **overrides)
    module.load_state_dict(state, strict=True)
    return module

"""Converters from the seeds' checkpoint formats, without running any code from the files.

- openai/consistency_models, iCT and BCM ``.pt`` files are state dicts: read with
  ``torch.load(weights_only=True)`` and loaded into :class:`~cm_nets.adm.ADMUNet` with
  ``strict=True`` (our key names are openai's).
- EDM / ECT / CDM ``.pkl`` snapshots pickle whole modules whose classes carry their source code
  (``torch_utils.persistence``); unpickling them normally *executes* that code.
  :func:`read_edm_snapshot` uses an unpickler that resolves only an allow-list of globals to
  harmless stand-ins or to our own reconstructors of plain data (tensors, numpy scalars, dtypes and
  numeric arrays), never imports or executes anything named in the file, and returns the tensors by
  module path together with the constructor arguments EDM recorded; :func:`from_edm` builds the
  matching SongUNet preset from them.
"""

from __future__ import annotations

import collections
import inspect
import io
import logging
import math
import os
import pickle
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .presets import PRESETS, create, preset_config
from .song import SongUNet

logger = logging.getLogger("cm_nets")

_ADM_PRESETS = ("adm-imagenet64", "adm-imagenet64-no32-qkv", "adm-imagenet64-bcm")


# --------------------------------------------------------------------------------------------
# openai / iCT / BCM state dicts


def _load_tensors_only(path: str | os.PathLike):
    """torch.load(weights_only=True), with one line naming the file when it is not a checkpoint (an
    empty, truncated, text or random file) or holds objects other than tensors and containers.
    Never falls back to loading code: such a file is refused."""
    import zipfile

    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a folder; expected a .pt checkpoint file")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path} is empty; expected a .pt checkpoint file saved by torch.save")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if found:  # torch's advice in this message (load with weights_only=False) is not ours
            raise ValueError(
                f"{path} holds objects other than tensors and containers (e.g. {found.group(1)}); cm loads "
                "only plain state dicts and never runs code from a checkpoint: re-save it with "
                "torch.save(model.state_dict(), ...) where it was made"
            ) from None
        why = re.search(r"Unpickler error:\s*(.+?)\s*(?:\n\n|$)", text, re.S)
        reason = why.group(1).strip() if why else (text.strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"{path} is not a PyTorch checkpoint ({reason[:120]})") from None
    except (EOFError, zipfile.BadZipFile, RuntimeError, OSError, KeyError, ValueError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path} is not a readable PyTorch checkpoint (truncated or another format: {msg[:120]})") from None


def read_openai_checkpoint(source: str | os.PathLike | dict) -> dict[str, torch.Tensor]:
    """A state dict from an openai-style ``.pt`` (``weights_only=True``) or a dict; strips a
    ``module.`` (DDP) prefix and unwraps ``{"state_dict"|"model"|"ema": …}`` containers."""
    sd = source if isinstance(source, dict) else _load_tensors_only(source)
    for key in ("state_dict", "model", "ema"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        where = "" if isinstance(source, dict) else f"{os.fspath(source)}: "
        raise ValueError(f"{where}not a state dict (a mapping of names to tensors)")
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


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """The pickle names a global outside the allow-list (it could run code), or data that is not
    plain (an object-dtype numpy array)."""


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


_STUB_CLASSES: dict[str, type] = {}


def _stub_class(module: str, name: str) -> type:
    # One inert subclass per pickled class name, so that messages can say what the object was.
    key = f"{module}.{name}"
    if key not in _STUB_CLASSES:
        _STUB_CLASSES[key] = type(name, (_Stub,), {"_edm_qualname": key})
    return _STUB_CLASSES[key]


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
    if not isinstance(b, (bytes, bytearray)):
        raise UnsafePickleError(f"a tensor storage must be bytes, got {type(b).__name__}")
    try:
        return torch.load(io.BytesIO(b), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsafePickleError(f"a tensor storage holds more than tensor data, refused: {first}") from None


# ---- numpy data, rebuilt by our own code (numpy's unpickling hooks would accept object arrays)

# bool, signed/unsigned int, float, complex, bytes, str: never "O" (Python objects), "V" (structured)
# or datetimes.
_NUMPY_SPEC = re.compile(r"[biufcSU]\d*")


class _NumpyDType:
    """A pickled ``numpy.dtype(spec, align, copy)`` until its state (byte order) arrives."""

    def __init__(self, spec: str):
        self.spec, self.order = spec, "="

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) >= 8 and state[0] in (3, 4)):
            raise UnsafePickleError(f"unexpected numpy dtype state {state!r:.80}")
        order, subarray, names, fields = state[1:5]
        if subarray is not None or names is not None or fields is not None:
            raise UnsafePickleError("refusing a structured numpy dtype: only plain numeric and string data is read")
        if order not in ("<", ">", "|", "="):
            raise UnsafePickleError(f"unexpected numpy byte order {order!r}")
        self.order = order

    def resolve(self) -> np.dtype:
        dtype = np.dtype(self.spec)
        return dtype.newbyteorder(self.order) if self.order in "<>" else dtype

    def __repr__(self) -> str:
        return f"dtype({self.resolve()!s})"


def _numpy_dtype(spec, align=False, copy=True) -> _NumpyDType:
    if not isinstance(spec, str) or not _NUMPY_SPEC.fullmatch(spec):
        raise UnsafePickleError(
            f"refusing numpy dtype {spec!r}: cm_nets reads numpy numbers, booleans and strings only "
            "(object and structured dtypes can carry code)"
        )
    return _NumpyDType(spec)


def _dtype_of(value) -> np.dtype:
    if not isinstance(value, _NumpyDType):
        raise UnsafePickleError(f"expected a numpy dtype, got {type(value).__name__}")
    return value.resolve()


def _numpy_scalar(dtype, data=None):
    dtype = _dtype_of(dtype)
    if not isinstance(data, (bytes, bytearray)) or len(data) != dtype.itemsize:
        raise UnsafePickleError(f"numpy scalar of {dtype} needs {dtype.itemsize} bytes of data")
    return np.frombuffer(bytes(data), dtype=dtype, count=1)[0]


class _NDArrayClass:
    """What the global ``numpy.ndarray`` names: only a marker for ``_reconstruct``."""

    def __call__(self, *args, **kwargs):
        raise UnsafePickleError("refusing to call numpy.ndarray from a pickle")


_NDARRAY = _NDArrayClass()


def _check_array_bytes(raw, shape, dtype: np.dtype) -> bytes:
    if not isinstance(raw, (bytes, bytearray, memoryview, pickle.PickleBuffer)):
        raise UnsafePickleError(f"numpy array data must be bytes, got {type(raw).__name__} (object arrays are refused)")
    if not isinstance(shape, tuple) or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise UnsafePickleError(f"bad numpy array shape {shape!r}")
    raw = bytes(raw)
    if len(raw) != math.prod(shape) * dtype.itemsize:
        raise UnsafePickleError(
            f"numpy array data holds {len(raw)} bytes, expected {math.prod(shape)}×{dtype.itemsize}"
        )
    return raw


class _PickledArray(np.ndarray):
    """``numpy.core.multiarray._reconstruct``'s empty array; its state is checked by us, then
    filled in by numpy (bytes of a plain dtype only)."""

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise UnsafePickleError("malformed numpy array state")
        shape, dtype, fortran, raw = state[-4:]
        dtype = _dtype_of(dtype)
        raw = _check_array_bytes(raw, shape, dtype)
        super().__setstate__((1, shape, dtype, bool(fortran), raw))


def _numpy_reconstruct(cls, shape=(0,), typecode=b"b"):
    if cls is not _NDARRAY:
        raise UnsafePickleError("numpy _reconstruct may only build a numpy.ndarray")
    return _PickledArray((0,), dtype=np.uint8)


def _numpy_frombuffer(buf, dtype, shape, order="C"):
    # numpy's protocol-5 reduction of arrays (in-band buffers only).
    dtype = _dtype_of(dtype)
    shape = tuple(shape) if isinstance(shape, (tuple, list)) else shape
    raw = _check_array_bytes(buf, shape, dtype)
    if order not in ("C", "F"):
        raise UnsafePickleError(f"bad numpy array order {order!r}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape, order=order).copy(order="K")


_NUMPY_GLOBALS: dict[tuple[str, str], Any] = {("numpy", "dtype"): _numpy_dtype, ("numpy", "ndarray"): _NDARRAY}
for _core in ("numpy.core", "numpy._core"):
    _NUMPY_GLOBALS[(f"{_core}.multiarray", "scalar")] = _numpy_scalar
    _NUMPY_GLOBALS[(f"{_core}.multiarray", "_reconstruct")] = _numpy_reconstruct
    _NUMPY_GLOBALS[(f"{_core}.numeric", "_frombuffer")] = _numpy_frombuffer

_TORCH_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
    ("collections", "OrderedDict"): collections.OrderedDict,
    # protocol ≤ 3 pickles spell sets as set([...]) (protocol 2: Python 2's module name)
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("__builtin__", "set"): set,
    ("__builtin__", "frozenset"): frozenset,
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
        if (module, name) in _NUMPY_GLOBALS:
            return _NUMPY_GLOBALS[(module, name)]
        if module == "torch" and name in _DTYPES:
            return _DTYPES[name]
        if module == "torch_utils.persistence" and name == "_reconstruct_persistent_obj":
            return _persistent_obj
        if module == "dnnlib.util" and name == "EasyDict":
            return _StubDict
        # Module classes (EDM's own, or torch.nn's) become inert stubs; nothing is imported.
        if module.startswith(("training.", "torch.nn.modules.", "torch_utils.")) and name[:1].isupper():
            return _stub_class(module, name)
        _refuse(module, name)

    def persistent_load(self, pid):
        raise UnsafePickleError(
            f"persistent id {pid!r} not supported (torch.save zip files: use torch.load(weights_only=True))"
        )


def _unpickle(path_or_file) -> tuple[Any, str]:
    """(object, name for messages)."""
    name = os.fspath(path_or_file) if isinstance(path_or_file, (str, os.PathLike)) else "the pickle"
    try:
        if isinstance(path_or_file, (str, os.PathLike)):
            with open(path_or_file, "rb") as f:
                return _RestrictedUnpickler(f).load(), name
        return _RestrictedUnpickler(path_or_file).load(), name
    except UnsafePickleError as exc:
        raise UnsafePickleError(f"{name}: {exc}") from None
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, TypeError) as exc:
        raise ValueError(
            f"{name} is not a readable pickle ({type(exc).__name__}: {exc}); "
            "cm_nets.from_edm reads EDM / ECT network-snapshot-*.pkl files"
        ) from None


def _tensors(obj: Any) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}

    def walk(node: Any, prefix: str) -> None:
        d = node.__dict__ if isinstance(node, _Stub) else {}
        for group in ("_parameters", "_buffers"):
            for name, t in (d.get(group) or {}).items():
                if isinstance(t, torch.Tensor):
                    state[prefix + name] = t.detach()
        for name, child in (d.get("_modules") or {}).items():
            if child is not None:
                walk(child, f"{prefix}{name}.")

    walk(obj, "")
    return state


def _pick(data: Any, key: str, name: str) -> Any:
    if isinstance(data, dict):
        if key not in data:
            raise ValueError(f"{name} has no entry {key!r}; its entries: {sorted(map(str, data))} (pass key=…/--key)")
        return data[key]
    return data


def read_edm_pickle(path_or_file, key: str = "ema") -> dict[str, torch.Tensor]:
    """Tensors of the network ``key`` ("ema" for EDM/ECT snapshots) of an EDM-style pickle, as a
    flat state dict keyed by module path (EDM's ``EDMPrecond.model.…`` prefix removed)."""
    data, name = _unpickle(path_or_file)
    state = _tensors(_pick(data, key, name))
    if not state:
        top = list(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"no tensors found under {key!r} in {name}; top level: {top}")
    if all(k.startswith("model.") for k in state):
        state = {k.removeprefix("model."): v for k, v in state.items()}
    return state


# ---- what the snapshot holds: weights plus the architecture EDM recorded


def _plain(value: Any) -> Any:
    """Recorded constructor arguments as JSON-able Python values (numpy scalars → int/float, …)."""
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, _NumpyDType):
        return str(value.resolve())
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return f"<{type(value).__name__}>"


def _class_of(obj: Any) -> str:
    if isinstance(obj, _Stub):
        return obj.__dict__.get("_edm_class") or type(obj).__name__
    return type(obj).__name__


_EDM_PRECONDS = ("EDMPrecond", "ECMPrecond")
_OTHER_PRECONDS = ("VPPrecond", "VEPrecond", "iDDPMPrecond")
_SUPPORTED = (
    "supported: EDMPrecond (EDM's edm-*.pkl and training snapshots) and ECT's ECMPrecond around a "
    "SongUNet (DDPM++ / NCSN++)"
)
# Preconditioner arguments that do not reach the inner network.
_PRECOND_ONLY = ("img_channels", "use_fp16", "model_type", "sigma_min", "sigma_max", "sigma_data", "C_1", "C_2", "M")
# The SongUNet arguments that EDM's constructor takes, in order (for positional _init_args).
_SONG_ARGS = [n for n in inspect.signature(SongUNet.__init__).parameters if n not in ("self", "attention_backend")]


@dataclass(frozen=True)
class EDMSnapshot:
    """An EDM / ECT ``network-snapshot-*.pkl`` read without running its code.

    ``model_kwargs`` are the inner network's constructor arguments: as EDM's persistence recorded
    them (``SongUNet._init_kwargs``), else rebuilt from the preconditioner's, else inferred from
    the tensor shapes (``kwargs_source`` says which). ``sigma_min``: ECMPrecond's boundary σ_min
    (ECT samples with f(x, σ_min) = x at 0.003); EDMPrecond's is a sampler hint (0)."""

    state_dict: dict[str, torch.Tensor]
    model_class: str  # "SongUNet"
    model_kwargs: dict[str, Any]
    kwargs_source: str
    precond: str | None  # "EDMPrecond", "ECMPrecond", None for a bare network
    sigma_data: float = 0.5
    sigma_min: float = 0.0
    sigma_max: float = float("inf")
    use_fp16: bool = False
    key: str = "ema"
    source: str = ""
    dataset_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def architecture(self) -> str:
        """``DDPM++``, ``NCSN++`` or ``SongUNet`` (another mix of embedding and encoder)."""
        emb = self.model_kwargs.get("embedding_type", "positional")
        enc = self.model_kwargs.get("encoder_type", "standard")
        return {("positional", "standard"): "DDPM++", ("fourier", "residual"): "NCSN++"}.get((emb, enc), "SongUNet")

    def describe(self) -> str:
        """One line: what the snapshot holds."""
        k = self.model_kwargs
        res, cin, cout = k.get("img_resolution"), k.get("in_channels", 3), k.get("out_channels", 3)
        cond = f"{k['label_dim']} classes" if k.get("label_dim") else "unconditional"
        wrapper = f"{self.precond}({self.model_class})" if self.precond else self.model_class
        parts = [
            f"{wrapper}: {self.architecture} ({k.get('embedding_type', 'positional')} embedding, "
            f"{k.get('encoder_type', 'standard')} encoder)",
            f"{res}×{res}, {cin}→{cout} channels",
            f"{k.get('model_channels', 128)} ch × {list(k.get('channel_mult', [1, 2, 2, 2]))}",
            f"{k.get('num_blocks', 4)} blocks",
            f"attention at {list(k.get('attn_resolutions', [16]))}",
            cond,
            f"augment_dim {k.get('augment_dim', 0)}",
            f"dropout {k.get('dropout', 'not recorded')}",
            f"σ_data {self.sigma_data:g}",
        ]
        if self.precond == "ECMPrecond":
            parts.append(f"boundary σ_min {self.sigma_min:g}")
        return ", ".join(parts) + f" ({self.kwargs_source})"


def _infer_song_kwargs(state: dict[str, torch.Tensor], name: str) -> dict[str, Any]:
    """SongUNet constructor arguments read off the tensor names and shapes (for pickles whose
    persistence did not record them). Dropout and label dropout leave no trace: not returned."""
    first = [m for k in state if (m := re.fullmatch(r"enc\.(\d+)x\1_conv\.weight", k))]
    if len(first) != 1 or "map_layer0.weight" not in state:
        raise ValueError(
            f"{name}: no constructor arguments recorded and the tensors do not look like EDM's SongUNet "
            "(no enc.RxR_conv.weight / map_layer0.weight)"
        )
    res = int(first[0].group(1))
    conv = state[first[0].group(0)]
    mc = conv.shape[0]
    levels = sorted({int(m.group(1)) for k in state if (m := re.match(r"enc\.(\d+)x\1_", k))}, reverse=True)

    def has(pattern: str) -> bool:
        return any(re.match(pattern, k) for k in state)

    emb = state["map_layer0.weight"]
    encoder = "standard"
    if has(r"enc\.\d+x\d+_aux_residual"):
        encoder = "residual"
    elif has(r"enc\.\d+x\d+_aux_skip"):
        encoder = "skip"
    kwargs: dict[str, Any] = dict(
        img_resolution=res,
        in_channels=conv.shape[1],
        out_channels=state[f"dec.{res}x{res}_aux_conv.weight"].shape[0],
        label_dim=state["map_label.weight"].shape[1] if "map_label.weight" in state else 0,
        augment_dim=state["map_augment.weight"].shape[1] if "map_augment.weight" in state else 0,
        model_channels=mc,
        channel_mult=[state[f"enc.{r}x{r}_block0.conv1.weight"].shape[0] // mc for r in levels],
        channel_mult_emb=emb.shape[0] // mc,
        num_blocks=len({m.group(1) for k in state if (m := re.match(rf"enc\.{res}x{res}_block(\d+)\.", k))}),
        attn_resolutions=[r for r in levels if has(rf"enc\.{r}x{r}_block\d+\.qkv\.")],
        embedding_type="fourier" if "map_noise.freqs" in state else "positional",
        channel_mult_noise=emb.shape[1] // mc,
        encoder_type=encoder,
        decoder_type="skip" if has(r"dec\.\d+x\d+_aux_up") else "standard",
    )
    filters = [v for k, v in state.items() if k.endswith(".resample_filter")]
    if filters:  # outer(f, f) / sum(f)²: its first row over its first entry is f
        row = filters[0][0, 0, 0].double()
        kwargs["resample_filter"] = [int(round(v)) for v in (row / row[0]).tolist()]
    return kwargs


def _model_kwargs(precond, inner, state, name) -> tuple[dict[str, Any], str]:
    d = inner.__dict__ if isinstance(inner, _Stub) else {}
    init_kwargs, init_args = d.get("_init_kwargs"), d.get("_init_args") or ()
    if isinstance(init_kwargs, dict):
        kwargs = {**dict(zip(_SONG_ARGS, _plain(list(init_args)))), **_plain(init_kwargs)}
        return kwargs, "constructor arguments recorded by EDM"
    pk = precond.__dict__.get("_init_kwargs") if isinstance(precond, _Stub) and precond is not inner else None
    if isinstance(pk, dict) and "img_channels" in pk:
        pk = _plain(pk)
        kwargs = {k: v for k, v in pk.items() if k not in _PRECOND_ONLY}
        kwargs.update(in_channels=pk["img_channels"], out_channels=pk["img_channels"])
        return kwargs, f"constructor arguments recorded by EDM for {_class_of(precond)}"
    return _infer_song_kwargs(state, name), "architecture inferred from the tensor shapes"


def read_edm_snapshot(path_or_file, key: str = "ema") -> EDMSnapshot:
    """Read an EDM / ECT snapshot (``dict(ema=EDMPrecond(SongUNet), …)`` as EDM's
    ``training_loop.py`` pickles it, or the published ``edm-*.pkl``) without running its code.

    Raises :class:`UnsafePickleError` for a global outside the allow-list and ``ValueError`` for
    what cm_nets cannot convert (VP / VE / iDDPM preconditioning, EDM's ADM ``DhariwalUNet``)."""
    data, name = _unpickle(path_or_file)
    where = f"{name}[{key!r}]" if isinstance(data, dict) else name
    top = _pick(data, key, name)
    top_class = _class_of(top)
    precond = None
    if top_class in _EDM_PRECONDS:
        precond = top_class
        inner = (top.__dict__.get("_modules") or {}).get("model")
        if inner is None:
            raise ValueError(f"{where}: {top_class} without its inner network (no 'model' submodule)")
    elif top_class in _OTHER_PRECONDS:
        raise ValueError(
            f"{where} is a {top_class} network (EDM's baseline-*.pkl / --precond={top_class[:2].lower()}): "
            f"its scalings and c_noise differ from EDM's, and cm_nets cannot convert it; {_SUPPORTED}"
        )
    elif top_class in ("SongUNet", "DhariwalUNet"):
        inner = top  # a bare network without preconditioning
    else:
        raise ValueError(f"{where} is a {top_class}, not an EDM network; {_SUPPORTED}")
    model_class = _class_of(inner)
    if model_class == "DhariwalUNet":
        raise ValueError(
            f"{where} holds EDM's ADM network (DhariwalUNet, e.g. edm-imagenet-64x64-cond-adm.pkl), which "
            f"cm_nets does not convert yet; {_SUPPORTED}"
        )
    if model_class != "SongUNet":
        raise ValueError(f"{where}: inner network {model_class!r} is not supported; {_SUPPORTED}")
    state = _tensors(inner)
    if not state:
        raise ValueError(f"{where}: no tensors found in the {model_class}")
    kwargs, source = _model_kwargs(top, inner, state, where)
    attrs = top.__dict__ if precond else {}

    def number(attr: str, default: float) -> float:
        value = _plain(attrs.get(attr, default))
        return float(value) if isinstance(value, (int, float)) else default

    dataset = data.get("dataset_kwargs") if isinstance(data, dict) else None
    return EDMSnapshot(
        state_dict=state,
        model_class=model_class,
        model_kwargs=kwargs,
        kwargs_source=source,
        precond=precond,
        sigma_data=number("sigma_data", 0.5),
        sigma_min=number("sigma_min", 0.003 if precond == "ECMPrecond" else 0.0),
        sigma_max=number("sigma_max", float("inf")),
        use_fp16=bool(_plain(attrs.get("use_fp16", False))),
        key=key,
        source=name,
        dataset_kwargs=_plain(dict(dataset)) if isinstance(dataset, dict) else {},
    )


def _same(a: Any, b: Any) -> bool:
    return _plain(a) == _plain(b)  # lists equal tuples, 0.13 equals np.float64(0.13)


def edm_architecture(snapshot: EDMSnapshot, preset: str | None = None, **overrides: Any) -> tuple[str, dict]:
    """(preset, constructor overrides) that rebuild the snapshot's network with :func:`cm_nets.create`.

    ``preset=None`` picks ``ncsnpp-cifar10`` for a Fourier embedding, else ``ddpmpp-cifar10``; a
    given preset must be a SongUNet preset with the snapshot's embedding type. Every recorded
    argument that differs from the preset (``augment_dim``, ``label_dim``, ``img_resolution``,
    ``channel_mult``, ``dropout``, …) becomes an override; ``overrides`` are applied last."""
    kwargs = dict(snapshot.model_kwargs)
    unknown = sorted(set(kwargs) - set(_SONG_ARGS))
    if unknown:
        raise ValueError(
            f"{snapshot.source}: EDM's SongUNet was built with argument(s) {unknown} that cm_nets' SongUNet "
            f"does not have (it takes {', '.join(_SONG_ARGS)})"
        )
    embedding = kwargs.get("embedding_type", "positional")
    chosen = "ncsnpp-cifar10" if embedding == "fourier" else "ddpmpp-cifar10"
    if preset is not None:
        if preset not in PRESETS or PRESETS[preset].factory is not SongUNet:
            songs = sorted(n for n, p in PRESETS.items() if p.factory is SongUNet)
            raise ValueError(f"preset {preset!r} is not a SongUNet preset; EDM snapshots load into {songs}")
        theirs = preset_config(preset).get("embedding_type", "positional")
        if theirs != embedding:
            raise ValueError(
                f"{snapshot.source} is {snapshot.architecture} ({embedding} embedding) but preset {preset!r} "
                f"uses a {theirs} embedding: use {chosen!r} or leave the preset out (it is read from the snapshot)"
            )
        chosen = preset
    signature = inspect.signature(SongUNet.__init__).parameters
    defaults = {n: p.default for n, p in signature.items() if n != "self"}
    defaults.update(preset_config(chosen))
    args = {k: _plain(v) for k, v in kwargs.items() if not _same(v, defaults.get(k, inspect.Parameter.empty))}
    return chosen, {**args, **overrides}


def from_edm(source, preset: str | None = None, *, key: str = "ema", **overrides: Any) -> nn.Module:
    """Build the SongUNet preset that matches an EDM / ECT ``.pkl`` snapshot and load its tensors
    with ``strict=True``.

    The architecture comes from the snapshot itself (:func:`read_edm_snapshot`): EDM's CIFAR-10
    networks were trained with ``augment_dim=9``, the conditional ones with ``label_dim=10``, and
    both reach the module's ``cm_nets_config`` so that :func:`cm_nets.save` / :func:`cm_nets.load`
    rebuild it. ``preset`` is an optional check; ``overrides`` (e.g. ``dropout=0.2``,
    ``attention_backend="math"``) replace recorded arguments. ``source`` may also be an
    :class:`EDMSnapshot` already read."""
    snap = source if isinstance(source, EDMSnapshot) else read_edm_snapshot(source, key=key)
    name, args = edm_architecture(snap, preset, **overrides)
    with torch.device("meta"):
        module = create(name, **args)
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in snap.state_dict.items()}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
    if missing or unexpected or wrong:
        problems = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
                problems.append(f"{label}: {', '.join(keys[:3])}{more}")
        raise ValueError(
            f"{snap.source}: the snapshot's tensors do not fit preset {name!r} with overrides {args} "
            f"({'; '.join(problems)}); check the preset / overrides you passed"
        )
    module = module.to_empty(device="cpu")
    module.load_state_dict(snap.state_dict, strict=True)
    return module

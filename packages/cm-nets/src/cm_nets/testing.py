"""Test helpers shared by cm-nets' tests and the packages above it (cm-train, cm-eval, tools): every
preset shrunk so that a forward pass takes milliseconds on CPU, matching inputs, and a writer of
pickles with the byte structure of EDM's network snapshots."""

from __future__ import annotations

import collections
import io
import pickle
import sys
import types
from dataclasses import dataclass, field

import numpy as np
import torch

ADM_SMALL = dict(image_size=16, model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,))
SONG_SMALL = dict(img_resolution=16, model_channels=32, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,))
EDM2_SMALL = dict(
    img_resolution=16,
    img_channels=3,
    model_channels=32,
    channel_mult=(1, 2),
    num_blocks=1,
    attn_resolutions=(8,),
    label_dim=10,
    channels_per_head=32,
)

# preset -> (overrides, input shape, needs labels, BCM)
SMALL = {
    "adm-imagenet64": (dict(ADM_SMALL), (2, 3, 16, 16), True, False),
    "adm-imagenet64-no32-qkv": (dict(ADM_SMALL), (2, 3, 16, 16), True, False),
    "adm-imagenet64-bcm": (dict(ADM_SMALL), (2, 3, 16, 16), True, True),
    "ddpmpp-cifar10": (dict(SONG_SMALL), (2, 3, 16, 16), False, False),
    "ncsnpp-cifar10": (dict(SONG_SMALL), (2, 3, 16, 16), False, False),
    "edm2-xs": (dict(EDM2_SMALL), (2, 3, 16, 16), True, False),
    "unet-tiny": ({}, (2, 1, 8, 8), False, False),
    "mlp-toy": (dict(hidden=32, depth=2), (3, 2), False, False),
}


def make_inputs(name: str, generator: torch.Generator | None = None, dtype: torch.dtype | None = None):
    """(x, c_noise, extra keyword arguments) for the shrunk preset ``name``."""
    _, shape, labels, bcm = SMALL[name]
    g = generator or torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    c_noise = torch.randn(shape[0], generator=g)
    kw = {}
    if labels:
        kw["class_labels"] = torch.randint(0, 10, (shape[0],), generator=g)
    if bcm:
        kw["c_noise_end"] = torch.randn(shape[0], generator=g)
    if dtype is not None:
        x = x.to(dtype)
    return x, c_noise, kw


# ---- EDM snapshots as EDM's own code pickles them (for the converter's tests) ----------------------
#
# EDM's ``torch_utils.persistence`` pickles each network object as
# ``_reconstruct_persistent_obj(dict(type="class", version=6, module_src=<source>, class_name=…, state=…))``
# where ``state`` is the object's ``__dict__`` (with ``_init_args`` / ``_init_kwargs``); plain
# ``torch.nn.ModuleDict`` containers pickle as usual, and ``training_loop.py`` writes
# ``dict(ema=…, loss_fn=…, augment_pipe=…, dataset_kwargs=…)``. The helpers below write that byte
# structure without EDM's code: stand-in modules exist in ``sys.modules`` only while pickling.

EDM_MODULE_SRC = "raise SystemExit('the pickled source code was executed')"


class EasyDict(dict):
    """Pickles as ``dnnlib.util.EasyDict``."""


EasyDict.__module__, EasyDict.__qualname__ = "dnnlib.util", "EasyDict"


@dataclass
class EDMRecord:
    """One persistent EDM object. For modules, give ``params`` / ``buffers`` / ``modules`` (ordered,
    None allowed as EDM has it) and attributes; ``init_kwargs`` becomes ``_init_kwargs``."""

    class_name: str
    attrs: dict = field(default_factory=dict)
    params: dict | None = None
    buffers: dict | None = None
    modules: dict | None = None
    init_kwargs: dict | None = None

    def state(self) -> dict:
        state = {}
        if self.params is not None or self.modules is not None or self.buffers is not None:
            params, modules = self.params or {}, self.modules or {}
            # torch.nn.Module.__setattr__ stores `self.bias = None` / `self.skip = None` as plain
            # attributes (a None buffer stays in _buffers).
            state.update({k: None for k, v in {**params, **modules}.items() if v is None})
            state.update(
                _module_state(
                    {k: v for k, v in params.items() if v is not None},
                    self.buffers or {},
                    {k: v for k, v in modules.items() if v is not None},
                )
            )
        state.update(self.attrs)
        # None: persistence with `_record_init_args = False`
        state["_init_args"] = None if self.init_kwargs is None else ()
        state["_init_kwargs"] = None if self.init_kwargs is None else dict(self.init_kwargs)
        return state


def edm_module_dict(modules: dict) -> torch.nn.ModuleDict:
    """A ``torch.nn.ModuleDict`` holding EDM records (``enc`` / ``dec``), pickled by torch's own
    reduction (``torch.nn.modules.container.ModuleDict`` + its ``__dict__``)."""
    container = torch.nn.ModuleDict.__new__(torch.nn.ModuleDict)
    container.__dict__.update(_module_state({}, {}, modules))
    return container


def edm_records(module: torch.nn.Module, init_kwargs: dict | None = None) -> EDMRecord:
    """A cm_nets SongUNet (or any module tree) as EDM records: one per module, named by its class
    (ours are EDM's: SongUNet, UNetBlock, Conv2d, Linear, GroupNorm, FourierEmbedding), ModuleDicts
    as torch pickles them, ``skip_scale`` as the numpy float64 EDM stores. ``init_kwargs`` go to the
    top record's ``_init_kwargs``."""

    def convert(m: torch.nn.Module, kwargs):
        if isinstance(m, torch.nn.ModuleDict):
            return edm_module_dict({k: convert(c, {}) for k, c in m._modules.items()})
        attrs = {"skip_scale": np.float64(m.skip_scale)} if hasattr(m, "skip_scale") else {}
        return EDMRecord(
            type(m).__name__,
            attrs=attrs,
            params=dict(m._parameters),
            buffers=dict(m._buffers),
            modules={k: None if c is None else convert(c, {}) for k, c in m._modules.items()},
            init_kwargs=kwargs,
        )

    return convert(module, init_kwargs)


def _module_state(params: dict, buffers: dict, modules: dict) -> dict:
    # torch.nn.Module.__dict__ as torch 2.x pickles it (hook dictionaries included).
    hooks = (
        "_backward_pre_hooks _backward_hooks _forward_hooks _forward_hooks_with_kwargs _forward_hooks_always_called "
        "_forward_pre_hooks _forward_pre_hooks_with_kwargs _state_dict_hooks _state_dict_pre_hooks "
        "_load_state_dict_pre_hooks _load_state_dict_post_hooks"
    ).split()
    state = {"training": False, "_non_persistent_buffers_set": set(), "_is_full_backward_hook": None}
    state.update({h: collections.OrderedDict() for h in hooks})
    state["_parameters"] = collections.OrderedDict(
        (k, torch.nn.Parameter(v.detach().float().clone(), requires_grad=False)) for k, v in params.items()
    )
    state["_buffers"] = collections.OrderedDict(
        (k, None if v is None else v.detach().float().clone()) for k, v in buffers.items()
    )
    state["_modules"] = collections.OrderedDict(modules)
    return state


def edm_snapshot_bytes(snapshot: dict, protocol: int = 4) -> bytes:
    """Pickle ``snapshot`` (a dict such as ``dict(ema=EDMRecord("EDMPrecond", …), …)``) with EDM's
    byte structure. Stand-in ``torch_utils.persistence`` and ``dnnlib.util`` modules are registered
    for the dump only; their ``_reconstruct_persistent_obj`` fails if anything ever calls it."""
    persistence = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):
        raise AssertionError("code from an EDM pickle ran")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    dnnlib_util = types.ModuleType("dnnlib.util")
    dnnlib_util.EasyDict = EasyDict
    standins = {
        "torch_utils": types.ModuleType("torch_utils"),
        "torch_utils.persistence": persistence,
        "dnnlib": types.ModuleType("dnnlib"),
        "dnnlib.util": dnnlib_util,
    }

    class Pickler(pickle.Pickler):
        def reducer_override(self, obj):
            if isinstance(obj, EDMRecord):
                meta = dict(
                    type="class", version=6, module_src=EDM_MODULE_SRC, class_name=obj.class_name, state=obj.state()
                )
                return _reconstruct_persistent_obj, (meta,)
            return NotImplemented

    saved = {name: sys.modules.get(name) for name in standins}
    sys.modules.update(standins)
    try:
        buf = io.BytesIO()
        Pickler(buf, protocol=protocol).dump(snapshot)
        return buf.getvalue()
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


class RunsShellCommand:
    """Pickles as a call of ``os.system``: what a safe loader must refuse (tests only; the command
    is harmless)."""

    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /dev/null",))


class RunsEval:
    """Pickles as a call of ``eval``: what a safe loader must refuse (tests only)."""

    def __reduce__(self):
        return (eval, ("__import__('os').getcwd()",))

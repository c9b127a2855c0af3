"""cm_nets: the networks of the consistency-model seeds, checkpoint-compatible.

A network maps ``(x_in, c_noise, class_labels=None, **cond) -> raw output`` (the shape of
``x_in``) and knows nothing of σ: ``cm_core`` wraps it into a consistency function. BCM
networks also take ``c_noise_end``.

Public API: ``create(name, **overrides)``, ``presets()``, ``describe(name)``,
``save(module, path)`` / ``load(path)`` (safetensors + JSON), ``from_openai(...)`` /
``from_edm(...)`` / ``read_edm_snapshot(...)`` (checkpoint converters), ``attention`` / ``available_backends()`` /
``set_attention_backend(module, name)``, and the classes ``ADMUNet``, ``SongUNet``,
``EDM2UNet``, ``MLPToy``.
"""

from __future__ import annotations

from torch import nn

from .adm import ADMUNet
from .backends import (
    BACKENDS,
    attention,
    attention_qkv,
    auto_choice,
    available_backends,
    check_backend,
    resolve_backend,
)
from .convert import (
    EDMSnapshot,
    UnsafePickleError,
    edm_architecture,
    from_edm,
    from_openai,
    read_edm_pickle,
    read_edm_snapshot,
    read_openai_checkpoint,
)
from .edm2 import EDM2UNet
from .presets import PRESETS, create, describe, fit_to_data, preset_config, presets
from .serialization import load, read_config, save
from .small import MLPToy
from .song import SongUNet

__version__ = "0.3.0"
__all__ = [
    "BACKENDS",
    "PRESETS",
    "ADMUNet",
    "EDM2UNet",
    "EDMSnapshot",
    "MLPToy",
    "SongUNet",
    "UnsafePickleError",
    "attention",
    "attention_qkv",
    "auto_choice",
    "available_backends",
    "count_parameters",
    "create",
    "describe",
    "fit_to_data",
    "edm_architecture",
    "from_edm",
    "from_openai",
    "load",
    "preset_config",
    "presets",
    "read_config",
    "read_edm_pickle",
    "read_edm_snapshot",
    "read_openai_checkpoint",
    "resolve_backend",
    "save",
    "set_attention_backend",
]


def set_attention_backend(module: nn.Module, name: str) -> nn.Module:
    """Switch every attention layer in ``module`` to backend ``name`` (see ``BACKENDS``)."""
    check_backend(name)
    for m in module.modules():
        if hasattr(m, "attention_backend"):
            m.attention_backend = name
    return module


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters (works on meta-device modules)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)

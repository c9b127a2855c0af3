"""Named presets: plain dictionaries of constructor arguments (EDM style), one factory each."""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .adm import ADMUNet
from .edm2 import EDM2UNet
from .small import MLPToy
from .song import SongUNet


@dataclass(frozen=True)
class Preset:
    name: str
    factory: type[nn.Module]
    kwargs: dict[str, Any]
    doc: str
    params: int | None = None  # exact trainable-parameter count at the preset's defaults
    extra: dict[str, Any] = field(default_factory=dict)


_ADM64 = dict(
    image_size=64,
    in_channels=3,
    out_channels=3,
    model_channels=192,
    channel_mult=(1, 2, 3, 4),
    num_res_blocks=3,
    num_head_channels=64,
    resblock_updown=True,
    num_classes=1000,
)
_SONG_CIFAR = dict(
    img_resolution=32, in_channels=3, out_channels=3, model_channels=128, channel_mult=(2, 2, 2), dropout=0.13
)
# The iCT/BCM ImageNet-64 network (BCM seed's ict_imagenet64_no32_qkv): no 32×32 attention,
# no scale-shift norm, cosine q/k/v, dropout only at 16/8 and the middle.
_ADM64_NO32_QKV = dict(
    _ADM64,
    attention_resolutions=(16, 8),
    use_scale_shift_norm=False,
    attention_normalize="qkv",
    dropout=0.0,
    dropout_highres=0.2,
)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            "ddpmpp-cifar10",
            SongUNet,
            dict(_SONG_CIFAR),
            "EDM DDPM++ CIFAR-10 32×32 (Karras et al. 2022, config F 'ddpmpp'; the ECT and CDM CIFAR-10 networks): "
            "SongUNet, positional embedding, standard encoder, filter [1,1], 128 ch × (2,2,2), 4 blocks, attention "
            "at 16×16, dropout 0.13. label_dim=10 for class-conditional (55,734,147 parameters); EDM trained with "
            "augment_dim=9 (+1,152).",
            55_732_739,
        ),
        Preset(
            "ncsnpp-cifar10",
            SongUNet,
            dict(
                _SONG_CIFAR,
                embedding_type="fourier",
                channel_mult_noise=2,
                encoder_type="residual",
                resample_filter=(1, 3, 3, 1),
            ),
            "EDM NCSN++ CIFAR-10 32×32 (Karras et al. 2022, 'ncsnpp'): SongUNet with Fourier embedding "
            "(2×128 ch), residual encoder, filter [1,3,3,1]; otherwise as ddpmpp-cifar10.",
            56_395_523,
        ),
        Preset(
            "adm-imagenet64",
            ADMUNet,
            dict(_ADM64, attention_resolutions=(32, 16, 8), use_scale_shift_norm=True, dropout=0.0),
            "ADM ImageNet-64 of openai/consistency_models (Song et al. 2023, CD/CT ImageNet-64 checkpoints): "
            "192 ch × (1,2,3,4), 3 res blocks, attention at 32/16/8 with 64 ch/head, scale-shift norm, resblock "
            "up/down, 1000 classes, learn_sigma=False. State dict = openai UNetModel (541 tensors). The "
            "published scripts train with dropout 0.1 (CD) / 0.0 (CT): pass dropout=….",
            295_899_267,
        ),
        Preset(
            "adm-imagenet64-no32-qkv",
            ADMUNet,
            _ADM64_NO32_QKV,
            "iCT ImageNet-64 as reproduced by the BCM seed (Li & He 2024, ict_imagenet64_no32_qkv_4096.sh): ADM "
            "without 32×32 attention, no scale-shift norm, normalized (cosine) q/k/v, dropout 0 at 64/32 and 0.2 "
            "at 16/8 and the middle.",
            278_023_107,
        ),
        Preset(
            "adm-imagenet64-bcm",
            ADMUNet,
            dict(_ADM64_NO32_QKV, bcm=True),
            "BCM ImageNet-64 (Li & He 2024, bcf_imagenet64_no32_qkv_4096.sh): adm-imagenet64-no32-qkv plus "
            "time_embed_end (copy of time_embed) and time_embed_align (Linear 1536→768, no bias, init [I | 0]); "
            "forward takes c_noise_end.",
            279_941_571,
        ),
        Preset(
            "edm2-xs",
            EDM2UNet,
            dict(img_resolution=64, img_channels=4, label_dim=1000, model_channels=128, dropout=0.0),
            "EDM2-XS (Karras et al. 2024, 'edm2-img512-xs'): magnitude-preserving UNet on 64×64×4 latents, 128 ch × "
            "(1,2,3,4), 3 blocks, attention at 16/8, 1000 classes (EDM2 reports 125M parameters).",
            124_713_125,
        ),
        Preset(
            "unet-tiny",
            ADMUNet,
            dict(
                image_size=8,
                in_channels=1,
                out_channels=1,
                model_channels=32,
                channel_mult=(1, 2, 2),
                num_res_blocks=1,
                attention_resolutions=(4,),
                num_head_channels=32,
                use_scale_shift_norm=True,
                resblock_updown=True,
                num_classes=None,
                dropout=0.0,
            ),
            "Small ADM UNet for the embedded digits dataset (scikit-learn's 8×8 grey digits; any size divisible "
            "by 4 runs, e.g. 16×16 or 32×32): 32 ch × (1,2,2), 1 res block per level, attention (two 32-ch heads) "
            "at the second level (4×4 for 8×8 input), scale-shift norm, resblock up/down. num_classes=10 makes it "
            "class-conditional. Trains in minutes on 2 CPU cores.",
            None,
        ),
        Preset(
            "mlp-toy",
            MLPToy,
            dict(dim=2, hidden=256, depth=4, emb_dim=64),
            "Residual MLP on [B, d] vectors with a sinusoidal noise embedding, for the Gaussian-mixture oracle and "
            "toy data (dim=… to change d).",
            None,
        ),
        Preset(
            "mlp-digits",
            MLPToy,
            dict(dim=64, hidden=512, depth=4, emb_dim=64, image_shape=(1, 8, 8)),
            "Residual MLP on flattened 8×8 grey images ([B, 1, 8, 8] in and out) for the embedded digits "
            "dataset; num_classes=10 makes it class-conditional. Used by `cm demo`: a training step costs a "
            "few ms on a CPU.",
            None,
        ),
    ]
}


def presets() -> list[str]:
    """Names of the presets, sorted."""
    return sorted(PRESETS)


def _get(name: str) -> Preset:
    if not isinstance(name, str) or name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(presets())}")
    return PRESETS[name]


def preset_config(name: str) -> dict[str, Any]:
    """The constructor arguments of a preset (a copy)."""
    return dict(_get(name).kwargs)


def describe(name: str) -> str:
    """Which paper / configuration the preset reproduces, and its parameter count."""
    p = _get(name)
    count = f" Parameters: {p.params:,}." if p.params is not None else ""
    return p.doc + count


def valid_arguments(name: str) -> list[str]:
    return [n for n in inspect.signature(_get(name).factory.__init__).parameters if n != "self"]


def create(name: str, **overrides: Any) -> nn.Module:
    """Build preset ``name`` with constructor arguments ``overrides`` replacing its defaults.

    The module remembers ``{"preset": name, "overrides": overrides}`` (``module.cm_nets_config``)
    so :func:`cm_nets.save` can write it and :func:`cm_nets.load` can rebuild it."""
    p = _get(name)
    valid = valid_arguments(name)
    bad = sorted(set(overrides) - set(valid))
    if bad:
        raise ValueError(f"preset {name!r} ({p.factory.__name__}) has no argument(s) {bad}; valid: {', '.join(valid)}")
    module = p.factory(**{**p.kwargs, **overrides})
    module.cm_nets_config = {"preset": name, "overrides": dict(overrides)}
    module.__doc__ = f"{name}: {describe(name)}\n\n{p.factory.__doc__ or ''}"
    return module


# Per architecture: the keys that must agree with the data. resolution / channels / classes keys,
# the value that means "unconditional", and the key listing attention resolutions (scaled with the
# image size when the data change it).
_DATA_KEYS = {
    "ADMUNet": ("image_size", ("in_channels", "out_channels"), "num_classes", None, "attention_resolutions"),
    "SongUNet": ("img_resolution", ("in_channels", "out_channels"), "label_dim", 0, "attn_resolutions"),
    "EDM2UNet": ("img_resolution", ("img_channels",), "label_dim", 0, "attn_resolutions"),
}


def fit_to_data(
    name: str, sample_shape: tuple[int, ...], num_classes: int, overrides: dict[str, Any]
) -> tuple[dict[str, Any], list[str]]:
    """Constructor arguments that size preset ``name`` for data of ``sample_shape`` ([C, H, W] images,
    or [D] vectors for the MLP) with ``num_classes`` classes (0: unconditional), for every such
    argument ``overrides`` does not set; and a list of "key old → new" notes for those that differ
    from the preset. ValueError, naming the key and the fix, when ``overrides`` sets one that does
    not fit the data. Values equal to the preset's are not returned (the built network is the same)."""
    p = _get(name)
    defaults = {
        k: v.default
        for k, v in inspect.signature(p.factory.__init__).parameters.items()
        if v.default is not inspect.Parameter.empty
    }
    preset = {**defaults, **p.kwargs}  # what the preset builds without overrides
    base = {**preset, **overrides}
    valid = set(valid_arguments(name))
    want: dict[str, Any] = {}
    arch = p.factory.__name__
    if arch in _DATA_KEYS:
        if len(sample_shape) != 3:
            raise ValueError(f"preset {name!r} takes images [C, H, W]; the data are {list(sample_shape)}")
        c, h, w = sample_shape
        if h != w:
            raise ValueError(f"preset {name!r} takes square images; the data are {h}×{w} (set data.resolution)")
        res_key, ch_keys, cls_key, uncond, attn_key = _DATA_KEYS[arch]
        want[res_key] = h
        want.update({k: c for k in ch_keys})
        want[cls_key] = num_classes if num_classes else uncond
        old_res = preset.get(res_key)
        if attn_key in valid and attn_key not in overrides and old_res and h != old_res and base.get(attn_key):
            want[attn_key] = tuple(max(1, int(r * h // old_res)) for r in base[attn_key])
    elif arch == "MLPToy":
        want["dim"] = int(math.prod(sample_shape))
        want["num_classes"] = num_classes or None
    hints = {"image_size": "data.resolution", "img_resolution": "data.resolution", "in_channels": "data.channels",
             "out_channels": "data.channels", "img_channels": "data.channels", "dim": "the data"}  # fmt: skip
    added, notes = {}, []
    for key, value in want.items():
        if key in overrides:
            given = overrides[key]
            same = (given or None) == (value or None) if key in ("num_classes", "label_dim") else given == value
            if not same:
                fix = hints.get(key, "data.conditional / data.num_classes")
                raise ValueError(
                    f"model.overrides.{key} = {given!r} does not fit the data ({_describe(sample_shape, num_classes)}, "
                    f"which needs {value!r}): drop the override to size the model from the data, or change {fix}"
                )
            continue
        if preset.get(key) != value:
            added[key] = value
            notes.append(f"{key} {preset.get(key)!r} -> {value!r}")
    return added, notes


def _describe(shape: tuple[int, ...], num_classes: int) -> str:
    what = f"{shape[0]}×{shape[1]}×{shape[2]} images" if len(shape) == 3 else f"{list(shape)} vectors"
    return f"{what}, {num_classes} classes" if num_classes else f"{what}, unconditional"

"""Test helpers shared by cm-nets' tests and the packages above it (cm-train, cm-eval): every
preset shrunk so that a forward pass takes milliseconds on CPU, and matching inputs."""

from __future__ import annotations

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

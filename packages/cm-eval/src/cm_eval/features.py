"""Feeding images to a feature extractor in batches, with streaming statistics.

Image conventions: uint8 arrays are NHWC (ADM reference batches, our .npz samples) or NCHW
tensors; float tensors are NCHW in [-1, 1] (the samplers' range). Each extractor states its
own input range; :func:`to_extractor_input` converts.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from .metrics import class_accuracy
from .stats import FeatureStats, frechet_distance

__all__ = ["to_uint8", "to_float", "extract", "compute_stats", "fd_digits", "digits_class_accuracy"]


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] float NCHW → uint8 NHWC, EDM's rounding: (x·127.5 + 128).clip(0, 255)."""
    if not torch.is_tensor(x) or not x.is_floating_point() or x.ndim != 4:
        raise ValueError("to_uint8 expects a float tensor [B, C, H, W] in [-1, 1]")
    return (x.detach().float() * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def to_float(images, value_range: tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
    """uint8 NHWC (numpy) or NCHW (tensor), or float NCHW in [-1, 1], → float32 NCHW in ``value_range``."""
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"numpy images must be uint8 NHWC, got {images.dtype} {images.shape}")
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    elif torch.is_tensor(images) and images.dtype == torch.uint8:
        x = images.float() / 255.0
    elif torch.is_tensor(images) and images.is_floating_point():
        x = (images.float() + 1) / 2
    else:
        raise TypeError(f"images must be uint8 NHWC numpy, uint8 NCHW or float NCHW tensors, got {type(images)}")
    lo, hi = value_range
    return x * (hi - lo) + lo


def _batches(images, batch_size: int) -> Iterable:
    if isinstance(images, (np.ndarray, torch.Tensor)):
        for i in range(0, len(images), batch_size):
            yield images[i : i + batch_size]
    else:
        yield from images  # any iterable of batches


@torch.no_grad()
def extract(extractor, images, *, key: str, value_range=(-1.0, 1.0), batch_size: int = 256, device=None):
    """Yield ``extractor(batch)[key]`` (float64, CPU) over batches of ``images``.

    ``images``: an array/tensor of images (see :func:`to_float`) or an iterable of batches.
    ``value_range``: what the extractor expects ((0, 1) for Inception/DINOv2, (−1, 1) for digits).
    """
    if device is None:  # the extractor's own device; CPU for one without parameters
        first = next(extractor.parameters(), None) if isinstance(extractor, torch.nn.Module) else None
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    for batch in _batches(images, batch_size):
        out = extractor(to_float(batch, value_range).to(device))
        if key not in out:
            raise KeyError(f"extractor returned keys {sorted(out)}, not {key!r}")
        yield out[key].double().cpu()


def compute_stats(
    extractor,
    images,
    *,
    key: str,
    value_range=(-1.0, 1.0),
    batch_size: int = 256,
    device=None,
    distributed: bool = False,
) -> FeatureStats:
    """Streaming mean/covariance of ``extractor``'s ``key`` features over ``images``.

    With ``distributed=True`` each rank passes its own share and the result is merged over ranks.
    """
    stats = None
    for feats in extract(extractor, images, key=key, value_range=value_range, batch_size=batch_size, device=device):
        stats = (stats or FeatureStats(feats.shape[1])).update(feats)
    if stats is None:
        raise ValueError("no images were given")
    return stats.all_reduce() if distributed else stats


def fd_digits(images, reference=None, *, classifier=None, batch_size: int = 512) -> float:
    """FD-digits: Fréchet distance of the digits classifier's 64-d features to the real digits.

    ``images`` as for :func:`to_float` ([-1, 1] floats, any size — resized to 8×8); ``reference``
    is a ``{"mu", "sigma"}`` dict or .npz path (default: the shipped all-1797-digits statistics).
    """
    from .digits_classifier import digits_reference_stats, load_digits_classifier
    from .stats import load_stats

    net = classifier if classifier is not None else load_digits_classifier()
    ref = (
        digits_reference_stats()
        if reference is None
        else (reference if isinstance(reference, dict) else load_stats(reference))
    )
    s = compute_stats(net, images, key="features", value_range=(-1.0, 1.0), batch_size=batch_size)
    return frechet_distance(s.mean(), s.cov(), ref["mu"], ref["sigma"])


@torch.no_grad()
def digits_class_accuracy(images, labels, *, classifier=None) -> float:
    """Accuracy of class-conditional digit samples: the classifier's argmax vs the requested class."""
    from .digits_classifier import load_digits_classifier

    net = classifier if classifier is not None else load_digits_classifier()
    return class_accuracy(net(to_float(images, (-1.0, 1.0)))["logits"], labels)

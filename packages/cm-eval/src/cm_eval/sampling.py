"""Deterministic sampling at scale: image i comes from its own seed (EDM's ``--seeds=0-49999``).

Every random number of image i — its initial noise z, its class label, every re-noising ε —
is drawn from ``torch.Generator().manual_seed(seed_i)`` on the CPU, in a fixed order. So an
image does not depend on the batch it lands in, on the number of ranks, on the device, or on
which images were already written when a run resumes.

Output: a folder of ``{seed:06d}.png`` files, or one ``.npz`` with ``arr_0`` (uint8 NHWC, as
ADM's sample batches), ``arr_1`` (labels, when class-conditional) and ``seeds``. Every file is
written atomically; an ``.npz`` run keeps per-batch shards in ``<out>.parts/`` until the end so
that it can resume too.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from cm_core import SAMPLERS, Sampler, get_sampler

from cm_nets.files import atomic_save_npz, save_png

from .features import to_uint8

__all__ = ["parse_seeds", "PerImageNoise", "SAMPLERS", "sample_batch", "generate"]


def parse_seeds(spec) -> list[int]:
    """Seeds from "0-49999", "0,3,10-19", an int N (meaning 0..N−1) or a list of ints; unique, in order."""
    if isinstance(spec, int):
        if spec < 1:
            raise ValueError(f"a seed count must be >= 1, got {spec}")
        return list(range(spec))
    if isinstance(spec, str):
        seeds = []
        for part in spec.split(","):
            m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
            if not m:
                raise ValueError(f"bad seed list {spec!r}: use e.g. '0-49999' or '0,5,10-19'")
            lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
            if hi < lo:
                raise ValueError(f"bad seed range {part!r}: end < start")
            seeds.extend(range(lo, hi + 1))
    else:
        seeds = [int(s) for s in spec]
    if len(set(seeds)) != len(seeds) or not seeds or min(seeds) < 0:
        raise ValueError("seeds must be non-empty, non-negative and unique")
    return seeds


class PerImageNoise:
    """One CPU generator per image; ``randn(shape)`` stacks one draw per image → [B, *shape].

    ``like`` is a noise source for cm_core's samplers and editors (``randn_like=noise.like``).
    """

    def __init__(self, seeds: Sequence[int]):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def randn(self, shape) -> torch.Tensor:
        return torch.stack([torch.randn(tuple(shape), generator=g) for g in self.generators])

    def randint(self, high: int) -> torch.Tensor:
        return torch.cat([torch.randint(high, (1,), generator=g) for g in self.generators])

    def like(self, x: torch.Tensor) -> torch.Tensor:
        return self.randn(x.shape[1:]).to(x)


# Deprecated in cm-eval 0.3, removed in 0.4: the sampler name "bcm" (BCM's jump chain, with zigzag
# rounds when zigzag= is given), now cm_core's bcm-ancestral / bcm-zigzag / bcm-mixture, and
# callables sampler(f, z, sigmas, noise, **options) that drew ε as noise.like(x).
_BCM = dataclasses.replace(SAMPLERS["bcm-mixture"], name="bcm", options={"zigzag": ()})


def _legacy(fn: Callable) -> Callable:
    def run(f, z, sigmas, *, randn_like, **options):
        return fn(f, z, sigmas, types.SimpleNamespace(like=randn_like), **options)

    return run


def _positional(fn: Callable) -> int:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return 3
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(p.kind in kinds and p.default is inspect.Parameter.empty for p in params)


def check_labels(labels, count: int, per: str = "seed") -> torch.Tensor | None:
    """Class labels as a long tensor with one entry per seed (or image), or None."""
    if labels is None:
        return None
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if len(labels) != count:
        raise ValueError(f"need one label per {per}: {len(labels)} labels for {count} {per}s")
    return labels


def resolve_sampler(sampler) -> Callable:
    """A sampler name of :data:`cm_core.SAMPLERS`, a :class:`cm_core.Sampler`, or a callable
    ``sampler(f, z, sigmas, *, randn_like, **options)`` → what :func:`sample_batch` calls."""
    if sampler == "bcm":
        warnings.warn(
            'sampler="bcm" is deprecated: use "bcm-ancestral", or "bcm-mixture" / "bcm-zigzag" with zigzag=',
            DeprecationWarning,
            stacklevel=3,
        )
        return _BCM
    if isinstance(sampler, (str, Sampler)):
        try:
            return get_sampler(sampler)
        except ValueError:
            raise ValueError(f"sampler must be one of {list(SAMPLERS)} or a callable, got {sampler!r}") from None
    if not callable(sampler):
        raise ValueError(f"sampler must be one of {list(SAMPLERS)} or a callable, got {sampler!r}")
    if _positional(sampler) >= 4:
        warnings.warn(
            "a sampler(f, z, sigmas, noise, **options) is deprecated: take randn_like= instead of noise "
            "(noise.like is passed as randn_like)",
            DeprecationWarning,
            stacklevel=3,
        )
        return _legacy(sampler)
    return sampler


def _check_sampler(sampler, sigmas) -> tuple[Callable, list[float]]:
    fn = resolve_sampler(sampler)
    sigmas = [float(s) for s in sigmas]
    if not sigmas or any(b >= a for a, b in zip(sigmas, sigmas[1:])) or sigmas[0] <= 0:
        raise ValueError(f"sigmas must be positive and strictly decreasing, got {sigmas}")
    return fn, sigmas


@torch.no_grad()
def sample_batch(
    f,
    seeds: Sequence[int],
    shape: Sequence[int],
    sigmas: Sequence[float],
    *,
    sampler="multistep",
    num_classes: int | None = None,
    labels: torch.Tensor | Sequence[int] | None = None,
    device="cpu",
    dtype=torch.float32,
    **options,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Samples [B, *shape] for ``seeds`` (and their labels when ``num_classes``), deterministic per seed.

    ``sampler``: a name of :data:`cm_core.SAMPLERS` (``options``: its options, e.g. ``renoise=``,
    ``zigzag=``), a :class:`cm_core.Sampler`, or a callable ``sampler(f, z, sigmas, *, randn_like,
    **options)``; it gets ``randn_like=`` the per-image noise. Draw order per image: z ~ N(0, I) of
    ``shape``, then the label (if any), then the sampler's ε. ``labels`` (one per seed) fixes the
    classes instead of drawing them; the draw order of z and ε stays the same, so image i with
    label c is the image a random draw of c would have given.
    """
    fn, sigmas = _check_sampler(sampler, sigmas)
    noise = PerImageNoise(seeds)
    z = noise.randn(shape).to(device, dtype)
    cond = dict(options.pop("cond", {}) or {})
    labels = check_labels(labels, len(seeds))
    if labels is not None:
        if num_classes is not None:
            noise.randint(num_classes)  # keep each image's draw order whether or not labels are given
            if labels.min() < 0 or labels.max() >= num_classes:
                raise ValueError(f"labels must lie in [0, {num_classes - 1}], got {labels.min()}..{labels.max()}")
        cond["class_labels"] = labels.to(device)
    elif num_classes is not None:
        labels = noise.randint(num_classes)
        cond["class_labels"] = labels.to(device)
    return fn(f, z, sigmas, randn_like=noise.like, **options, **cond), labels


def _dist_info():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), dist.barrier
    return 0, 1, lambda: None


def generate(
    f,
    out,
    *,
    seeds,
    shape: Sequence[int],
    sigmas: Sequence[float],
    sampler="multistep",
    batch_size: int = 64,
    num_classes: int | None = None,
    class_label: int | None = None,
    fmt: str | None = None,
    device="cpu",
    dtype=torch.float32,
    progress: Callable | None = None,
    **options,
) -> dict:
    """Generate one image per seed with ``f`` and write them to ``out``, resuming where it stopped.

    ``f``: the function the sampler takes (a consistency function f(x, σ, **cond), BCM's
    f(x, σ, σ_end) for the ``bcm-*`` samplers, a denoiser for ``heun``) returning images in
    [-1, 1]. ``sampler`` and ``options``: as :func:`sample_batch`. ``out``: a folder (PNG) or a
    path ending in ``.npz``. Seeds are dealt to ``torch.distributed`` ranks round-robin (rank r
    takes seeds[r::world]) when a process group is initialized; every rank must call this.
    ``class_label`` gives every image that class (else labels are drawn per seed when
    ``num_classes``). Returns counts and the path.
    """
    if class_label is not None and (num_classes is None or not 0 <= int(class_label) < num_classes):
        raise ValueError(f"class_label {class_label} needs a conditional model with more than {class_label} classes")
    seeds = parse_seeds(seeds)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    _check_sampler(sampler, sigmas)  # before any folder is made: a bad call leaves nothing behind
    out = Path(out)
    fmt = fmt or ("npz" if out.suffix == ".npz" else "png")
    if fmt not in ("png", "npz"):
        raise ValueError(f"fmt must be 'png' or 'npz', got {fmt!r}")
    rank, world, barrier = _dist_info()
    mine = seeds[rank::world]

    if fmt == "png":
        out.mkdir(parents=True, exist_ok=True)
        todo = [s for s in mine if not (out / f"{s:06d}.png").is_file()]
    else:
        if out.is_file():
            return {"written": 0, "skipped": len(mine), "path": str(out)}
        parts = out.with_name(out.name + ".parts")
        parts.mkdir(parents=True, exist_ok=True)
        done = set()
        for p in parts.glob("*.npz"):
            with np.load(p) as shard:
                done.update(int(s) for s in shard["seeds"])
        todo = [s for s in mine if s not in done]

    batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    for batch in progress(batches) if progress else batches:
        fixed = None if class_label is None else [int(class_label)] * len(batch)
        x, labels = sample_batch(
            f,
            batch,
            shape,
            sigmas,
            sampler=sampler,
            num_classes=num_classes,
            labels=fixed,
            device=device,
            dtype=dtype,
            **options,
        )
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"image output must be [B, 1|3, H, W]; the sampler returned {tuple(x.shape)}")
        images = to_uint8(x)
        if fmt == "png":
            for s, img in zip(batch, images):
                save_png(out / f"{s:06d}.png", img)
        else:
            extra = {} if labels is None else {"labels": labels.numpy()}
            atomic_save_npz(parts / f"rank{rank}-seed{batch[0]:06d}.npz", seeds=np.array(batch), images=images, **extra)
    barrier()

    if fmt == "npz" and rank == 0:
        by_seed, label_by_seed = {}, {}
        shard_files = sorted(parts.glob("*.npz"))
        for p in shard_files:
            with np.load(p) as shard:
                for i, s in enumerate(shard["seeds"]):
                    by_seed[int(s)] = shard["images"][i]
                    if "labels" in shard.files:
                        label_by_seed[int(s)] = int(shard["labels"][i])
        missing = [s for s in seeds if s not in by_seed]
        if missing:
            raise RuntimeError(f"{len(missing)} seeds have no image after generation (first: {missing[:5]})")
        arrays = {"arr_0": np.stack([by_seed[s] for s in seeds]), "seeds": np.array(seeds, np.int64)}
        if label_by_seed:
            arrays["arr_1"] = np.array([label_by_seed[s] for s in seeds], np.int64)
        atomic_save_npz(out, **arrays)
        for p in shard_files:
            p.unlink()
        parts.rmdir()
    barrier()
    return {"written": len(todo), "skipped": len(mine) - len(todo), "path": str(out)}

"""Sweeps and reports: a metric vs NFE over σ schedules, the ternary search for the best
intermediate σ of 2-step sampling, a JSON of every number and matplotlib plots.

The 2-step search follows the consistency-model papers (openai's ``ternary_search`` over the
grid index; BCM's search for the middle σ, 2.4 on ImageNet-64; ECT's 0.821 on CIFAR-10): the
metric is assumed unimodal in the middle σ, and we search in ln σ.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from cm_core import Sampler

from cm_nets.files import atomic_write_bytes, atomic_write_json, image_grid, save_png

from .features import to_uint8
from .sampling import check_labels, parse_seeds, resolve_sampler, sample_batch

__all__ = [
    "sample_images",
    "nfe_sweep",
    "ternary_search",
    "best_two_step_sigma",
    "write_report",
    "plot_metric_vs_nfe",
    "save_sample_grid",
]


@torch.no_grad()
def sample_images(
    f, *, seeds, shape, sigmas, sampler="multistep", batch_size: int = 256, labels=None, progress=None, **options
) -> torch.Tensor:
    """All images for ``seeds`` in memory ([N, *shape], CPU): for small evaluations and sweeps.
    ``labels``: one class per seed for a conditional ``f`` (sliced with the batches);
    ``progress``: wraps the batch iterator (e.g. tqdm)."""
    seeds = parse_seeds(seeds)
    labels = check_labels(labels, len(seeds))
    return torch.cat(
        [
            sample_batch(
                f,
                seeds[i : i + batch_size],
                shape,
                sigmas,
                sampler=sampler,
                labels=None if labels is None else labels[i : i + batch_size],
                **options,
            )[0].cpu()
            for i in _wrap(progress, range(0, len(seeds), batch_size))
        ]
    )


def _wrap(progress, iterable):
    return progress(iterable) if progress else iterable


def nfe_sweep(
    f,
    metric: Callable[[torch.Tensor], float],
    schedules: Mapping[str, Sequence[Sequence[float]]],
    *,
    seeds,
    shape,
    sampler="multistep",
    batch_size: int = 256,
    progress=None,
    **options,
) -> dict:
    """Evaluate ``metric(samples)`` for every σ list of every named schedule (``progress`` wraps
    the iterator over all σ lists, e.g. tqdm).

    ``schedules``: {"name": [[80.0], [80.0, 0.8], …]}; NFE as the sampler counts it
    (:meth:`cm_core.Sampler.nfe`: one per σ for multistep, jumps and zigzag rounds for BCM's; a
    callable sampler: len(σ list)). The same seeds are used throughout, so differences between
    schedules are not sampling noise of z.
    Returns {"name": [{"nfe", "sigmas", "metric"}, …]}.
    """
    spec = resolve_sampler(sampler)
    out = {name: [] for name in schedules}
    todo = [(name, sigmas) for name, lists in schedules.items() for sigmas in lists]
    for name, sigmas in _wrap(progress, todo):
        x = sample_images(f, seeds=seeds, shape=shape, sigmas=sigmas, sampler=spec, batch_size=batch_size, **options)
        nfe = spec.nfe(sigmas, **options) if isinstance(spec, Sampler) else len(sigmas)
        out[name].append({"nfe": nfe, "sigmas": [float(s) for s in sigmas], "metric": float(metric(x))})
    return out


def ternary_search(
    objective: Callable[[float], float], lo: float, hi: float, *, iters: int = 12, log_space: bool = True
) -> dict:
    """Minimize a unimodal ``objective`` on [lo, hi] (in ln σ when ``log_space``).

    Each iteration evaluates two interior points and drops the outer third next to the worse
    one; evaluations are cached. Returns {"best", "best_value", "evaluations": [(x, value), …]}.
    """
    if not (lo < hi) or (log_space and lo <= 0):
        raise ValueError(f"need 0 < lo < hi for a log-space search (lo < hi otherwise), got lo={lo}, hi={hi}")
    fwd, inv = (math.log, math.exp) if log_space else (float, float)
    a, b = fwd(lo), fwd(hi)
    seen: dict[float, float] = {}

    def value(u):
        x = inv(u)
        if x not in seen:
            seen[x] = float(objective(x))
        return seen[x]

    for _ in range(iters):
        m1, m2 = a + (b - a) / 3, b - (b - a) / 3
        if value(m1) <= value(m2):
            b = m2
        else:
            a = m1
    value((a + b) / 2)
    best = min(seen, key=seen.get)
    return {"best": best, "best_value": seen[best], "evaluations": sorted(seen.items())}


def best_two_step_sigma(
    f,
    metric: Callable[[torch.Tensor], float],
    *,
    seeds,
    shape,
    sigma_max: float = 80.0,
    lo: float = 0.05,
    hi: float = 20.0,
    iters: int = 8,
    sampler="multistep",
    sigma_end: float = 0.002,
    **options,
) -> dict:
    """Ternary search for the middle σ of 2-step sampling [σ_max, σ_mid] (BCM's chains, which end
    at their last σ: [σ_max, σ_mid, σ_end])."""
    spec = resolve_sampler(sampler)
    tail = [sigma_end] if isinstance(spec, Sampler) and spec.jumps else []

    def objective(mid):
        return metric(
            sample_images(f, seeds=seeds, shape=shape, sigmas=[sigma_max, mid, *tail], sampler=spec, **options)
        )

    return ternary_search(objective, lo, hi, iters=iters)


def write_report(path, report: dict) -> Path:
    """The JSON of all numbers (atomically; NaN/inf written as strings so the file stays valid JSON)."""

    def clean(o):
        if isinstance(o, dict):
            return {str(k): clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        if isinstance(o, (np.floating, float)):
            return float(o) if math.isfinite(o) else str(float(o))
        if isinstance(o, np.integer):
            return int(o)
        return o

    return atomic_write_json(path, clean(report))


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("plots need matplotlib: pip install 'cm-eval[plots]'") from e
    return plt


def plot_metric_vs_nfe(
    sweep: dict, path, *, metric_name: str = "FD", title: str | None = None, log_y: bool = False
) -> Path:
    """PNG of metric vs NFE, one line per schedule of an :func:`nfe_sweep` result."""
    import io

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for name, rows in sweep.items():
        rows = sorted(rows, key=lambda r: r["nfe"])
        ax.plot([r["nfe"] for r in rows], [r["metric"] for r in rows], marker="o", label=name)
    ax.set_xlabel("NFE")
    ax.set_ylabel(metric_name)
    if log_y:
        ax.set_yscale("log")
    ax.set_title(title or f"{metric_name} vs NFE")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def save_sample_grid(images: torch.Tensor, path, *, ncol: int = 8, pad: int = 1) -> Path:
    """A PNG grid of float images [N, C, H, W] in [-1, 1] (no matplotlib needed)."""
    return save_png(path, image_grid(to_uint8(images), ncol=ncol, pad=pad))

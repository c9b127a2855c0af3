"""ODE solving error (Direct CM, Kim et al. 2024): how far a consistency model's samples are from
the teacher's PF-ODE solution started from the *same* noise.

Image i starts from z_i ~ N(0, I) drawn from generator seed i (as in :mod:`cm_eval.sampling`).
The teacher solves dx/dσ = (x − D(x, σ))/σ from σ_max·z_i along ``teacher_sigmas`` (Heun, EDM
Algorithm 1) once; its endpoints are cached in an .npz keyed by seeds, shape, σ list and method.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from cm_core import karras_sigmas, solve
from cm_nets.files import atomic_save_npz

from .sampling import PerImageNoise, check_labels, parse_seeds, sample_batch

__all__ = ["teacher_solutions", "ode_solving_error", "default_teacher_sigmas"]


def default_teacher_sigmas(n: int = 80, sigma_min: float = 0.002, sigma_max: float = 80.0) -> list[float]:
    """A descending Karras grid σ_max → σ_min with n points (ρ = 7)."""
    return karras_sigmas(n, sigma_min=sigma_min, sigma_max=sigma_max).flip(0).tolist()


@torch.no_grad()
def teacher_solutions(
    denoiser,
    *,
    seeds,
    shape: Sequence[int],
    teacher_sigmas: Sequence[float],
    method: str = "heun",
    cache: str | Path | None = None,
    batch_size: int = 64,
    labels=None,
    progress=None,
    device="cpu",
    dtype=torch.float32,
    **cond,
) -> torch.Tensor:
    """The teacher's ODE endpoints for ``seeds`` [N, *shape], computed once and cached in ``cache``.

    A cache made for other seeds, shape, σ list or method raises ValueError (delete it or use
    another path) rather than being silently reused.
    """
    seeds = parse_seeds(seeds)
    labels = check_labels(labels, len(seeds))
    ts = [float(s) for s in teacher_sigmas]
    key = {
        "seeds": np.array(seeds, np.int64),
        "shape": np.array(list(shape), np.int64),
        "teacher_sigmas": np.array(ts, np.float64),
        "method": np.array(method),
    }
    if labels is not None:
        key["labels"] = labels.numpy()
    if cache is not None and Path(cache).is_file():
        with np.load(cache) as f:
            for k, v in key.items():
                if k not in f.files or f[k].shape != v.shape or not np.array_equal(f[k], v):
                    raise ValueError(
                        f"teacher cache {cache} was made for a different {k}; delete it or pass another cache path"
                    )
            return torch.from_numpy(f["x"])
    out = []
    starts = range(0, len(seeds), batch_size)
    for i in progress(starts) if progress else starts:
        z = PerImageNoise(seeds[i : i + batch_size]).randn(shape).to(device, dtype)
        batch_cond = dict(cond)
        if labels is not None:
            batch_cond["class_labels"] = labels[i : i + batch_size].to(device)
        out.append(solve(denoiser, ts[0] * z, ts, method=method, **batch_cond).float().cpu())
    x = torch.cat(out)
    if cache is not None:
        atomic_save_npz(cache, x=x.numpy(), **key)
    return x


@torch.no_grad()
def ode_solving_error(
    f,
    denoiser,
    *,
    seeds,
    shape: Sequence[int],
    student_sigmas: Sequence[float] = (80.0,),
    teacher_sigmas: Sequence[float] | None = None,
    method: str = "heun",
    cache: str | Path | None = None,
    batch_size: int = 64,
    renoise: str = "cm",
    metric: Callable[[torch.Tensor], float] | None = None,
    labels=None,
    progress=None,
    device="cpu",
    dtype=torch.float32,
    sampler: str | None = None,
    sampler_options: dict | None = None,
    **cond,
) -> dict:
    """Distance between the student's k-step samples (k = len(student_sigmas)) and the teacher's
    ODE solution from the same noise.

    ``sampler``: the student's registered sampler with ``student_sigmas`` as its list (e.g.
    "trigflow" times, "meanflow" times) and ``sampler_options``; default: onestep for one σ, else
    multistep with ``renoise``.

    Returns ``{"mse"`` (per element, mean over images), ``"rmse"``, ``"l2"`` (mean per-image L2
    norm), ``"mse_per_image"``, and, when ``metric`` (images → float, e.g. FD-digits) is given,
    ``"metric_student"`` and ``"metric_teacher"``}. ``labels``: one class per seed (conditional models);
    ``progress`` wraps the teacher's batch iterator (the long part).
    """
    seeds = parse_seeds(seeds)
    labels = check_labels(labels, len(seeds))
    teacher_sigmas = default_teacher_sigmas() if teacher_sigmas is None else teacher_sigmas
    x_teacher = teacher_solutions(
        denoiser,
        seeds=seeds,
        shape=shape,
        teacher_sigmas=teacher_sigmas,
        method=method,
        cache=cache,
        batch_size=batch_size,
        labels=labels,
        progress=progress,
        device=device,
        dtype=dtype,
        **cond,
    )
    if sampler is None:
        sampler = "onestep" if len(student_sigmas) == 1 else "multistep"
        extra = {} if sampler == "onestep" else {"renoise": renoise}
    else:
        extra = dict(sampler_options or {})
    x_student = torch.cat(
        [
            sample_batch(
                f,
                seeds[i : i + batch_size],
                shape,
                student_sigmas,
                sampler=sampler,
                labels=None if labels is None else labels[i : i + batch_size],
                device=device,
                dtype=dtype,
                cond=cond,
                **extra,
            )[0]
            .float()
            .cpu()
            for i in range(0, len(seeds), batch_size)
        ]
    )
    diff = (x_student.double() - x_teacher.double()).flatten(1)
    per_image = diff.square().mean(1)
    result = {
        "mse": per_image.mean().item(),
        "rmse": per_image.mean().sqrt().item(),
        "l2": diff.norm(dim=1).mean().item(),
        "mse_per_image": per_image.tolist(),
        "num_images": len(seeds),
        "student_sigmas": [float(s) for s in student_sigmas],
        "teacher_nfe": (2 if method == "heun" else 1) * (len(teacher_sigmas) - 1),
    }
    if metric is not None:
        result["metric_student"] = float(metric(x_student))
        result["metric_teacher"] = float(metric(x_teacher))
    return result

"""PF-ODE solvers for a diffusion denoiser D(x, σ) (EDM, Karras et al. 2022, Algorithms 1-2).

The ODE is dx/dσ = (x − D(x, σ))/σ. Every function works on tensors of any shape [B, ...].
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from . import _validate as check
from ._random import NoiseSource, noise_source

__all__ = ["euler_step", "heun_step", "solve", "SOLVERS"]

Denoiser = Callable[..., torch.Tensor]


def _times(t, x: torch.Tensor, name: str, allow_zero: bool) -> torch.Tensor:
    """A σ given as a float or per sample [B], as a float64 tensor [B]."""
    t = check.sigma_tensor(name, t).to(device=x.device, dtype=torch.float64)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"{name} must be a scalar or have shape [B] = [{x.shape[0]}], got {tuple(t.shape)}")
    if not allow_zero and (t <= 0).any():
        raise ValueError(f"{name} must be > 0 (the PF-ODE is singular at σ = 0)")
    return t


def _d(denoiser: Denoiser, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
    """The ODE direction d = (x − D(x, t))/t (EDM Algorithm 1, line 4)."""
    return (x - denoiser(x, t, **cond)) / check.bcast(t, x)


def euler_step(denoiser: Denoiser, x: torch.Tensor, t_cur, t_next, **cond) -> torch.Tensor:
    """One Euler step x_next = x + (t_next − t_cur)·d(x, t_cur). Times: floats or per sample [B]."""
    t_cur = _times(t_cur, x, "t_cur", allow_zero=False)
    t_next = _times(t_next, x, "t_next", allow_zero=True)
    return x + check.bcast(t_next - t_cur, x) * _d(denoiser, x, t_cur, **cond)


def heun_step(denoiser: Denoiser, x: torch.Tensor, t_cur, t_next, **cond) -> torch.Tensor:
    """One Heun step (EDM Algorithm 1, lines 5-8); Euler where t_next = 0."""
    t_cur = _times(t_cur, x, "t_cur", allow_zero=False)
    t_next = _times(t_next, x, "t_next", allow_zero=True)
    h = check.bcast(t_next - t_cur, x)
    d_cur = _d(denoiser, x, t_cur, **cond)
    x_next = x + h * d_cur
    final = t_next == 0
    if final.all():
        return x_next
    # Evaluate the corrector at a harmless σ where the step ends at 0, then keep Euler there.
    t_eval = torch.where(final, t_cur, t_next)
    d_prime = _d(denoiser, x_next, t_eval, **cond)
    x_heun = x + h * (0.5 * d_cur + 0.5 * d_prime)
    return torch.where(check.bcast(final, x).bool(), x_next, x_heun)


SOLVERS = {"euler": euler_step, "heun": heun_step}


def solve(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: Sequence[float] | torch.Tensor,
    *,
    method: str = "heun",
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    generator: torch.Generator | None = None,
    randn_like: NoiseSource | None = None,
    progress: Callable | None = None,
    **cond,
) -> torch.Tensor:
    """Integrate the PF-ODE from sigmas[0] through each following σ (EDM Algorithm 2).

    ``sigmas`` may descend (sampling; may end at 0) or ascend (inversion, no churn). With
    ``s_churn > 0`` (descending only) noise is added first: γ = min(S_churn/N, √2 − 1) for
    σ in [S_tmin, S_tmax], t_hat = σ·(1 + γ), x_hat = x + √(t_hat² − σ²)·S_noise·ε, with ε from
    ``randn_like(x)`` (EDM's argument) when given, else from ``generator``.
    ``progress`` wraps the step iterator (e.g. tqdm) for long solves.
    """
    try:
        step = SOLVERS[method]
    except KeyError:
        raise ValueError(f"method must be one of {sorted(SOLVERS)}, got {method!r}") from None
    ts = check.sigma_list("sigmas", sigmas, decreasing=False)
    if len(ts) < 2:
        raise ValueError(f"sigmas must hold at least 2 values (start and end), got {ts}")
    descending = all(b < a for a, b in zip(ts, ts[1:]))
    ascending = all(b > a for a, b in zip(ts, ts[1:]))
    if not (descending or ascending):
        raise ValueError(f"sigmas must be strictly monotone, got {ts}")
    s_churn = check.non_negative("s_churn", s_churn)
    if s_churn > 0 and not descending:
        raise ValueError("s_churn > 0 needs descending sigmas (stochastic sampling)")
    eps_like = noise_source(generator, randn_like)
    n = len(ts) - 1
    pairs = list(zip(ts[:-1], ts[1:]))
    for t_cur, t_next in progress(pairs) if progress else pairs:
        if s_churn > 0 and s_tmin <= t_cur <= s_tmax:
            gamma = min(s_churn / n, math.sqrt(2) - 1)
            t_hat = t_cur * (1 + gamma)
            eps = eps_like(x)
            x = x + math.sqrt(t_hat**2 - t_cur**2) * s_noise * eps
            t_cur = t_hat
        if t_cur == 0:
            raise ValueError("an ascending solve cannot start at σ = 0 (the ODE is singular there)")
        x = step(denoiser, x, t_cur, t_next, **cond)
    return x

"""The Jacobian-vector products the continuous-time objectives take: exact forward-mode AD
(``torch.func.jvp``) or a central finite difference for networks/backends without forward-mode AD."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

JVP_MODES = ("exact", "fd")


def check_mode(mode: str, eps: float) -> tuple[str, float]:
    if mode not in JVP_MODES:
        raise ValueError(f"jvp must be 'exact' (torch.func.jvp) or 'fd' (central finite difference), got {mode!r}")
    if not eps > 0:
        raise ValueError(f"fd_eps must be > 0, got {eps}")
    return mode, float(eps)


def jvp(fn: Callable, primals: Sequence[torch.Tensor], tangents: Sequence[torch.Tensor], mode: str = "exact",
        eps: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(fn(*primals), d/dh fn(primals + h·tangents) at h = 0).

    "exact": ``torch.func.jvp`` (the primal output carries gradients to fn's parameters). "fd":
    (fn(p + ε·t) − fn(p − ε·t)) / 2ε without gradients, plus fn(p) with them; error O(ε²)."""
    if mode == "exact":
        return torch.func.jvp(fn, tuple(primals), tuple(tangents))
    out = fn(*primals)
    with torch.no_grad():
        plus = fn(*(p + eps * t for p, t in zip(primals, tangents)))
        minus = fn(*(p - eps * t for p, t in zip(primals, tangents)))
    return out, (plus - minus) / (2 * eps)

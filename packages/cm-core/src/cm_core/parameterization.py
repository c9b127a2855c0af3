"""How a raw network F becomes a consistency function f or a diffusion denoiser D.

The network maps (x_in, c_noise, **cond) → raw output and knows nothing of σ; the scalings
live here, exactly where EDM's preconditioning puts them (Karras et al. 2022, Table 1).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from . import _validate as check

__all__ = [
    "consistency_scalings",
    "edm_scalings",
    "bcm_scalings",
    "c_noise",
    "C_NOISE_CONVENTIONS",
    "ConsistencyFunction",
    "BidirectionalConsistencyFunction",
    "EDMDenoiser",
]


def consistency_scalings(sigma, sigma_data: float = 0.5, sigma_min: float = 0.002):
    """(c_skip, c_out, c_in) with the boundary shift of Song et al. (2023), Appendix C.

    c_skip = σ_d² / ((σ − σ_min)² + σ_d²), c_out = (σ − σ_min)·σ_d / √(σ² + σ_d²),
    c_in = 1/√(σ² + σ_d²); at σ = σ_min: c_skip = 1 and c_out = 0 exactly, so f(x, σ_min) = x.
    """
    sigma_data = check.positive("sigma_data", sigma_data)
    sigma_min = check.non_negative("sigma_min", sigma_min)
    sigma = check.sigma_tensor("sigma", sigma)
    root = (sigma**2 + sigma_data**2).sqrt()
    c_skip = sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)
    c_out = (sigma - sigma_min) * sigma_data / root
    c_in = 1 / root
    return c_skip, c_out, c_in


def edm_scalings(sigma, sigma_data: float = 0.5):
    """EDM preconditioning (Karras et al. 2022, Table 1): the σ_min = 0 case of the above."""
    return consistency_scalings(sigma, sigma_data, sigma_min=0.0)


def bcm_scalings(sigma, sigma_end, sigma_data: float = 0.5):
    """Scalings of a bidirectional jump σ → σ_end (Li et al. 2024, BCM).

    c_skip = (σ·σ_end + σ_d²)/(σ² + σ_d²), c_out = (σ − σ_end)·σ_d/√(σ² + σ_d²), c_in = 1/√(σ² + σ_d²).
    σ_end = σ gives the identity (c_skip = 1, c_out = 0); σ_end = 0 gives EDM's denoiser.
    """
    sigma_data = check.positive("sigma_data", sigma_data)
    sigma = check.sigma_tensor("sigma", sigma)
    sigma_end = check.sigma_tensor("sigma_end", sigma_end, like=sigma)
    root = (sigma**2 + sigma_data**2).sqrt()
    c_skip = (sigma * sigma_end + sigma_data**2) / (sigma**2 + sigma_data**2)
    c_out = (sigma - sigma_end) * sigma_data / root
    c_in = 1 / root
    return c_skip, c_out, c_in


def _c_noise_edm(sigma: torch.Tensor) -> torch.Tensor:
    return sigma.log() / 4


def _c_noise_openai(sigma: torch.Tensor) -> torch.Tensor:
    # openai/consistency_models feeds 1000·0.25·log(σ + 1e-44) into its sinusoidal embedding.
    return 1000 * 0.25 * (sigma + 1e-44).log()


C_NOISE_CONVENTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "edm": _c_noise_edm,
    "openai": _c_noise_openai,
}


def c_noise(sigma, convention: str = "edm") -> torch.Tensor:
    """The network's noise input: ``"edm"`` ln(σ)/4 (EDM, ECT), ``"openai"`` 250·ln(σ+1e-44) (CM, iCT, BCM)."""
    try:
        fn = C_NOISE_CONVENTIONS[convention]
    except KeyError:
        raise ValueError(f"c_noise must be one of {sorted(C_NOISE_CONVENTIONS)}, got {convention!r}") from None
    return fn(check.sigma_tensor("sigma", sigma))


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # Scalings in at least fp32 (as EDM does) even when the network runs in half precision.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _per_sample_sigma(sigma, x: torch.Tensor) -> torch.Tensor:
    sigma = check.sigma_tensor("sigma", sigma, like=x).to(device=x.device, dtype=_compute_dtype(x))
    if sigma.ndim == 0:
        return sigma.expand(x.shape[0])
    if sigma.ndim == 1 and sigma.shape[0] == x.shape[0]:
        return sigma
    raise ValueError(f"sigma must be a scalar or have shape [B] = [{x.shape[0]}], got {tuple(sigma.shape)}")


class _Wrapper(nn.Module):
    def __init__(self, net: nn.Module, sigma_data: float, c_noise: str):
        super().__init__()
        if c_noise not in C_NOISE_CONVENTIONS:
            raise ValueError(f"c_noise must be one of {sorted(C_NOISE_CONVENTIONS)}, got {c_noise!r}")
        self.net = net
        self.sigma_data = check.positive("sigma_data", sigma_data)
        self.c_noise = c_noise

    def _check_x(self, x: torch.Tensor) -> None:
        if not torch.is_tensor(x) or x.ndim < 1 or x.shape[0] == 0:
            raise ValueError("x must be a tensor of shape [B, ...] with B >= 1")

    def _apply(self, x, sigma, scalings, **cond):
        c_skip, c_out, c_in = (check.bcast(s, x, cast=False) for s in scalings)
        noise_in = C_NOISE_CONVENTIONS[self.c_noise](sigma)
        x_c = x.to(c_in.dtype)
        raw = self.net((c_in * x_c).to(x.dtype), noise_in, **cond)
        if raw.shape != x.shape:
            raise ValueError(f"the network returned shape {tuple(raw.shape)} for input {tuple(x.shape)}")
        raw = raw.to(c_in.dtype)
        # Where c_out == 0 (σ at the boundary) f(x, σ) = x must hold exactly, even when the network
        # is non-finite there (EDM's c_noise at σ = 0 is ln(0)/4 = −inf, and 0·nan = nan).
        raw = torch.where((c_out == 0) & ~torch.isfinite(raw), torch.zeros_like(raw), raw)
        return (c_skip * x_c + c_out * raw).to(x.dtype), noise_in


class ConsistencyFunction(_Wrapper):
    """f(x, σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x, c_noise(σ)) with f(x, σ_min) = x exactly.

    ``boundary="shifted"`` uses the consistency-model scalings (CM, iCT, BCM); ``"edm"`` the
    plain EDM ones (ECT trains with those; f(x, 0) = x then holds at σ = 0).
    """

    def __init__(
        self,
        net: nn.Module,
        sigma_data: float = 0.5,
        sigma_min: float = 0.002,
        c_noise: str = "edm",
        boundary: str = "shifted",
    ):
        super().__init__(net, sigma_data, c_noise)
        if boundary not in ("shifted", "edm"):
            raise ValueError(f"boundary must be 'shifted' or 'edm', got {boundary!r}")
        self.sigma_min = check.non_negative("sigma_min", sigma_min)
        self.boundary = boundary

    def scalings(self, sigma: torch.Tensor):
        shift = self.sigma_min if self.boundary == "shifted" else 0.0
        return consistency_scalings(sigma, self.sigma_data, shift)

    def forward(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        self._check_x(x)
        sigma = _per_sample_sigma(sigma, x)
        return self._apply(x, sigma, self.scalings(sigma), **cond)[0]


class BidirectionalConsistencyFunction(_Wrapper):
    """BCM's f(x, σ, σ_end): one network that jumps along the PF-ODE in either direction.

    The network receives the end time as the keyword ``c_noise_end`` (same convention as
    ``c_noise``). ``f(x, σ)`` with no end time jumps to σ_min, i.e. acts as a consistency function.
    """

    def __init__(self, net: nn.Module, sigma_data: float = 0.5, sigma_min: float = 0.002, c_noise: str = "openai"):
        super().__init__(net, sigma_data, c_noise)
        self.sigma_min = check.non_negative("sigma_min", sigma_min)

    def forward(self, x: torch.Tensor, sigma, sigma_end=None, **cond) -> torch.Tensor:
        self._check_x(x)
        sigma = _per_sample_sigma(sigma, x)
        sigma_end = _per_sample_sigma(self.sigma_min if sigma_end is None else sigma_end, x)
        end_in = C_NOISE_CONVENTIONS[self.c_noise](sigma_end)
        scalings = bcm_scalings(sigma, sigma_end, self.sigma_data)
        return self._apply(x, sigma, scalings, c_noise_end=end_in, **cond)[0]


class EDMDenoiser(_Wrapper):
    """D(x, σ) = c_skip·x + c_out·F(c_in·x, c_noise) with EDM's scalings (EDMPrecond)."""

    def __init__(self, net: nn.Module, sigma_data: float = 0.5, c_noise: str = "edm"):
        super().__init__(net, sigma_data, c_noise)

    def forward(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        self._check_x(x)
        sigma = _per_sample_sigma(sigma, x)
        return self._apply(x, sigma, edm_scalings(sigma, self.sigma_data), **cond)[0]

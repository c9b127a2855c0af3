"""Everything a run changes as it trains, in one object that checkpoints save and restore.

TrainState = the network, its EMAs, the target network θ⁻ (when the objective keeps one), the
objective's extra trainable modules, the optimizer, the loss scaler, the random streams, the data
position, the step counter and the bookkeeping of the divergence guard and the best checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import cm_core
import torch
from torch import nn

from .data import BatchStream

__all__ = ["EMA", "TrainState", "trainable_params"]


class EMA:
    """A shadow copy of the network's weights: constant decay or EDM2's power function."""

    def __init__(self, cfg, net: nn.Module):
        self.cfg = cfg
        self.net = copy.deepcopy(net).eval().requires_grad_(False)
        self.gamma = cm_core.sigma_rel_to_gamma(cfg.sigma_rel) if cfg.kind == "power" else None

    def decay(self, step: int) -> float:
        return cm_core.power_function_ema(step, self.gamma) if self.gamma is not None else self.cfg.decay

    @torch.no_grad()
    def update(self, net: nn.Module, step: int) -> float:
        beta = self.decay(step)
        cm_core.ema_update_(self.net.parameters(), net.parameters(), beta)
        for b_ema, b in zip(self.net.buffers(), net.buffers()):
            b_ema.copy_(b)
        return beta


def trainable_params(net: nn.Module, extra: dict[str, nn.Module]) -> list[nn.Parameter]:
    """The network's parameters, then the extra modules' (a fixed order: the optimizer's)."""
    return [p for mod in (net, *extra.values()) for p in mod.parameters() if p.requires_grad]


@dataclasses.dataclass(eq=False)
class TrainState:
    net: nn.Module
    emas: dict[str, EMA]
    target: nn.Module | None  # θ⁻, the wrapped function, when the objective keeps an EMA target
    extra: dict[str, nn.Module]  # the objective's extra trainable modules
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    generator: torch.Generator  # the objectives' draws (σ, noise), reseeded per micro-batch
    stream: BatchStream  # the data position
    step: int = 0
    lr_factor: float = 1.0  # lowered by each rollback
    bad_steps: list[int] = dataclasses.field(default_factory=list)  # recent non-finite steps
    rollbacks: int = 0
    best: tuple[float, str] | None = None  # (value, checkpoint path) of the best metric so far
    evals_without_improvement: int = 0

    def trainable(self) -> list[nn.Parameter]:
        return trainable_params(self.net, self.extra)

    # ---- checkpoints -------------------------------------------------------------------------
    def networks(self, meta: dict | None) -> dict[str, tuple[dict[str, torch.Tensor], dict | None]]:
        """The weights a checkpoint stores as safetensors files (``meta``: cm_nets' rebuild record)."""
        out = {"net": (self.net.state_dict(), meta)}
        for name, ema in self.emas.items():
            out[f"ema-{name}"] = (ema.net.state_dict(), meta)
        if self.target is not None:
            out["target"] = (self.target.net.state_dict(), meta)
        for name, mod in self.extra.items():
            out[f"extra-{name}"] = (mod.state_dict(), None)
        return out

    def load_networks(self, networks: dict[str, dict[str, torch.Tensor]]) -> None:
        self.net.load_state_dict(networks["net"])
        for name, ema in self.emas.items():
            if f"ema-{name}" in networks:
                ema.net.load_state_dict(networks[f"ema-{name}"])
        if self.target is not None and "target" in networks:
            self.target.net.load_state_dict(networks["target"])
        for name, mod in self.extra.items():
            mod.load_state_dict(networks[f"extra-{name}"])

    def rng_state(self, device: torch.device) -> dict:
        state = {"cpu": torch.get_rng_state(), "generator": self.generator.get_state()}
        if device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(device)
        return state

    def set_rng_state(self, state: dict, device: torch.device) -> None:
        torch.set_rng_state(state["cpu"])
        self.generator.set_state(state["generator"])
        if "cuda" in state and device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], device)

    def state_dict(self, rngs: list[dict], world: int) -> dict:
        """Everything but the weights (``rngs``: every rank's :meth:`rng_state`, in rank order)."""
        return {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "stream": self.stream.state_dict(),
            "rng": rngs,
            "world": world,
            "lr_factor": self.lr_factor,
            "bad_steps": list(self.bad_steps),
            "rollbacks": self.rollbacks,
            "best": list(self.best) if self.best else [],
            "evals_without_improvement": self.evals_without_improvement,
        }

    def load_state_dict(self, state: dict, rank: int, world: int, device: torch.device) -> bool:
        """Restore; True when this rank's random streams came back too (same number of ranks)."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.stream.load_state_dict(state["stream"])
        self.step = int(state["step"])
        self.lr_factor = float(state["lr_factor"])
        self.bad_steps = [int(s) for s in state["bad_steps"]]
        self.rollbacks = int(state["rollbacks"])
        self.best = (float(state["best"][0]), str(state["best"][1])) if state["best"] else None
        self.evals_without_improvement = int(state["evals_without_improvement"])
        if int(state["world"]) != world:
            return False
        self.set_rng_state(state["rng"][rank], device)
        return True

    def best_path(self) -> Path | None:
        return Path(self.best[1]) if self.best and self.best[1] else None

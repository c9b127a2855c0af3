"""One training step, top to bottom: batch → objective → backward → gradient all-reduce → guard →
optimizer → EMAs and target network. Everything that is not the step is a callback (callbacks.py).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import cm_core
import torch

from . import distributed
from .state import TrainState

__all__ = ["StepContext", "StepResult", "train_step", "seed_chunk"]


@dataclasses.dataclass(frozen=True)
class StepContext:
    """What stays the same from step to step."""

    objective: Callable  # objective(f, x0, *, step, generator, **cond) -> (loss [B], stats)
    model: torch.nn.Module  # the function the objective trains (compiled or not)
    device: torch.device
    micro: int  # micro-batch size per rank
    accum: int  # micro-batches per step on this rank
    rank: int
    seed: int
    amp_dtype: torch.dtype | None
    grad_clip: float  # max global gradient norm, 0: off
    cond: Callable[[torch.Tensor], dict]  # labels → the objective's conditioning kwargs
    sync: distributed.GradSync
    target_decay: Callable[[int], float] | None  # step → μ of the target network θ⁻, when kept


@dataclasses.dataclass
class StepResult:
    loss: torch.Tensor  # this rank's mean loss (over its micro-batches)
    grad_norm: torch.Tensor
    finite: bool  # on every rank; a non-finite step was skipped
    stats: dict  # the objective's statistics of the last micro-batch
    sigma_loss: list[tuple[torch.Tensor, torch.Tensor]]  # (σ, loss) per sample, for the logs
    decays: dict  # EMA (and target) decays used
    overflow: bool = False  # skipped for an fp16 gradient overflow alone (finite loss): the scaler backs off


def seed_chunk(seed: int, step: int, chunk: int, generator: torch.Generator) -> None:
    """Every random draw of a micro-batch is a function of (seed, step, chunk of the global batch),
    so a run does not depend on how the batch is spread over ranks: 2 ranks × 1 chunk draw exactly
    what 1 rank × 2 accumulated chunks draws (same noise, σ and dropout masks)."""
    key = ((seed * 1_000_003 + step) * 4_099 + chunk) % (2**62)
    generator.manual_seed(key)
    torch.manual_seed(key ^ 0x5DEECE66D)  # dropout (and any other global-RNG use), all devices


def train_step(state: TrainState, batch: tuple[torch.Tensor, torch.Tensor], ctx: StepContext, lr: float):
    """One optimizer step of ``state`` on the global ``batch`` (this rank's share), at learning rate ``lr``."""
    step = state.step
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    state.optimizer.zero_grad(set_to_none=True)
    x, y = batch
    loss_sum, stats, sigma_loss = 0.0, {}, []
    for i in range(ctx.accum):
        xs, ys = x[i * ctx.micro : (i + 1) * ctx.micro].to(ctx.device), y[i * ctx.micro : (i + 1) * ctx.micro]
        seed_chunk(ctx.seed, step, ctx.rank * ctx.accum + i, state.generator)
        with torch.autocast(ctx.device.type, dtype=ctx.amp_dtype, enabled=ctx.amp_dtype is not None):
            per_sample, stats = ctx.objective(ctx.model, xs, step=step, generator=state.generator, **ctx.cond(ys))
            loss = per_sample.float().mean() / ctx.accum
        sigma = stats.pop("per_sample_sigma", None)
        if sigma is not None:
            sigma_loss.append((sigma.float().cpu(), per_sample.detach().float().cpu()))
        if i == ctx.accum - 1:
            ctx.sync.arm()  # this backward completes the gradients: all-reduce buckets as they fill
        state.scaler.scale(loss).backward()
        loss_sum += loss.detach()
    ctx.sync.finish()

    # Guard: unscale, clip (max_norm = inf measures only), and skip the step unless every rank is finite.
    params = state.trainable()
    state.scaler.unscale_(state.optimizer)
    clip = ctx.grad_clip if ctx.grad_clip > 0 else math.inf
    has_grads = any(p.grad is not None for p in params)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip) if has_grads else torch.zeros(())
    loss_ok = bool(torch.isfinite(torch.as_tensor(loss_sum)).item())
    grads_ok = bool(torch.isfinite(grad_norm).item())
    # 0: fine; 1: only the gradients overflowed (fp16 at this loss scale); 2: the loss is not finite.
    code = int(distributed.max_scalar(float(0 if loss_ok and grads_ok else 1 if loss_ok else 2), ctx.device))
    finite, overflow = code == 0, code == 1 and state.scaler.is_enabled()

    decays = {}
    if finite:
        state.scaler.step(state.optimizer)
        state.scaler.update()
        state.step += 1
        decays = {name: ema.update(state.net, state.step) for name, ema in state.emas.items()}
        if state.target is not None:
            decays["target"] = mu = ctx.target_decay(step)
            cm_core.ema_update_(state.target.net.parameters(), state.net.parameters(), mu)
    else:
        state.scaler.update()  # lowers the fp16 loss scale after an overflow
        state.step += 1  # the data and RNG moved on; the weights did not
    return StepResult(torch.as_tensor(loss_sum), grad_norm, finite, stats, sigma_loss, decays, overflow)

"""What a run does besides training: logs, a progress bar, sample grids, the best checkpoint and
early stopping. Each is a :class:`Callback`; :func:`cm_train.run` takes more with ``callbacks=``.

Hooks, in the order the loop calls them:
  on_train_start(trainer)               after resume, before the first step
  on_step_end(trainer, result, record)  after every step; ``record`` is the logged line, or None
  on_checkpoint(trainer, metrics) -> bool  before a checkpoint is written (``metrics``: what it
                                        will record, to add to); True asks to stop early
  on_saved(trainer, path)               after a checkpoint is written
  on_train_end(trainer)                 after the last step, before the final checkpoint
Rank 0 does the writing; every rank calls the hooks (some evaluations are collective).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .checkpoint import atomic_write_text

__all__ = [
    "Callback",
    "MetricsLog",
    "append_metrics",
    "ProgressBar",
    "SampleGrids",
    "BestCheckpoint",
    "Metric",
    "loss_metric",
    "broadcast_value",
]

# A best-checkpoint metric: (trainer, last logged record) → value (lower is better) or None, run on
# rank 0 only. cm-train knows "loss"; the `cm` tool adds "fd_digits" (cm-eval), a user any other.
Metric = Callable[[object, dict], "float | None"]


def loss_metric(trainer, last: dict) -> float | None:
    return last.get("loss")


class Callback:
    def on_train_start(self, trainer) -> None:
        pass

    def on_step_end(self, trainer, result, record: dict | None) -> None:
        pass

    def on_checkpoint(self, trainer, metrics: dict) -> bool:
        return False

    def on_saved(self, trainer, path: Path) -> None:
        pass

    def on_train_end(self, trainer) -> None:
        pass


class ProgressBar(Callback):
    """A tqdm bar on rank 0 (log.progress). When stderr is not a terminal (a redirected or batch job,
    where tqdm stays silent), a progress line instead: at the first logged step, then at most every
    ``INTERVAL_S`` seconds, and at the last step."""

    INTERVAL_S = 30.0

    def __init__(self):
        self.bar = None
        self.lines = False
        self._last_line = 0.0
        self._t0 = 0.0
        self._s0 = 0

    def on_train_start(self, trainer) -> None:
        if not trainer.info.is_main:
            return
        self._t0, self._s0, self._last_line = time.time(), trainer.state.step, 0.0
        try:
            from tqdm import tqdm
        except ImportError:
            self.lines = True
            return
        self.bar = tqdm(
            total=trainer.cfg.run.total_steps,
            initial=trainer.state.step,
            desc=trainer.name,
            unit="it",
            file=sys.stderr,
            dynamic_ncols=True,
            disable=None,  # off when stderr is not a terminal
        )
        if self.bar.disable:
            self.bar, self.lines = None, True

    def on_step_end(self, trainer, result, record) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if record is not None:
                loss = record["loss"]
                self.bar.set_postfix(
                    loss=f"{loss:.4g}" if loss is not None else "nan", img_s=f"{record['img_per_s']:.0f}"
                )
        elif self.lines and record is not None:
            now, step, total = time.time(), trainer.state.step, trainer.cfg.run.total_steps
            if self._last_line and now - self._last_line < self.INTERVAL_S and step < total:
                return
            self._last_line = now
            done = step - self._s0
            rate = done / max(now - self._t0, 1e-9)
            eta = (total - step) / rate if rate > 0 else float("inf")
            loss = record["loss"]
            trainer.say(
                f"step {step}/{total} ({100 * step / total:.0f} %), loss {loss:.4g}, {record['img_per_s']:.0f} img/s, "
                f"about {_duration(eta)} left" if loss is not None else f"step {step}/{total}: non-finite loss"
            )

    def on_train_end(self, trainer) -> None:
        if self.bar is not None:
            self.bar.close()


def _duration(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "an unknown time"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def append_metrics(run_dir, record: dict) -> None:
    """Append ``record`` (with its "step") to <run>/metrics.jsonl, and to <run>/tensorboard when
    tensorboard is installed (cm-train[tensorboard]): how an evaluation after training (``cm t2i
    eval``) adds its numbers to the run's logs."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # pip install 'cm-train[tensorboard]' for the TensorBoard copy
        return
    writer = SummaryWriter(str(run_dir / "tensorboard"))
    for key, value in record.items():
        if key != "step" and isinstance(value, (int, float)):
            writer.add_scalar(key, value, int(record.get("step", 0)))
    writer.close()


class MetricsLog(Callback):
    """Each logged record as a JSON line in <run>/metrics.jsonl, and as TensorBoard scalars when
    log.tensorboard is set (said once if tensorboard is missing)."""

    def __init__(self, run_dir: Path, tensorboard: bool):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tensorboard = tensorboard
        self._tb = None

    def write(self, trainer, record: dict) -> None:
        if not trainer.info.is_main:
            return
        if self.tensorboard and self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.path.parent / "tensorboard"))
            except ImportError:
                trainer.say(
                    "log.tensorboard = true but tensorboard is not installed (pip install tensorboard); "
                    "metrics go to metrics.jsonl only"
                )
                self._tb = False
        if self._tb:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, record["step"])
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    def on_step_end(self, trainer, result, record) -> None:
        if record is not None:
            self.write(trainer, record)


class SampleGrids(Callback):
    """Sample grids every log.sample_every steps (the final one comes with the end of the run)."""

    def __init__(self, every: int):
        self.every = every

    def on_step_end(self, trainer, result, record) -> None:
        if self.every and trainer.state.step % self.every == 0:
            trainer.sample_grid()


class BestCheckpoint(Callback):
    """checkpoint.best_metric: evaluated before each checkpoint (lower is better, on rank 0, shared
    with every rank); the best checkpoint is kept beyond keep_last and named in <run>/best.json;
    after checkpoint.early_stop_patience evaluations without improvement, the run stops."""

    def __init__(self, name: str, patience: int):
        self.name, self.patience = name, patience
        self._improved = False

    def on_checkpoint(self, trainer, metrics: dict) -> bool:
        value = trainer.evaluate(metrics)
        self._improved = False
        if value is None:
            return False
        metrics[self.name] = value
        state, path = trainer.state, trainer.checkpoint_path()
        if state.best is None or value < state.best[0]:
            state.best = (value, str(path))
            state.evals_without_improvement = 0
            self._improved = True
            trainer.say(f"step {state.step}: {self.name} = {value:.4g} (new best)")
            return False
        state.evals_without_improvement += 1
        trainer.say(
            f"step {state.step}: {self.name} = {value:.4g} "
            f"(best {state.best[0]:.4g}, {state.evals_without_improvement} without improvement)"
        )
        return bool(self.patience) and state.evals_without_improvement >= self.patience

    def on_saved(self, trainer, path: Path) -> None:
        if self._improved and trainer.info.is_main:
            value = trainer.state.best[0]
            record = {"metric": self.name, "value": value, "step": trainer.state.step, "checkpoint": str(path)}
            atomic_write_text(trainer.run_dir / "best.json", json.dumps(record, indent=2) + "\n")


def broadcast_value(value: float | None, device: torch.device) -> float | None:
    """Rank 0's metric value on every rank (NaN travels as 'no value')."""
    if torch.distributed.is_initialized():
        t = torch.tensor([value if value is not None else float("nan")], dtype=torch.float64, device=device)
        torch.distributed.broadcast(t, 0)
        value = t.item()
    return value if value is not None and value == value else None

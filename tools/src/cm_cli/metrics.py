"""Best-checkpoint metrics that need cm-eval, which `cm train` gives the trainer (cm-train alone
knows only "loss"): ``checkpoint.best_metric = "fd_digits"``."""

from __future__ import annotations

__all__ = ["METRICS", "fd_digits"]


def fd_digits(trainer, last: dict) -> float:
    """FD-digits of ``checkpoint.eval_count`` one-step samples of the first EMA (fixed noise and
    class-balanced labels, so checkpoints compare on the same draws) to the real digits."""
    import cm_core
    import cm_eval
    import torch

    f = trainer.sampling_function()
    n = trainer.cfg.checkpoint.eval_count
    gen = torch.Generator().manual_seed(trainer.cfg.run.seed + 777)
    z = torch.randn((n,) + tuple(trainer.dataset.sample_shape), generator=gen).to(trainer.device)
    labels = torch.arange(n) % max(trainer.dataset.num_classes, 1)
    x = torch.cat(
        [cm_core.onestep_sample(f, zc, **trainer.cond(lc)).cpu() for zc, lc in zip(z.split(256), labels.split(256))]
    )
    return cm_eval.fd_digits(x.clamp(-1, 1))


METRICS = {"fd_digits": fd_digits}

"""`cm train`'s best-checkpoint metrics that need cm-eval (moved here with the metric: cm-train
knows only "loss")."""

import json

from cm_cli.metrics import METRICS
from cm_train import load_config, run


def test_fd_digits_metric_runs_on_digits(tmp_path):
    cfg = load_config(
        {
            "run": {"dir": str(tmp_path / "fd"), "total_steps": 2, "batch_size": 16},
            "data": {"source": "digits", "conditional": True},
            "model": {"preset": "unet-tiny", "overrides": {"image_size": 8, "num_classes": 10}},
            "objective": {"name": "ict", "kwargs": {"s0": 10, "s1": 20}},
            "checkpoint": {"every": 0, "best_metric": "fd_digits", "eval_count": 64},
            "log": {"progress": False, "every": 1},
        }
    )
    run(cfg, log=lambda m: None, metrics=METRICS)
    best = json.loads((tmp_path / "fd" / "best.json").read_text())
    assert best["metric"] == "fd_digits" and best["value"] > 0


"""Shared fixtures: tiny configs that train in seconds on 2 CPU cores."""

import pytest


def tiny(tmp_path, **sections):
    """A config dict for mlp-toy on the built-in Gaussian-mixture data."""
    cfg = {
        "run": {"dir": str(tmp_path / "run"), "total_steps": 20, "batch_size": 32, "seed": 0},
        "data": {"source": "gmm", "gmm_components": 3, "gmm_dim": 2},
        "model": {"preset": "mlp-toy", "overrides": {"dim": 2, "hidden": 32, "depth": 2, "emb_dim": 16}},
        "objective": {"name": "ict"},
        "optim": {"name": "adam", "lr": 1e-3},
        "ema": [{"kind": "constant", "decay": 0.99}],
        "checkpoint": {"every": 10, "keep_last": 5},
        "log": {"every": 5, "progress": False},
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            cfg.setdefault(key, {}).update(value)
        else:
            cfg[key] = value
    return cfg


@pytest.fixture
def tiny_config(tmp_path):
    return lambda **sections: tiny(tmp_path, **sections)

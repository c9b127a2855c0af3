"""load_trained: a checkpoint alone rebuilds the function it trained, with its kind and data shape."""

import json
import shutil

import cm_core
import cm_nets
import cm_train
import pytest
import torch
from cm_train import load_trained, resolve_checkpoint


def _digits_run(tmp_path, objective="ict", bcm=False, steps=3, every=0):
    cfg = {
        "run": {"dir": str(tmp_path / objective), "total_steps": steps, "batch_size": 8, "seed": 0},
        "data": {"source": "digits", "conditional": True},
        "model": {"preset": "mlp-digits", "overrides": {"num_classes": 10, "hidden": 16, "depth": 1, "bcm": bcm}},
        "objective": {"name": objective, "kwargs": {"s0": 2, "s1": 4} if objective == "ict" else {}},
        "optim": {"name": "adam", "lr": 1e-3},
        "ema": [{"kind": "constant", "decay": 0.9, "name": "slow"}],
        "checkpoint": {"every": every, "keep_last": 5},
        "log": {"every": 1, "progress": False},
    }
    return cm_train.run(cm_train.load_config(cfg), log=lambda m: None)


@pytest.mark.parametrize(
    "objective,bcm,kind", [("ict", False, "consistency"), ("bcm", True, "bcm"), ("edm", False, "diffusion")]
)
def test_checkpoint_rebuilds_the_trained_function(tmp_path, objective, bcm, kind):
    res = _digits_run(tmp_path, objective, bcm)
    model = load_trained(res["checkpoint"])
    assert model.kind == kind and model.objective == objective
    assert model.sample_shape == (1, 8, 8) and model.num_classes == 10
    assert model.network == "ema-slow"
    assert not model.function.training
    meta = json.loads((model.checkpoint / "meta.json").read_text())
    assert meta["config"]["objective"]["name"] == objective  # self-contained: no run folder needed
    # The same numbers as wrapping the saved EMA weights by hand.
    weights = cm_nets.load(model.checkpoint / "ema-slow.safetensors")
    net = cm_train.build_function(objective, weights, model.config).eval()
    x, y = torch.randn(4, 1, 8, 8), torch.arange(4)
    torch.testing.assert_close(model.function(x, 1.5, class_labels=y), net(x, 1.5, class_labels=y))
    online = load_trained(res["checkpoint"], network="net")
    assert online.network == "net"
    with pytest.raises(ValueError, match="give class labels"):
        model.cond(None)
    assert model.cond(y)["class_labels"] is y


def test_run_folder_resolves_to_best_else_latest(tmp_path):
    res = _digits_run(tmp_path, steps=4, every=2)
    run_dir = tmp_path / "ict"
    assert resolve_checkpoint(run_dir).name == "step-00000004"
    best = run_dir / "checkpoints" / "step-00000002"
    (run_dir / "best.json").write_text(json.dumps({"checkpoint": str(best)}))
    assert resolve_checkpoint(run_dir) == best
    assert resolve_checkpoint(res["checkpoint"]).name == "step-00000004"
    # A checkpoint copied out of its run folder still loads (config and shape live in meta.json).
    alone = tmp_path / "copied"
    shutil.copytree(res["checkpoint"], alone)
    assert load_trained(alone).sample_shape == (1, 8, 8)


def test_bad_paths_say_what_to_give(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_trained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no cm-train checkpoint"):
        load_trained(tmp_path / "empty")
    f = tmp_path / "weights.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file"):
        load_trained(f)
    res = _digits_run(tmp_path)
    with pytest.raises(ValueError, match="no network 'target'; it has ema-slow, net"):
        load_trained(res["checkpoint"], network="target")


def test_kind_of():
    assert [cm_train.kind_of(o) for o in ("ct", "ect", "direct-cm", "bcm", "cdm")] == [
        "consistency",
        "consistency",
        "consistency",
        "bcm",
        "diffusion",
    ]
    with pytest.raises(ValueError, match="unknown objective"):
        cm_train.kind_of("gan")
    assert set(cm_core.OBJECTIVES) <= {"ct", "ict", "cd", "ect", "direct-cm", "bcm", "edm", "cdm", "lcm", "latent-direct-cm", "sct", "scd", "meanflow"}

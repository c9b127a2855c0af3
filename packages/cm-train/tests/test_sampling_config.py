"""model.sample_*: a run samples with its recipe's function (ECT: trains with EDM's scalings,
samples with the shifted boundary at σ_min = 0.003, σ·ε re-noising, 2 steps through 0.821), and
model.init from a converted EDM snapshot with augment_dim = 9 starts an augment-free model."""

import dataclasses
from pathlib import Path

import cm_core
import cm_nets
import cm_train
import pytest
import torch
from cm_train import ConfigError, load_trained

ECT_SAMPLING = dict(
    sample_boundary="shifted", sample_sigma_min=0.003, sample_renoise="ect", sample_sigmas=[80.0, 0.821]
)


def _config(tmp_path, model: dict, steps: int = 2) -> dict:
    return {
        "run": {"dir": str(tmp_path / "run"), "total_steps": steps, "batch_size": 8, "seed": 0},
        "data": {"source": "digits"},
        "model": {"preset": "mlp-digits", "overrides": {"hidden": 16, "depth": 1}, "boundary": "edm", **model},
        "objective": {"name": "ect", "kwargs": {}},
        "optim": {"name": "adam", "lr": 1e-3},
        "ema": [{"kind": "constant", "decay": 0.9, "name": "ema"}],
        "checkpoint": {"every": 0},
        "log": {"every": 1, "progress": False, "sample_count": 4},
    }


@pytest.mark.parametrize("ect", [True, False], ids=["ect-sampling", "defaults"])
def test_runs_sample_with_the_configured_function(tmp_path, monkeypatch, ect):
    grids = []
    multistep = cm_core.get_sampler("multistep")

    def spy(f, z, sigmas, **kw):  # the trainer's sample grid, through the sampler registry
        grids.append((f.boundary, f.sigma_min, list(sigmas), kw["sigma_min"], kw["renoise"]))
        return multistep.run(f, z, sigmas, **kw)

    monkeypatch.setitem(cm_core.SAMPLERS, "multistep", dataclasses.replace(multistep, run=spy))
    res = cm_train.run(cm_train.load_config(_config(tmp_path, ECT_SAMPLING if ect else {})), log=lambda m: None)
    boundary, sigma_min, renoise = ("shifted", 0.003, "ect") if ect else ("edm", 0.002, "cm")
    assert grids == [(boundary, sigma_min, [80.0, 0.821], sigma_min, renoise)]

    model = load_trained(res["checkpoint"])
    f = model.function
    assert (f.boundary, f.sigma_min, model.sigma_min, model.renoise) == (boundary, sigma_min, sigma_min, renoise)
    assert model.sample_sigmas == ((80.0, 0.821) if ect else ())
    # The same numbers as a ConsistencyFunction built by hand around the saved EMA weights.
    net = cm_nets.load(model.checkpoint / "ema-ema.safetensors")
    direct = cm_core.ConsistencyFunction(net, 0.5, sigma_min, "edm", boundary).eval()
    x, sigma = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0.003, 0.5, 80.0])
    with torch.no_grad():
        assert torch.equal(f(x, sigma), direct(x, sigma))
        trained = cm_train.build_function("ect", net, model.config).eval()  # the training scalings
        assert trained.boundary == "edm"
        if ect:
            assert torch.equal(f(x, 0.003), x)  # ECT's boundary condition f(x, σ_min) = x
            assert not torch.allclose(f(x, 0.5), trained(x, 0.5))


@pytest.mark.parametrize(
    "model,match",
    [
        ({"sample_boundary": "ect"}, r"model.sample_boundary must be one of \['', 'shifted', 'edm'\]"),
        ({"sample_renoise": "sde"}, r"model.sample_renoise must be one of \['cm', 'ect'\]"),
        ({"sample_sigma_min": -1}, "model.sample_sigma_min must be >= 0"),
        ({"sample_sigmas": [0.821, 80.0]}, "model.sample_sigmas must decrease"),
        ({"sample_sigmas": [80.0, 0.002], "sample_sigma_min": 0.003}, "stay >= the sampling sigma_min 0.003"),
        ({"sample_sigmas": [80.0, "mid"]}, "list of numbers"),
    ],
)
def test_bad_sampling_keys_name_the_key(tmp_path, model, match):
    with pytest.raises(ConfigError, match=match):
        cm_train.load_config(_config(tmp_path, model))


def test_shipped_ect_recipe_samples_as_ect_evaluates():
    cfg = cm_train.load_config(Path(__file__).parents[1] / "configs" / "ect-cifar10.toml")
    m = cfg.model
    assert (m.boundary, m.eval_boundary, m.eval_sigma_min, m.sample_renoise) == ("edm", "shifted", 0.003, "ect")
    assert m.sample_sigmas == (80.0, 0.821) and m.init.endswith("edm-cifar10-uncond-vp.safetensors")


SONG = dict(img_resolution=8, in_channels=1, out_channels=1, model_channels=16, channel_mult=[1, 2], num_blocks=1,
            attn_resolutions=[4])  # fmt: skip


def test_init_from_an_edm_snapshot_with_augment_dim(tmp_path):
    """EDM's CIFAR-10 snapshots carry map_augment (augment_dim=9); ECT's model has none. The
    trainer loads everything else, says so, and starts from the teacher's D(x, σ) exactly."""
    torch.manual_seed(0)
    teacher = cm_nets.create("ddpmpp-cifar10", augment_dim=9, **SONG).eval()
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    init = cm_nets.save(teacher, tmp_path / "edm.safetensors")
    cfg = _config(tmp_path, {"preset": "ddpmpp-cifar10", "overrides": dict(SONG, dropout=0.0), "init": str(init)})
    logs = []
    trainer = cm_train.loop.Trainer(cm_train.load_config(cfg), log=logs.append)
    line = next(m for m in logs if "initialized from" in m)
    n = len(teacher.state_dict())
    assert f"all {n - 1} tensors of this model" in line and "not in this model, left out: map_augment.weight" in line
    assert "augment_dim=9" in line and "D(x, σ) unchanged" in line
    x, sigma = torch.randn(2, 1, 8, 8), torch.tensor([0.3, 20.0])
    with torch.no_grad():
        trainer.f.eval()
        torch.testing.assert_close(trainer.f(x, sigma), cm_core.EDMDenoiser(teacher, 0.5)(x, sigma), rtol=0, atol=0)

    # another architecture is a config error naming model.init
    cfg["model"]["overrides"] = dict(SONG, model_channels=32)
    with pytest.raises(ConfigError, match="model.init .*edm.safetensors does not fit model.preset 'ddpmpp-cifar10'"):
        cm_train.loop.Trainer(cm_train.load_config(cfg), log=logs.append)

"""An objective from another installed package trains with `cm train … objective.name=<its name>`
and samples with `cm sample RUN`, with no change to this repository: the test writes a package with
a `cm.objectives` entry point (its dist-info on sys.path, as an installed package) and runs both
commands through click's CliRunner. Its objective also brings an extra trainable module (a learned
loss weighting), which must be optimized, checkpointed and restored on resume."""

import json
import textwrap
from pathlib import Path

import cm_core
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from cm_cli.main import cli

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "packages" / "cm-train" / "configs" / "digits.toml"

PLUGIN = '''
"""A plugin objective: f(x0 + σz, σ) regresses on x0 with a learned per-σ loss weight."""

import torch
import cm_core


class X0Regression(cm_core.Objective):
    function = "consistency"

    def __init__(self, total_steps: int, p_mean: float = -1.1, p_std: float = 2.0):
        self.total_steps, self.p_mean, self.p_std = total_steps, p_mean, p_std
        self.log_weight = torch.nn.Linear(1, 1)  # w(σ), trained jointly (sCM's adaptive weighting)

    @classmethod
    def run_defaults(cls, *, total_steps):
        return {"total_steps": total_steps}

    def extra_modules(self):
        return {"log-weight": self.log_weight}

    def __call__(self, f, x0, *, step, generator=None, **cond):
        device = generator.device if generator is not None else x0.device
        sigma = cm_core.lognormal_sigmas(
            x0.shape[0], self.p_mean, self.p_std, generator=generator, device=device
        ).to(x0.device)
        z = torch.randn(x0.shape, generator=generator, device=device).to(x0)
        s = sigma.to(x0.dtype).view(-1, *[1] * (x0.ndim - 1))
        pred = f(x0 + s * z, sigma, **cond)
        w = self.log_weight(sigma.log().float().view(-1, 1)).squeeze(1)
        loss = torch.exp(-w) * (pred - x0).square().flatten(1).mean(1) + w
        return loss, {"mean_log_weight": float(w.detach().mean()), "per_sample_sigma": sigma.detach()}
'''

TINY = [
    "model.preset=mlp-digits",
    "model.overrides={num_classes=10, hidden=32, depth=1}",
    "run.batch_size=8",
    "checkpoint.every=0",
    "log.sample_every=0",
    "log.sample_count=4",
    "log.progress=false",
    "objective.name=x0-regression",
    "objective.kwargs={}",
]


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """An 'installed' package: a module and its dist-info with the entry point, on sys.path."""
    site = tmp_path / "site"
    (site / "cmplugin_x0").mkdir(parents=True)
    (site / "cmplugin_x0" / "__init__.py").write_text(textwrap.dedent(PLUGIN))
    info = site / "cmplugin_x0-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: cmplugin-x0\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[cm.objectives]\nx0-regression = cmplugin_x0:X0Regression\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(cm_core.objectives.base, "OBJECTIVES", dict(cm_core.OBJECTIVES))  # restored after
    monkeypatch.setattr(cm_core, "OBJECTIVES", cm_core.objectives.base.OBJECTIVES)
    yield "x0-regression"


def cm(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], prog_name="cm")


def test_a_plugin_objective_trains_resumes_and_samples(plugin, tmp_path):
    run_dir = tmp_path / "run"
    result = cm("train", DIGITS, *TINY, "run.total_steps=4", f"run.dir={run_dir}")
    assert result.exit_code == 0, (result.output, result.exception)
    assert plugin in cm_core.objective_names()
    ckpt = run_dir / "checkpoints" / "step-00000004"
    assert json.loads((ckpt / "meta.json").read_text())["objective"] == plugin
    from safetensors.torch import load_file

    w4 = load_file(str(ckpt / "extra-log-weight.safetensors"))
    fresh = torch.nn.Linear(1, 1).state_dict()
    assert set(w4) == set(fresh)

    # Resume: the extra module comes back from the checkpoint and keeps training.
    result = cm("train", DIGITS, *TINY, "run.total_steps=6", "run.allow_config_change=true", f"run.dir={run_dir}")
    assert result.exit_code == 0, (result.output, result.exception)
    w6 = load_file(str(run_dir / "checkpoints" / "step-00000006" / "extra-log-weight.safetensors"))
    assert not torch.equal(w6["weight"], w4["weight"])  # the optimizer moved it

    out = tmp_path / "x.npz"
    result = cm("sample", run_dir, "--num", 6, "--nfe", 2, "--out", out)
    assert result.exit_code == 0, (result.output, result.exception)
    assert f"{plugin} (consistency) model" in result.output
    images = np.load(out)["arr_0"]
    assert images.shape == (6, 8, 8, 1) and images.dtype == np.uint8
    # A BCM sampler does not fit a consistency function: the declaration says so.
    result = cm("sample", run_dir, "--num", 2, "--sampler", "bcm-ancestral", "--out", tmp_path / "y.npz")
    assert result.exit_code == 1 and "does not fit" in result.output


def test_the_target_network_must_be_one_the_objective_takes(plugin, tmp_path):
    result = cm("train", DIGITS, *TINY, "run.total_steps=2", f"run.dir={tmp_path / 'r'}", "objective.target=ct")
    assert result.exit_code != 0
    assert "objective.target = 'ct'" in result.output and "uses no target network" in result.output

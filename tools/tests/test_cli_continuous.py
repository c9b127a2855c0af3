"""`cm train`, `cm sample` and `cm eval ode-error` on sCT, sCD and MeanFlow runs (tiny, a few steps):
the commands work on the new function kinds unchanged, through their declared samplers."""

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from cm_cli.main import cli

DIGITS = Path(__file__).resolve().parents[2] / "packages" / "cm-train" / "configs" / "digits.toml"

TINY = ["model.preset=mlp-digits", "run.total_steps=3", "run.batch_size=8", "checkpoint.every=0",
        "log.sample_every=0", "log.sample_count=4", "log.progress=false"]  # fmt: skip


def cm(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("continuous")
    out = {}
    for name, extra in [
        ("edm", ["objective.name=edm", "objective.kwargs={}", "model.overrides={num_classes=10, hidden=32, depth=1}"]),
        ("sct", ["objective.name=sct", "objective.kwargs={}", "model.c_noise=trig",
                 "model.overrides={num_classes=10, hidden=32, depth=1, noise_scale=10.0}"]),
        ("meanflow", ["objective.name=meanflow", "objective.kwargs={}",
                      "model.overrides={num_classes=10, hidden=32, depth=1, bcm=true}"]),
    ]:  # fmt: skip
        result = cm("train", DIGITS, f"run.dir={root / name}", *TINY, *extra)
        assert result.exit_code == 0, result.output
        out[name] = root / name
    teacher = next((root / "edm" / "checkpoints").iterdir()) / "ema-ema.safetensors"
    result = cm("train", DIGITS, f"run.dir={root / 'scd'}", *TINY, "objective.name=scd", "objective.kwargs={}",
                f"model.teacher={teacher}", "model.c_noise=trig",
                "model.overrides={num_classes=10, hidden=32, depth=1, noise_scale=10.0}")  # fmt: skip
    assert result.exit_code == 0, result.output
    out["scd"] = root / "scd"
    return out


@pytest.mark.parametrize("name, kind, sampler", [("sct", "trigflow", "trigflow"), ("scd", "trigflow", "trigflow"),
                                                 ("meanflow", "average-velocity", "meanflow")])  # fmt: skip
def test_sample_and_ode_error_on_continuous_time_runs(runs, tmp_path, name, kind, sampler):
    for nfe in (1, 2):
        out = tmp_path / f"{name}-{nfe}.npz"
        result = cm("sample", runs[name], "--num", 6, "--nfe", nfe, "--out", out)
        assert result.exit_code == 0, result.output
        assert f"({kind}) model" in result.output and f"NFE {nfe}" in result.output
        images = np.load(out)["arr_0"]
        assert images.shape == (6, 8, 8, 1) and images.dtype == np.uint8
    result = cm("eval", "ode-error", runs[name], "--teacher", runs["edm"], "--num", 4, "--nfe", 2, "--teacher-points", 4)
    assert result.exit_code == 0, result.output
    assert "ODE error: MSE" in result.output
    sweep = cm("eval", "sweep", runs[name], "--nfe", "1,2", "--num", 20, "--out", tmp_path / "sweep.png")
    assert sweep.exit_code == 0, sweep.output
    wrong = cm("sample", runs[name], "--num", 2, "--sampler", "heun", "--out", tmp_path / "x.npz")
    assert wrong.exit_code != 0 and sampler in wrong.output


@pytest.mark.parametrize("name", ["sct", "meanflow"])
def test_edit_on_continuous_time_runs(runs, tmp_path, name):
    """The editors take the model as a consistency function of σ (an exact re-parameterization)."""
    out = tmp_path / f"{name}-inpaint.png"
    result = cm("edit", "inpaint", runs[name], "--input", "digits", "--mask", "right", "--limit", 4, "--out", out)
    assert result.exit_code == 0, result.output
    assert out.is_file()

"""The `cm` command line through click's CliRunner, on checkpoints trained for a few steps.

Every command: the happy path on tiny inputs, and its error paths (exit 1 for failures, 2 for
usage errors, one `error:` line on stderr, no traceback unless --debug).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import click
import cm_eval
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from cm_cli.main import cli

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "packages" / "cm-train" / "configs" / "digits.toml"
TINY = [
    "model.preset=mlp-digits",
    "model.overrides={num_classes=10, hidden=32, depth=1}",
    "run.total_steps=5",  # the iCT curriculum (s0=10, s1=160) needs at least 5 steps
    "run.batch_size=8",
    "checkpoint.every=0",
    "log.sample_every=0",
    "log.sample_count=4",
    "log.progress=false",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny class-conditional digits checkpoints: iCT (consistency), BCM and EDM (diffusion)."""
    import cm_train

    base = tmp_path_factory.mktemp("runs")
    extra = {
        "ict": [],
        "bcm": ["model.overrides={num_classes=10, hidden=32, depth=1, bcm=true}", "objective.kwargs={}"],
        "edm": ["objective.kwargs={}"],
    }
    for name, more in extra.items():
        overrides = [*TINY, f"run.dir={base / name}", f"objective.name={name}", *more]
        cm_train.run(cm_train.load_config(DIGITS, overrides), log=lambda m: None)
    return {name: str(base / name) for name in extra}


def cm(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], prog_name="cm")


def ok(result):
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def fails(result, code, *words):
    """Exit ``code`` with exactly one `error: …` line naming ``words`` and no traceback."""
    err = result.stderr
    assert result.exit_code == code, (result.output, result.exception)
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in result.output
    for w in words:
        assert str(w) in err, (w, err)
    return result


def npz(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


# --- the group: help, global options, error handling ---------------------------------------------


def _command_paths(group, prefix=()):
    for name, command in group.commands.items():
        yield (*prefix, name)
        if isinstance(command, click.Group):
            yield from _command_paths(command, (*prefix, name))


@pytest.mark.parametrize("path", [(), *_command_paths(cli)], ids=lambda p: " ".join(p) or "cm")
def test_help_of_every_command_has_an_example(path):
    result = ok(cm(*path, "--help"))
    assert "Example" in result.output


def test_sampler_choices_are_cm_core_registry_and_flags_have_one_meaning():
    import cm_core
    from cm_cli.commands.sample import SAMPLERS

    assert SAMPLERS == ("auto", *cm_core.SAMPLERS)
    for path in _command_paths(cli):
        command = cli
        for name in path:
            command = command.commands[name]
        visible = {opt for p in command.params if not getattr(p, "hidden", False) for opt in p.opts}
        # --steps meant Heun steps, σ counts, path points and inversion jumps in tools 0.1: now
        # --heun-steps, --nfe, --points and --jumps; the old spelling is hidden for one release.
        assert not visible & {"--steps", "--teacher-steps"}, path


def test_version_and_python_dash_m():
    out = subprocess.run([sys.executable, "-m", "cm_cli", "--version"], capture_output=True, text=True, check=True)
    assert "0.1.0" in out.stdout


def test_threads_option_is_range_checked_and_applied():
    fails(cm("--threads", "0", "info"), 2, "--threads")
    before = torch.get_num_threads()
    try:
        result = ok(cm("--threads", "1", "info"))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert "torch" in result.output and "cm_kernels" in result.output and "attention backends" in result.output


def test_unexpected_errors_are_one_line_and_debug_reraises(tmp_path, monkeypatch):
    samples = tmp_path / "s.npz"
    np.savez(samples, arr_0=np.zeros((4, 8, 8, 1), np.uint8))

    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(cm_eval, "fd_digits", boom)
    fails(cm("eval", "digits", samples), 1, "RuntimeError: boom", "--debug")
    result = cm("--debug", "eval", "digits", samples)
    assert result.exit_code == 1 and isinstance(result.exception, RuntimeError)


def test_debug_shows_library_errors_with_traceback(tmp_path):
    result = cm("--debug", "sample", tmp_path / "missing", "--num", 2, "--out", tmp_path / "s.npz")
    assert isinstance(result.exception, FileNotFoundError)
    assert "error:" not in result.stderr


# --- train ----------------------------------------------------------------------------------------


def test_train(tmp_path):
    config = tmp_path / "toy.toml"
    config.write_text(
        f"""
[run]
dir = "{tmp_path / "run"}"
total_steps = 2
batch_size = 8
[data]
source = "gmm"
[model]
preset = "mlp-toy"
overrides = {{ dim = 2, hidden = 16, depth = 1, emb_dim = 8 }}
[objective]
name = "edm"
[checkpoint]
every = 0
[log]
progress = false
sample_every = 0
"""
    )
    result = ok(cm("train", config, "optim.lr=1e-3"))
    assert "trained to step 2" in result.output
    assert list((tmp_path / "run" / "checkpoints").glob("step-*/meta.json"))
    fails(cm("train", config, "optim.nope=1"), 1, "optim.nope")
    fails(cm("train", config, "run.total_steps=abc"), 1, "run.total_steps")
    fails(cm("train", config, "no-equals-sign"), 2, "KEY=VALUE")
    fails(cm("train", tmp_path / "missing.toml"), 1, "missing.toml")


# --- sample ---------------------------------------------------------------------------------------


def test_sample_consistency_npz_and_pngs(runs, tmp_path):
    out = tmp_path / "s.npz"
    result = ok(cm("sample", runs["ict"], "--nfe", 2, "--num", 5, "--out", out, "--batch-size", 2))
    assert "NFE 2" in result.output
    arrays = npz(out)
    assert arrays["arr_0"].shape == (5, 8, 8, 1) and arrays["arr_0"].dtype == np.uint8
    assert arrays["arr_1"].shape == (5,) and arrays["arr_1"].max() < 10
    fails(cm("sample", runs["ict"], "--num", 5, "--out", out), 1, str(out), "--overwrite")
    ok(cm("sample", runs["ict"], "--sigmas", "80,1", "--num", 5, "--out", out, "--overwrite"))

    folder = tmp_path / "pngs"
    ok(cm("sample", runs["ict"], "--seeds", "3,7", "--class-label", 4, "--out", folder))
    assert sorted(p.name for p in folder.iterdir()) == ["000003.png", "000007.png"]
    assert cm_eval.load_png(folder / "000003.png").shape == (8, 8, 1)


def test_sample_resume_continues_a_folder(runs, tmp_path):
    folder = tmp_path / "pngs"
    ok(cm("sample", runs["ict"], "--seeds", "0-1", "--out", folder))
    fails(cm("sample", runs["ict"], "--seeds", "0-3", "--out", folder), 1, "--overwrite", "--resume")
    result = ok(cm("sample", runs["ict"], "--seeds", "0-3", "--out", folder, "--resume"))
    assert "2 images written (2 already there)" in result.output
    fails(cm("sample", runs["ict"], "--num", 2, "--out", folder, "--resume", "--overwrite"), 2, "--resume")


def test_sample_bcm_and_diffusion(runs, tmp_path):
    for sampler, nfe in [("bcm-ancestral", "NFE 2"), ("bcm-zigzag", "NFE 3"), ("bcm-mixture", "NFE 4")]:
        args = ["--nfe", 2] if sampler == "bcm-ancestral" else []
        result = ok(
            cm("sample", runs["bcm"], "--sampler", sampler, *args, "--num", 3, "--out", tmp_path / f"{sampler}.npz")
        )
        assert nfe in result.output
        assert npz(tmp_path / f"{sampler}.npz")["arr_0"].shape == (3, 8, 8, 1)
    result = ok(cm("sample", runs["edm"], "--heun-steps", 3, "--num", 3, "--out", tmp_path / "heun.npz"))
    assert "NFE 5" in result.output
    x = npz(tmp_path / "heun.npz")["arr_0"]
    assert x.shape == (3, 8, 8, 1)
    # The old spelling works for one release, with a warning, and gives the same images.
    result = cm("sample", runs["edm"], "--steps", 3, "--num", 3, "--out", tmp_path / "heun-old.npz")
    assert ok(result) and "--steps is deprecated" in result.stderr and "--heun-steps" in result.stderr
    assert np.array_equal(npz(tmp_path / "heun-old.npz")["arr_0"], x)


def test_sample_errors(runs, tmp_path):
    out = tmp_path / "x.npz"
    fails(cm("sample", runs["edm"], "--sampler", "onestep", "--num", 2, "--out", out), 1, "diffusion", "heun")
    fails(cm("sample", runs["ict"], "--sampler", "bcm-zigzag", "--num", 2, "--out", out), 1, "consistency", "'ict'")
    fails(cm("sample", tmp_path / "nope", "--num", 2, "--out", out), 1, "nope", "does not exist")
    fails(cm("sample", runs["ict"], "--nfe", 0, "--num", 2, "--out", out), 2, "--nfe")
    fails(cm("sample", runs["ict"], "--num", 2, "--seeds", "0-3", "--out", out), 2, "--num", "--seeds")
    fails(cm("sample", runs["ict"], "--out", out), 2, "--num")
    fails(cm("sample", runs["ict"], "--sigmas", "80,x", "--num", 2, "--out", out), 2, "--sigmas")
    fails(cm("sample", runs["ict"], "--sigmas", "1,80", "--num", 2, "--out", out), 1, "decreasing")
    fails(cm("sample", runs["ict"], "--class-label", 10, "--num", 2, "--out", out), 1, "class_label")
    fails(cm("sample", runs["bcm"], "--sampler", "bcm-mixture", "--nfe", 3, "--num", 2, "--out", out), 2, "--nfe")
    fails(cm("sample", runs["ict"], "--heun-steps", 3, "--num", 2, "--out", out), 2, "--heun-steps", "heun only")
    fails(cm("sample", runs["edm"], "--nfe", 3, "--num", 2, "--out", out), 2, "--heun-steps", "--nfe")
    fails(cm("sample", runs["edm"], "--heun-steps", 3, "--steps", 3, "--num", 2, "--out", out), 2, "--steps")
    fails(cm("sample", runs["ict"], "--num", 2, "--out", out, "--device", "tpu"), 2, "--device")
    assert not out.exists()


# --- edit -----------------------------------------------------------------------------------------


def _grid_ok(path, rows, cols):
    img = cm_eval.load_png(path)
    assert img.shape == (rows * 9 + 1, cols * 9 + 1, 1)  # 8×8 tiles, 1-pixel padding


def test_edit_tasks(runs, tmp_path):
    ok(
        cm(
            "edit",
            "inpaint",
            runs["ict"],
            "--input",
            "digits",
            "--mask",
            "center",
            "--limit",
            3,
            "--out",
            tmp_path / "a.png",
        )
    )
    _grid_ok(tmp_path / "a.png", 3, 3)
    mask = tmp_path / "mask.png"
    cm_eval.save_png(mask, np.tile(np.array([0, 255], np.uint8).repeat(4), (8, 1)))
    ok(
        cm(
            "edit",
            "inpaint",
            runs["bcm"],
            "--input",
            "digits",
            "--mask",
            mask,
            "--limit",
            2,
            "--out",
            tmp_path / "b.png",
        )
    )
    _grid_ok(tmp_path / "b.png", 3, 2)
    ok(
        cm(
            "edit",
            "superres",
            runs["ict"],
            "--input",
            "digits",
            "--limit",
            2,
            "--sigmas",
            "80,2",
            "--out",
            tmp_path / "c.png",
        )
    )
    _grid_ok(tmp_path / "c.png", 3, 2)
    samples = tmp_path / "s.npz"
    np.savez(samples, arr_0=np.full((2, 8, 8, 1), 200, np.uint8))
    ok(
        cm(
            "edit",
            "stroke",
            runs["ict"],
            "--input",
            samples,
            "--class-label",
            1,
            "--nfe",
            2,
            "--out",
            tmp_path / "d.png",
        )
    )
    _grid_ok(tmp_path / "d.png", 3, 2)
    ok(
        cm(
            "edit",
            "interpolate",
            runs["ict"],
            "--seeds",
            "1,2",
            "--points",
            4,
            "--class-label",
            0,
            "--out",
            tmp_path / "e.png",
        )
    )
    _grid_ok(tmp_path / "e.png", 1, 4)


def test_edit_errors(runs, tmp_path):
    out = tmp_path / "o.png"
    fails(cm("edit", "colorize", runs["ict"], "--input", "digits", "--out", out), 1, "RGB")
    fails(cm("edit", "inpaint", runs["edm"], "--input", "digits", "--mask", "left", "--out", out), 1, "diffusion")
    fails(
        cm("edit", "inpaint", runs["ict"], "--input", "digits", "--mask", tmp_path / "m.png", "--out", out), 1, "m.png"
    )
    big = tmp_path / "big.png"
    cm_eval.save_png(big, np.zeros((16, 16), np.uint8))
    fails(cm("edit", "inpaint", runs["ict"], "--input", "digits", "--mask", big, "--out", out), 1, "16×16", "8×8")
    fails(cm("edit", "superres", runs["ict"], "--input", tmp_path / "none.png", "--out", out), 1, "none.png")
    fails(cm("edit", "interpolate", runs["ict"], "--seeds", "1,2", "--out", out), 2, "--class-label")
    fails(cm("edit", "interpolate", runs["ict"], "--seeds", "1", "--class-label", 0, "--out", out), 2, "--seeds")
    fails(cm("edit", "superres", runs["ict"], "--input", "digits", "--nfe", 0, "--out", out), 2, "--nfe")
    out.write_bytes(b"")
    fails(cm("edit", "superres", runs["ict"], "--input", "digits", "--out", out), 1, "exists", "--overwrite")


# --- invert / reconstruct -------------------------------------------------------------------------


def test_invert_and_reconstruct(runs, tmp_path):
    out = tmp_path / "lat.npz"
    ok(cm("invert", runs["bcm"], "--input", "digits", "--limit", 3, "--out", out))
    arrays = npz(out)
    assert arrays["latents"].shape == (3, 1, 8, 8) and np.isfinite(arrays["latents"]).all()
    assert arrays["sigmas"].tolist() == [0.07, 15.0, 80.0] and arrays["labels"].shape == (3,)
    ok(cm("invert", runs["bcm"], "--input", "digits", "--limit", 2, "--jumps", 3, "--out", out, "--overwrite"))
    assert len(npz(out)["sigmas"]) == 4
    old = ok(cm("invert", runs["bcm"], "--input", "digits", "--limit", 2, "--steps", 3, "--out", out, "--overwrite"))
    assert "--steps is deprecated" in old.stderr and len(npz(out)["sigmas"]) == 4

    grid, report = tmp_path / "rec.png", tmp_path / "rec.json"
    result = ok(cm("reconstruct", runs["bcm"], "--input", "digits", "--limit", 3, "--out", grid, "--json", report))
    assert "MSE" in result.output and "PSNR" in result.output
    assert cm_eval.load_png(grid).shape == (19, 28, 1)
    assert np.isfinite(json.loads(report.read_text())["mse"])


def test_invert_errors(runs, tmp_path):
    out = tmp_path / "lat.npz"
    fails(cm("invert", runs["ict"], "--input", "digits", "--out", out), 1, "needs a BCM checkpoint", "'ict'")
    fails(cm("reconstruct", runs["edm"], "--input", "digits", "--out", tmp_path / "r.png"), 1, "BCM", "'edm'")
    fails(cm("invert", runs["bcm"], "--input", "digits", "--sigmas", "80,15,0.07", "--out", out), 1, "increasing")
    fails(cm("invert", runs["bcm"], "--input", "digits", "--jumps", 0, "--out", out), 2, "--jumps")
    rgb = tmp_path / "rgb.npz"
    np.savez(rgb, arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    fails(cm("invert", runs["bcm"], "--input", rgb, "--class-label", 0, "--out", out), 1, "3×8×8", "1×8×8")
    fails(cm("invert", runs["bcm"], "--input", rgb, "--out", out), 1, "3×8×8")
    assert not out.exists()


# --- eval -----------------------------------------------------------------------------------------


def test_eval_digits_inversion_ode_error_sweep(runs, tmp_path):
    samples = tmp_path / "s.npz"
    ok(cm("sample", runs["ict"], "--num", 6, "--out", samples))
    report = tmp_path / "d.json"
    result = ok(cm("eval", "digits", samples, "--json", report))
    assert "FD-digits" in result.output and "class accuracy" in result.output
    assert np.isfinite(json.loads(report.read_text())["fd_digits"])
    fails(cm("eval", "digits", samples, "--json", report), 1, "exists")

    result = ok(cm("eval", "inversion", runs["bcm"], "--input", "digits", "--limit", 2, "--jumps", 1))
    assert "PSNR" in result.output
    fails(cm("eval", "inversion", runs["ict"], "--input", "digits"), 1, "BCM", "'ict'")

    result = ok(cm("eval", "ode-error", runs["ict"], "--teacher", runs["edm"], "--num", 3, "--nfe", 2,
                   "--teacher-points", 3))  # fmt: skip
    assert "ODE error" in result.output and "teacher NFE 4" in result.output
    fails(cm("eval", "ode-error", runs["ict"], "--teacher", runs["bcm"], "--num", 2), 1, "--teacher", "'bcm'")

    plot, sweep = tmp_path / "sweep.png", tmp_path / "sweep.json"
    result = ok(cm("eval", "sweep", runs["ict"], "--nfe", "1,2", "--num", 4, "--out", plot, "--json", sweep))
    assert cm_eval.load_png(plot).ndim == 3
    rows = json.loads(sweep.read_text())["karras"]
    assert [r["nfe"] for r in rows] == [1, 2] and all(np.isfinite(r["metric"]) for r in rows)
    fails(cm("eval", "sweep", runs["ict"], "--nfe", "1,x", "--out", tmp_path / "p.png"), 2, "--nfe")
    fails(cm("eval", "sweep", runs["edm"], "--nfe", "1", "--out", tmp_path / "p.png"), 1, "diffusion")


def test_eval_needs_weights_and_inputs(tmp_path):
    samples = tmp_path / "s.npz"
    np.savez(samples, arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    weights = tmp_path / "pt_inception.pth"
    fails(cm("eval", "fid", samples, "--ref", samples, "--inception", weights), 1, str(weights), "pytorch-fid")
    fails(cm("eval", "is", samples, "--inception", weights), 1, str(weights))
    fails(cm("eval", "precision-recall", samples, "--ref-images", samples, "--inception", weights), 1, str(weights))
    fails(cm("eval", "fd-dino", samples, "--ref", samples, "--dino", tmp_path / "dino.pth"), 1, "dino.pth")
    fails(cm("eval", "fid", samples, "--ref", samples), 2, "--inception")
    fails(cm("eval", "digits", tmp_path / "none.npz"), 1, "none.npz")
    bad = tmp_path / "bad.npz"
    np.savez(bad, images=np.zeros((2, 8, 8, 1), np.uint8))
    fails(cm("eval", "digits", bad), 1, "arr_0")


# --- stats ----------------------------------------------------------------------------------------


def test_stats_ref(tmp_path):
    out = tmp_path / "refs.npz"
    result = ok(cm("stats", "ref", "digits", "--features", "digits", "--out", out))
    assert "1797 images" in result.output
    arrays = npz(out)
    assert arrays["mu"].shape == (64,) and arrays["sigma"].shape == (64, 64) and np.isfinite(arrays["sigma"]).all()
    fails(cm("stats", "ref", "digits", "--features", "digits", "--out", out), 1, "exists")

    images = tmp_path / "imgs.npz"
    np.savez(images, arr_0=np.random.default_rng(0).integers(0, 255, (5, 8, 8, 1), dtype=np.uint8))
    ok(cm("stats", "ref", images, "--features", "digits", "--out", tmp_path / "r2.npz"))
    assert npz(tmp_path / "r2.npz")["mu"].shape == (64,)
    fails(cm("stats", "ref", tmp_path / "none", "--features", "digits", "--out", tmp_path / "r3.npz"), 1, "none")
    fails(cm("stats", "ref", "digits", "--features", "inception", "--out", tmp_path / "r3.npz"), 2, "--weights")
    fails(cm("stats", "ref", "digits", "--features", "clip", "--out", tmp_path / "r3.npz"), 2, "--features")


# --- bench, info, convert, demo -------------------------------------------------------------------


def test_bench(monkeypatch, tmp_path, capfd):
    ok(cm("bench", "kernels", "--help"))  # the script's own argparse help, passed through (a subprocess)
    assert "--malloc" in capfd.readouterr().out
    assert cm("bench", "kernels", "--no-such-flag").exit_code == 2  # the script's exit status comes back
    fails(cm("bench", "no-such-bench"), 2, "no-such-bench")
    ok(cm("bench", "gpu", "--help"))  # tools/bench/gpu.py, the measuring part of tools/gpu_check.sh
    assert "--tiny" in capfd.readouterr().out
    from cm_cli.commands import bench

    monkeypatch.setattr(bench, "bench_dir", lambda: tmp_path / "bench")
    fails(cm("bench", "nets"), 1, "source checkout")


def test_convert(monkeypatch, tmp_path):
    import cm_nets

    src = tmp_path / "model.pt"
    src.write_bytes(b"not really a checkpoint")
    monkeypatch.setattr(cm_nets, "from_openai", lambda path, preset=None: cm_nets.create("mlp-toy", dim=2, hidden=8))
    out = tmp_path / "net.safetensors"
    ok(cm("convert", "openai", src, "--out", out))
    assert out.is_file() and out.with_suffix(".json").is_file()
    assert isinstance(cm_nets.load(out), torch.nn.Module)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
    fails(cm("convert", "openai", src, "--out", out), 1, "exists", "--overwrite")
    ok(cm("convert", "openai", src, "--out", out, "--overwrite"))
    fails(cm("convert", "edm", src, "--out", tmp_path / "e.safetensors"), 1, "model.pt is not a readable pickle")
    fails(cm("convert", "tf", src, "--out", tmp_path / "e.safetensors"), 2, "tf")
    fails(cm("convert", "openai", tmp_path / "none.pt", "--out", tmp_path / "f.safetensors"), 1, "none.pt")
    fails(cm("convert", "openai", src, "--out", tmp_path / "f.bin"), 2, ".safetensors")


def test_demo_refuses_existing_output(tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    fails(cm("demo", "--out", out), 1, str(out), "--overwrite")


def test_eval_fid_and_fd_dino_compute_the_frechet_distance(tmp_path, monkeypatch):
    """The shared FID / FD-DINOv2 path with a stand-in extractor (the real weights are not offline)."""
    from cm_cli.commands import evaluate

    class Pixels(torch.nn.Module):  # features: the first 6 pixel values of each image in [0, 1]
        def forward(self, x):
            feats = x.flatten(1)[:, :6].double()
            return {"pool": feats, "features": feats}

    monkeypatch.setattr(evaluate, "_inception", lambda path: Pixels())
    monkeypatch.setattr(cm_eval, "dinov2", lambda path: Pixels())
    rng = np.random.default_rng(0)
    fake = rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    real = rng.integers(0, 200, (50, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", arr_0=fake)
    np.savez(tmp_path / "ref.npz", arr_0=real)
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"stand-in")

    def stats(a):
        f = (a.astype(np.float64) / 255).transpose(0, 3, 1, 2).reshape(len(a), -1)[:, :6]
        return f.mean(0), np.cov(f, rowvar=False)

    expected = cm_eval.frechet_distance(*stats(fake), *stats(real))
    out = ok(cm("eval", "fid", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "ref.npz"), "--inception",
                str(weights), "--json", str(tmp_path / "fid.json")))  # fmt: skip
    assert json.loads((tmp_path / "fid.json").read_text())["fid"] == pytest.approx(expected, rel=1e-6)
    assert "FID" in out.output
    ok(cm("eval", "fd-dino", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "ref.npz"), "--dino", str(weights),
          "--json", str(tmp_path / "dino.json")))  # fmt: skip
    assert json.loads((tmp_path / "dino.json").read_text())["fd_dinov2"] == pytest.approx(expected, rel=1e-6)


def test_unreadable_inputs_name_the_file(tmp_path):
    """A truncated .npz, a folder with a corrupt PNG and a non-checkpoint .pt each give one line naming
    the file (they were `BadZipFile`, `error: error: Error -5 while decompressing data`, `error: 101`)."""
    from cm_nets.files import encode_png

    good = tmp_path / "good.npz"
    np.savez(good, np.zeros((4, 8, 8, 1), np.uint8))
    trunc = tmp_path / "trunc.npz"
    trunc.write_bytes(good.read_bytes()[:60])
    fails(cm("eval", "digits", trunc), 1, "trunc.npz: not a readable .npz")
    folder = tmp_path / "pngs"
    folder.mkdir()
    png = encode_png(np.zeros((8, 8, 1), np.uint8))
    (folder / "a.png").write_bytes(png)
    (folder / "b.png").write_bytes(png[:40] + bytes(len(png) - 40))  # right header, corrupt data
    result = cm("eval", "digits", folder)
    fails(result, 1, "b.png: not a readable PNG")
    assert "error: error" not in result.stderr
    for content in (b"101\n", b""):
        pt = tmp_path / "b.pt"
        pt.write_bytes(content)
        result = cm("convert", "openai", pt, "--out", tmp_path / "o.safetensors")
        fails(result, 1, "b.pt")
        assert "weights_only" not in result.stderr


def test_train_interrupted_exits_75_with_one_line(monkeypatch, tmp_path):
    """A signal during `cm train` ends with the checkpoint committed, one line saying how to resume,
    and exit status 75 for requeue scripts (the trainer side: cm-train's test_a_signal_commits_...)."""
    import cm_train

    def stopped(cfg, **kw):
        raise cm_train.Interrupted("SIGTERM", 12, tmp_path / "run" / "checkpoints" / "step-00000012")

    monkeypatch.setattr(cm_train, "run", stopped)
    result = cm("train", DIGITS, f"run.dir={tmp_path / 'run'}")
    fails(result, 75, "SIGTERM: stopped after step 12", "run the same command again to resume")


def test_few_samples_warn_in_one_line(tmp_path):
    """FD-digits from fewer samples than its 64 feature dimensions: one `warning:` line saying so."""
    samples = tmp_path / "few.npz"
    rng = np.random.default_rng(0)
    np.savez(samples, rng.integers(0, 255, (20, 8, 8, 1), dtype=np.uint8))
    # a real process: pytest records warnings itself instead of printing them
    proc = subprocess.run([sys.executable, "-m", "cm_cli", "eval", "digits", str(samples)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: covariance of 20 samples of 64-d features"), lines
    assert "at least 65 samples" in lines[0]


def test_unwritable_output_names_the_users_file(tmp_path, monkeypatch):
    """A folder that cannot be written: the message names the requested output (not a temporary such
    as `ro/.i.png.e0njyfuw.tmp`), and `cm eval --json` fails before it prints any result."""
    from cm_nets import files

    samples = tmp_path / "s.npz"
    np.savez(samples, np.zeros((70, 8, 8, 1), np.uint8))
    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == ro else real_access(p, mode, **k))
    result = cm("eval", "digits", samples, "--json", ro / "r.json")
    fails(result, 1, f"cannot write {ro / 'r.json'}: {ro} is not writable")
    assert "FD-digits" not in result.stdout  # nothing printed before the failure

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(files.tempfile, "mkstemp", denied)
    with pytest.raises(PermissionError, match=rf"cannot write {re.escape(str(ro / 'i.png'))}: Permission denied"):
        files.atomic_write_bytes(ro / "i.png", b"x")


def test_threads_option_reaches_the_training_run(tmp_path):
    before = torch.get_num_threads()
    try:
        result = ok(cm("--threads", "2", "train", str(DIGITS), f"run.dir={tmp_path / 'run'}", *TINY))
    finally:
        torch.set_num_threads(before)
    assert "cpu threads: 2 (run.threads = 2)" in result.output
    assert json.loads((tmp_path / "run" / "config.json").read_text())["run"]["threads"] == 2

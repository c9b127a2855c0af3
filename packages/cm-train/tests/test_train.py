"""The trainer on tiny problems: objectives learn, resume is bit-exact, the guard works."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import cm_core
import numpy as np
import cm_nets
import pytest
import torch
from cm_train import ConfigError, DivergenceError, latest_checkpoint, load_checkpoint, load_config, run


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def _mixture_score(run_dir, cfg, n=512):
    """Mean distance of one-step samples to the nearest true component mean (lower is better)."""
    from cm_train.data import build_dataset

    ds = build_dataset(cfg.data, cfg.run.seed)
    means = torch.stack([ds.x[ds.labels == k].mean(0) for k in range(ds.num_classes)])
    ckpt = latest_checkpoint(run_dir)
    net = cm_nets.load(ckpt / "ema-ema.safetensors")
    f = cm_core.ConsistencyFunction(net, c_noise=cfg.model.c_noise)
    with torch.no_grad():
        x = cm_core.onestep_sample(f, torch.randn(n, 2, generator=torch.Generator().manual_seed(0)))
    return torch.cdist(x, means).min(1).values.mean().item()


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("ict", {"s0": 10, "s1": 40}),
        ("ct", {"s0": 2, "s1": 40}),
        ("ect", {"double_steps": 60}),
        ("bcm", {"num_scales": 41}),
    ],
)
def test_consistency_objectives_learn_the_mixture(tiny_config, tmp_path, name, kwargs):
    sections = dict(
        run={"total_steps": 240, "batch_size": 64},
        objective={"name": name, "kwargs": kwargs},
        ema=[{"kind": "constant", "decay": 0.95}],
        checkpoint={"every": 0},
        log={"every": 10, "progress": False},
    )
    if name == "bcm":
        sections["model"] = {"overrides": {"dim": 2, "hidden": 32, "depth": 2, "emb_dim": 16, "bcm": True}}
    cfg = load_config(tiny_config(**sections))
    run(cfg, log=lambda m: None)
    losses = _losses(cfg.run.dir)
    assert all(v is not None and v == v for v in losses)
    before = _mixture_score_untrained(cfg)
    after = _mixture_score(cfg.run.dir, cfg)
    assert after < 0.6 * before, (name, before, after)


def _mixture_score_untrained(cfg):
    import copy

    from cm_train.data import build_dataset

    ds = build_dataset(cfg.data, cfg.run.seed)
    means = torch.stack([ds.x[ds.labels == k].mean(0) for k in range(ds.num_classes)])
    torch.manual_seed(0)
    net = cm_nets.create(cfg.model.preset, **copy.deepcopy(cfg.model.overrides))
    f = cm_core.ConsistencyFunction(net, c_noise=cfg.model.c_noise)
    with torch.no_grad():
        x = cm_core.onestep_sample(f, torch.randn(512, 2, generator=torch.Generator().manual_seed(0)))
    return torch.cdist(x, means).min(1).values.mean().item()


@pytest.mark.parametrize("name", ["edm", "cdm"])
def test_diffusion_objectives_loss_falls(tiny_config, name):
    cfg = load_config(
        tiny_config(
            run={"total_steps": 150, "batch_size": 64},
            objective={"name": name},
            checkpoint={"every": 0},
            log={"every": 10, "progress": False},
        )
    )
    run(cfg, log=lambda m: None)
    losses = _losses(cfg.run.dir)
    assert sum(losses[-3:]) < 0.7 * sum(losses[:3]), losses


def test_ct_target_network_follows_the_ct_ema(tiny_config):
    import cm_core as core

    cfg = load_config(
        tiny_config(
            run={"total_steps": 3},
            checkpoint={"every": 1, "keep_last": 5},
            objective={"name": "ct", "kwargs": {"s0": 2, "s1": 40}, "target": "ct", "ct_s0": 2, "ct_s1": 40},
        )
    )
    run(cfg, log=lambda m: None)
    from cm_train import list_checkpoints

    ckpts = list_checkpoints(cfg.run.dir)
    nets = [load_checkpoint(c)[0] for c in ckpts]
    # target_k+1 = μ(k)·target_k + (1 − μ(k))·net_k+1, with μ(k) from CT's N(k) (μ0 = 0.95).
    for k in (1, 2):
        mu = core.ct_target_ema(k, 3, 2, 40, 0.95)
        for key, t_new in nets[k]["target"].items():
            expect = mu * nets[k - 1]["target"][key] + (1 - mu) * nets[k]["net"][key]
            torch.testing.assert_close(t_new, expect, rtol=1e-5, atol=1e-6)


def test_distillation_from_a_teacher_checkpoint(tiny_config, tmp_path):
    teacher_cfg = load_config(
        tiny_config(
            run={"total_steps": 100, "batch_size": 64, "dir": str(tmp_path / "t")},
            objective={"name": "edm"},
            checkpoint={"every": 0},
        )
    )
    run(teacher_cfg, log=lambda m: None)
    teacher = latest_checkpoint(tmp_path / "t") / "ema-ema.safetensors"
    for name, kw in (("cd", {"num_scales": 18}), ("direct-cm", {"num_scales": 18, "ode_steps": 4})):
        cfg = load_config(
            tiny_config(
                run={"total_steps": 30, "batch_size": 32, "dir": str(tmp_path / name)},
                model={"teacher": str(teacher)},
                objective={"name": name, "kwargs": kw, "target": "constant" if name == "cd" else "none"},
            )
        )
        out = run(cfg, log=lambda m: None)
        assert out["step"] == 30 and all(v == v for v in _losses(cfg.run.dir))


def _weights(run_dir):
    nets, state, meta = load_checkpoint(latest_checkpoint(run_dir))
    return nets, state


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_resume_is_bit_exact(tiny_config, tmp_path, precision):
    common = dict(
        model={"overrides": {"dim": 2, "hidden": 32, "depth": 2, "emb_dim": 16, "dropout": 0.1}},
        precision={"mode": precision},
        ema=[{"kind": "power", "sigma_rel": 0.1}],
        # the curriculum is pinned to 20 steps; the first run just stops early at 13
        objective={"name": "ict", "kwargs": {"total_steps": 20}},
        checkpoint={"every": 7},
    )
    straight = load_config(tiny_config(run={"total_steps": 20, "dir": str(tmp_path / "a")}, **common))
    run(straight, log=lambda m: None)
    first = load_config(tiny_config(run={"total_steps": 13, "dir": str(tmp_path / "b")}, **common))
    run(first, log=lambda m: None)  # stops mid-epoch, between checkpoint intervals
    longer = {"total_steps": 20, "dir": str(tmp_path / "b")}
    with pytest.raises(ConfigError, match=r"run.total_steps: 13 -> 20: pass run.allow_config_change=true"):
        run(load_config(tiny_config(run=longer, **common)), log=lambda m: None)
    second = load_config(tiny_config(run={**longer, "allow_config_change": True}, **common))
    logged = []
    run(second, log=logged.append)
    assert any("config changes (run.allow_config_change): run.total_steps: 13 -> 20" in m for m in logged)
    a, sa = _weights(tmp_path / "a")
    b, sb = _weights(tmp_path / "b")
    assert sa["step"] == sb["step"] == 20
    for group in ("net", "ema-ema"):
        for key in a[group]:
            assert torch.equal(a[group][key], b[group][key]), (group, key)
    assert sa["scaler"] == sb["scaler"]
    torch.testing.assert_close(sa["rng"][0]["cpu"], sb["rng"][0]["cpu"], rtol=0, atol=0)


def test_resume_refuses_a_changed_model_or_objective(tiny_config, tmp_path):
    base = dict(run={"total_steps": 10, "dir": str(tmp_path / "r")}, checkpoint={"every": 5})
    run(load_config(tiny_config(**base)), log=lambda m: None)
    bigger = tiny_config(**base, model={"overrides": {"hidden": 48}})
    with pytest.raises(ConfigError, match=r"cannot resume .* changed model.overrides: .*hidden.*use another run.dir"):
        run(load_config(bigger), log=lambda m: None)
    other = tiny_config(**{**base, "run": {**base["run"], "allow_config_change": True}}, objective={"name": "ct"})
    with pytest.raises(ConfigError, match=r"changed objective.name: 'ict' -> 'ct'"):  # even when allowed
        run(load_config(other), log=lambda m: None)
    lr = tiny_config(**base, optim={"lr": 3e-3})
    with pytest.raises(ConfigError, match=r"optim.lr: .* -> 0.003: pass run.allow_config_change=true"):
        run(load_config(lr), log=lambda m: None)
    quiet = tiny_config(**base, log={"every": 1})  # logging and checkpoint keys change nothing learned
    run(load_config(quiet), log=lambda m: None)


def test_sigkill_during_checkpoint_write_leaves_the_previous_one(tiny_config, tmp_path):
    cfg = tiny_config(run={"total_steps": 30, "dir": str(tmp_path / "k")}, checkpoint={"every": 10})
    script = textwrap.dedent(f"""
        import os, signal, torch
        import cm_train.checkpoint as ck
        from cm_train import load_config, run
        real = torch.save
        calls = []
        def dying_save(obj, path, *a, **k):
            calls.append(path)
            if len(calls) == 2:          # the second checkpoint: die half-way through writing it
                open(path, "wb").write(b"half")
                os.kill(os.getpid(), signal.SIGKILL)
            return real(obj, path, *a, **k)
        ck.torch.save = dying_save
        run(load_config({cfg!r}), log=lambda m: None)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    ckpt = latest_checkpoint(tmp_path / "k")
    assert ckpt.name == "step-00000010"
    nets, state, meta = load_checkpoint(ckpt)
    assert state["step"] == 10
    leftovers = list((tmp_path / "k" / "checkpoints").glob(".step-*"))
    assert leftovers, "the killed write should have left only a temporary folder"
    out = run(load_config(cfg), log=lambda m: None)  # resumes from step 10 and finishes
    assert out["step"] == 30 and not list((tmp_path / "k" / "checkpoints").glob(".step-*"))


class FlakyObjective:
    """Wraps an objective and returns NaN losses for the calls in ``bad`` (counted across the run)."""

    def __init__(self, inner, bad):
        self.inner, self.bad, self.calls = inner, set(bad), 0

    def __call__(self, f, x0, **kw):
        loss, stats = self.inner(f, x0, **kw)
        self.calls += 1
        if self.calls in self.bad:
            loss = loss * float("nan")
        return loss, stats


def test_nan_steps_are_skipped_and_persistent_nans_roll_back(tiny_config):
    messages = []
    cfg = load_config(
        tiny_config(run={"total_steps": 40}, guard={"max_bad_steps": 2, "window": 10}, checkpoint={"every": 10})
    )
    objective = FlakyObjective(cm_core.create_objective("ict", total_steps=40), bad={3, 25, 26, 27})
    out = run(cfg, objective=objective, log=messages.append)
    assert out["step"] == 40
    assert any("non-finite" in m and "step 2" in m for m in messages)
    assert any("rolled back to step-00000020" in m for m in messages), messages
    _, state = _weights(cfg.run.dir)
    assert state["lr_factor"] == 0.5 and state["rollbacks"] == 1
    nets, _ = _weights(cfg.run.dir)
    assert all(torch.isfinite(t).all() for t in nets["net"].values())


def test_endless_nans_stop_with_a_clear_error(tiny_config):
    cfg = load_config(
        tiny_config(run={"total_steps": 40}, guard={"max_bad_steps": 1, "max_rollbacks": 1}, checkpoint={"every": 5})
    )
    objective = FlakyObjective(cm_core.create_objective("ict", total_steps=40), bad=set(range(8, 1000)))
    with pytest.raises(DivergenceError, match="rollbacks"):
        run(cfg, objective=objective, log=lambda m: None)


def test_sample_grids_and_logs_are_written(tiny_config, tmp_path):
    cfg = load_config(
        {
            "run": {"dir": str(tmp_path / "img"), "total_steps": 4, "batch_size": 16},
            "data": {"source": "digits", "conditional": True},
            "model": {
                "preset": "unet-tiny",
                "overrides": {"image_size": 8, "num_classes": 10, "model_channels": 32, "num_head_channels": 32},
            },
            "objective": {"name": "ict", "kwargs": {"s0": 10, "s1": 40}},
            "log": {"every": 2, "sample_every": 2, "sample_count": 16, "progress": False},
            "checkpoint": {"every": 0},
        }
    )
    out = run(cfg, log=lambda m: None)
    pngs = sorted((tmp_path / "img" / "samples").glob("*.png"))
    assert {p.name for p in pngs} >= {"step-00000002-1step.png", "step-00000004-2step.png"}
    assert pngs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "img" / "config.json").read_text())["run"]["total_steps"] == 4
    assert len(_losses(tmp_path / "img")) == 2 and out["samples"]
    line = json.loads((tmp_path / "img" / "metrics.jsonl").read_text().splitlines()[-1])
    buckets = [k for k in line if k.startswith("loss_sigma_")]
    assert buckets and all(line[k] >= 0 for k in buckets)


def test_bad_runs_fail_early_with_the_key(tiny_config):
    with pytest.raises(ConfigError, match="batch_per_rank=5 must divide"):
        run(load_config(tiny_config(run={"batch_per_rank": 5})), log=lambda m: None)
    with pytest.raises(ConfigError, match="exceeds the dataset size"):
        run(load_config(tiny_config(run={"batch_size": 100_000})), log=lambda m: None)
    with pytest.raises(ConfigError, match="model: .*unknown"):
        run(load_config(tiny_config(model={"preset": "resnet-9000"})), log=lambda m: None)
    with pytest.raises(ConfigError, match="needs a teacher"):
        run(load_config(tiny_config(objective={"name": "cd"})), log=lambda m: None)
    with pytest.raises(ConfigError, match="objective.kwargs.s9 is not an argument"):
        run(load_config(tiny_config(objective={"name": "ict", "kwargs": {"s9": 1}})), log=lambda m: None)


def test_best_checkpoint_is_kept_and_early_stop(tiny_config, tmp_path):
    import cm_train.loop as loop

    values = iter([5.0, 3.0, 4.0, 4.5, 6.0, 7.0])
    original = loop.Trainer.evaluate
    loop.Trainer.evaluate = lambda self, last: next(values)  # a scripted metric: best at the 2nd evaluation
    try:
        messages = []
        cfg = load_config(
            tiny_config(
                run={"total_steps": 60},
                checkpoint={"every": 5, "keep_last": 1, "best_metric": "loss", "early_stop_patience": 3},
            )
        )
        out = run(cfg, objective=None, log=messages.append)
    finally:
        loop.Trainer.evaluate = original
    best = json.loads((tmp_path / "run" / "best.json").read_text())
    assert best["value"] == 3.0 and best["step"] == 10
    from cm_train import list_checkpoints

    names = [p.name for p in list_checkpoints(cfg.run.dir)]
    assert "step-00000010" in names  # the best survives keep_last = 1
    assert any("early stop at step 25" in m for m in messages), messages
    assert out["step"] == 25


def test_an_unknown_best_metric_is_refused_with_what_is_known(tiny_config):
    cfg = load_config(tiny_config(checkpoint={"every": 0, "best_metric": "fd_digits"}))
    with pytest.raises(ConfigError, match=r"best_metric = 'fd_digits' is not known here \(known: loss\).*cm train"):
        run(cfg, log=lambda m: None)
    seen = []
    out = run(cfg, log=lambda m: None, metrics={"fd_digits": lambda trainer, last: seen.append(last) or 1.5})
    assert seen and out["step"] == cfg.run.total_steps
    best = json.loads((Path(cfg.run.dir) / "best.json").read_text())
    assert best == {"metric": "fd_digits", "value": 1.5, "step": cfg.run.total_steps, "checkpoint": best["checkpoint"]}



@pytest.mark.parametrize("signame", ["SIGTERM", "SIGUSR1", "SIGINT"])
def test_a_signal_commits_a_checkpoint_and_exits_75(tiny_config, tmp_path, signame):
    """SLURM sends SIGTERM (or SIGUSR1 with --signal) before a time limit, a user Ctrl-C: the run
    finishes its step, commits a checkpoint, says how to resume and exits 75; rerunning resumes."""
    cfg = tiny_config(run={"total_steps": 100000, "dir": str(tmp_path / "s")}, checkpoint={"every": 0})
    cfg_path = tmp_path / "c.json"
    cfg_path.write_text(json.dumps(cfg))
    proc = subprocess.Popen(
        [sys.executable, "-m", "cm_train", "--config", str(cfg_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    metrics = tmp_path / "s" / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 120
        while not (metrics.exists() and metrics.stat().st_size) and proc.poll() is None:  # training runs
            assert time.monotonic() < deadline, "no metrics line within 120 s"
            time.sleep(0.05)
        proc.send_signal(getattr(signal, signame))
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 75, err
    assert f"{signame}: stopped after step" in err and "run the same command again to resume" in err
    ckpt = latest_checkpoint(tmp_path / "s")
    assert ckpt is not None, err
    step = load_checkpoint(ckpt)[1]["step"]
    assert 0 < step < 100000 and f"stopped after step {step} " in err
    more = load_config({**cfg, "run": {**cfg["run"], "total_steps": step + 3, "allow_config_change": True}})
    assert run(more, log=lambda m: None)["step"] == step + 3  # resumes from the committed step


def test_progress_lines_when_not_a_terminal(tiny_config):
    """A redirected run (pytest's capture is not a terminal, so tqdm stays silent) still says how far
    it is: a line at the first logged step and at the last."""
    messages = []
    cfg = load_config(tiny_config(run={"total_steps": 20}, log={"every": 5, "progress": True}))
    run(cfg, log=messages.append)
    lines = [m for m in messages if "img/s, about" in m]
    assert lines[0].startswith("[cm-train] step 5/20 (25 %), loss ") and "step 20/20 (100 %)" in lines[-1], lines
    assert len(lines) == 2  # nothing in between: at most one line per 30 s


def test_fp16_overflows_are_not_divergence(tiny_config):
    """With a loss scale far too high for fp16 (2^24) the first steps overflow; GradScaler backs off
    and the run goes on. These used to count as non-finite steps: rollback with LR × 0.5, or a
    DivergenceError at step 0."""
    messages = []
    cfg = load_config(
        tiny_config(
            run={"total_steps": 30},
            precision={"mode": "fp16", "init_scale": 2.0**24},
            guard={"max_bad_steps": 2, "window": 10, "max_rollbacks": 0},
            checkpoint={"every": 10},
        )
    )
    out = run(cfg, log=messages.append)
    said = "\n".join(messages)
    assert out["step"] == 30
    assert "fp16 gradient overflow, step skipped, loss scale lowered" in said
    assert "rolled back" not in said and "non-finite loss or gradient" not in said
    state = load_checkpoint(latest_checkpoint(cfg.run.dir))[1]
    assert state["scaler"]["scale"] < 2.0**24  # the scale settled lower


def test_a_nan_loss_under_fp16_is_still_divergence(tiny_config):
    cfg = load_config(tiny_config(run={"total_steps": 40}, precision={"mode": "fp16"}, guard={"max_bad_steps": 1, "window": 10}))
    objective = FlakyObjective(cm_core.create_objective("ict", total_steps=40), bad=set(range(1, 100)))
    with pytest.raises(DivergenceError):
        run(cfg, objective=objective, log=lambda m: None)


def test_the_model_is_sized_from_the_data(tmp_path):
    """digits.toml on a folder of 32×32 RGB images, unconditional: it used to need
    model.overrides={image_size=32,in_channels=3,out_channels=3,attention_resolutions=[8]} and ended in
    raw torch errors without them."""
    from cm_nets.files import save_png

    folder = tmp_path / "faces"
    rng = np.random.default_rng(0)
    for i in range(24):
        save_png(folder / f"{i:03d}.png", rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    digits = Path(__file__).parents[1] / "configs" / "digits.toml"
    over = [f"data.path={folder}", "data.conditional=false", "run.total_steps=5", "run.batch_size=8",
            f"run.dir={tmp_path / 'r'}", "log.progress=false", "log.sample_count=4"]  # fmt: skip
    messages = []
    run(load_config(digits, over), log=messages.append)
    said = "\n".join(messages)
    assert "model unet-tiny sized from the data: image_size 8 -> 32, in_channels 1 -> 3, out_channels 1 -> 3" in said
    assert "attention_resolutions (4,) -> (16,)" in said
    nets = load_checkpoint(latest_checkpoint(tmp_path / "r"))[0]
    assert nets["net"]["input_blocks.0.0.weight"].shape[1] == 3
    # an explicit override that contradicts the data: one line naming the key and the fix
    with pytest.raises(ConfigError, match=r"model.overrides.image_size = 16 does not fit the data \(3×32×32 images, "
                       r"unconditional, which needs 32\): drop the override .* or change data.resolution"):  # fmt: skip
        run(load_config(digits, [*over, "model.overrides={image_size = 16}", f"run.dir={tmp_path / 'q'}"]), log=print)

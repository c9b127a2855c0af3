"""`cm convert edm` on snapshots with the byte structure of EDM's / ECT's training loops.

The numerical agreement with EDM's forward is cm-nets' test (test_edm_snapshots.py); here: the
command reads the architecture from the snapshot (no --preset), says what it found, writes a
checkpoint that `cm_nets.load` rebuilds exactly, and fails with one clear line otherwise.
"""

import os

import cm_nets
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from cm_cli.main import cli
from cm_nets.testing import EasyDict, EDMRecord, RunsShellCommand, edm_records, edm_snapshot_bytes

# EDM's train.py --arch=ddpmpp with --augment: what SongUNet._init_kwargs records (shrunk).
EDM_KWARGS = dict(
    img_resolution=16, in_channels=3, out_channels=3, label_dim=0, embedding_type="positional",
    encoder_type="standard", decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1],
    model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], augment_dim=9, dropout=0.13,
)  # fmt: skip


def cm(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], prog_name="cm")


def fails(result, code, *words):
    err = result.stderr
    assert result.exit_code == code, (result.output, result.exception)
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for w in words:
        assert w in err, (w, err)


def snapshot(path, precond="EDMPrecond", **kwargs):
    """A network-snapshot-*.pkl as EDM's training_loop.py writes it, around a random SongUNet."""
    kw = dict(EDM_KWARGS, **kwargs)
    torch.manual_seed(0)
    net = cm_nets.create("ddpmpp-cifar10", **kw).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sigma_min = 0.003 if precond == "ECMPrecond" else 0
    precond_attrs = dict(img_resolution=16, img_channels=3, label_dim=kw["label_dim"], use_fp16=False,
                         sigma_min=sigma_min, sigma_max=float("inf"), sigma_data=0.5)  # fmt: skip
    ema = EDMRecord(precond, attrs=precond_attrs, modules={"model": edm_records(net, kw)}, init_kwargs={})
    data = dict(
        ema=ema,
        loss_fn=EDMRecord("EDMLoss", attrs=dict(P_mean=-1.2, P_std=1.2, sigma_data=np.float64(0.5))),
        augment_pipe=EDMRecord("AugmentPipe", attrs=dict(p=0.12, xflip=1e8)),
        dataset_kwargs=EasyDict(path="datasets/cifar10-32x32.zip", resolution=16, use_labels=False),
    )
    path.write_bytes(edm_snapshot_bytes(data))
    return net


def test_convert_edm_reads_the_architecture_from_the_snapshot(tmp_path):
    src = tmp_path / "network-snapshot-000000.pkl"
    net = snapshot(src)
    out = tmp_path / "ckpt" / "edm.safetensors"
    out.parent.mkdir()
    result = cm("convert", "edm", src, "--out", out)
    assert result.exit_code == 0, (result.output, result.exception)
    text = result.output
    assert "EDMPrecond(SongUNet): DDPM++ (positional embedding, standard encoder), 16×16" in text
    assert "augment_dim 9" in text and "constructor arguments recorded by EDM" in text
    assert "cm_nets preset ddpmpp-cifar10 with overrides {" in text and "'augment_dim': 9" in text
    assert f"wrote {out}" in text
    assert sorted(os.listdir(out.parent)) == ["edm.json", "edm.safetensors"]  # no temporary left

    back = cm_nets.load(out).eval()
    assert back.cm_nets_config["overrides"]["augment_dim"] == 9
    x, c = torch.randn(2, 3, 16, 16), torch.tensor([-1.0, 0.7])
    augment = torch.randn(2, 9)
    with torch.no_grad():
        assert torch.equal(back(x, c, augment_labels=augment), net(x, c, augment_labels=augment))

    # --preset is a check; a mismatch, a missing entry, an existing output: one line each.
    ok = cm("convert", "edm", src, "--out", tmp_path / "b.safetensors", "--preset", "ddpmpp-cifar10")
    assert ok.exit_code == 0, ok.output
    fails(cm("convert", "edm", src, "--out", tmp_path / "c.safetensors", "--preset", "ncsnpp-cifar10"),
          1, "positional embedding", "leave the preset out")  # fmt: skip
    fails(cm("convert", "edm", src, "--out", tmp_path / "c.safetensors", "--key", "net"), 1, "no entry 'net'")
    fails(cm("convert", "edm", src, "--out", out), 1, "exists", "--overwrite")
    assert not (tmp_path / "c.safetensors").exists()


def test_convert_edm_conditional_and_ect(tmp_path):
    src = tmp_path / "cond.pkl"
    snapshot(src, label_dim=10)
    result = cm("convert", "edm", src, "--out", tmp_path / "cond.safetensors")
    assert result.exit_code == 0 and "10 classes" in result.output and "'label_dim': 10" in result.output
    assert cm_nets.load(tmp_path / "cond.safetensors").map_label.weight.shape == (16, 10)  # noise channels × classes

    src = tmp_path / "ect.pkl"
    snapshot(src, "ECMPrecond", augment_dim=0)
    result = cm("convert", "edm", src, "--out", tmp_path / "ect.safetensors")
    assert result.exit_code == 0, result.output
    assert "ECMPrecond(SongUNet)" in result.output and 'model.sample_boundary = "shifted"' in result.output
    assert "model.sample_sigma_min = 0.003" in result.output


@pytest.mark.parametrize(
    "payload,words",
    [
        ({"ema": RunsShellCommand()}, ["refusing to load global", "system"]),
        ({"ema": np.array([None], dtype=object)}, ["refusing numpy dtype 'O8'"]),
        ({"ema": EDMRecord("VPPrecond", modules={})}, ["VPPrecond", "supported: EDMPrecond"]),
    ],
    ids=["code", "object-array", "vp"],
)
def test_convert_edm_refuses_code_and_unsupported_networks(tmp_path, payload, words):
    src = tmp_path / "bad.pkl"
    src.write_bytes(edm_snapshot_bytes(payload))
    fails(cm("convert", "edm", src, "--out", tmp_path / "x.safetensors"), 1, *words)
    assert not (tmp_path / "x.safetensors").exists()


def test_convert_edm_help_shows_the_one_command():
    result = cm("convert", "--help")
    assert result.exit_code == 0
    assert "cm convert edm edm-cifar10-32x32-uncond-vp.pkl --out" in result.output


def test_ect_recipe_from_an_edm_snapshot(tmp_path):
    """The documented path: EDM snapshot → `cm convert edm` → the shipped ECT recipe's model.init
    → `cm sample` with ECT's evaluation (shifted boundary at 0.003, 2 steps through 0.821)."""
    from pathlib import Path

    song = dict(img_resolution=8, in_channels=1, out_channels=1, model_channels=16, channel_mult=[1, 2],
                attn_resolutions=[4])  # fmt: skip
    snapshot(tmp_path / "edm-digits.pkl", **song)  # augment_dim 9, as EDM's CIFAR-10 snapshots
    init = tmp_path / "checkpoints" / "edm.safetensors"
    result = cm("convert", "edm", tmp_path / "edm-digits.pkl", "--out", init)
    assert result.exit_code == 0, result.output
    recipe = Path(__file__).resolve().parents[2] / "packages" / "cm-train" / "configs" / "ect-cifar10.toml"
    overrides = "{" + ", ".join(f"{k} = {v}" for k, v in dict(song, num_blocks=1, dropout=0.2).items()) + "}"
    result = cm("train", recipe, f"run.dir={tmp_path / 'run'}", "run.total_steps=2", "run.batch_size=8",
                "data.source=digits", "data.hflip=false", f"model.overrides={overrides}", f"model.init={init}",
                "objective.kwargs={double_steps = 1}", "precision.mode=fp32", "checkpoint.every=0",
                "log.progress=false", "log.sample_count=4")  # fmt: skip
    assert result.exit_code == 0, (result.output, result.exception)
    assert "left out: map_augment.weight" in result.output and "D(x, σ) unchanged" in result.output
    assert (tmp_path / "run" / "samples" / "step-00000002-2step.png").is_file()
    result = cm("sample", tmp_path / "run", "--nfe", "2", "--num", "2", "--out", tmp_path / "s.npz")
    assert result.exit_code == 0, (result.output, result.exception)
    assert "sigmas [80.0, 0.821]" in result.output

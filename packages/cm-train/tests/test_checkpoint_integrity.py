"""Checkpoints that were damaged after they were written: checksums, fallback, pruning, re-runs,
a full disk (issue 17 §2 and §5)."""

import json
import os
import shutil
from collections import namedtuple

import pytest
import torch
from cm_train import CheckpointCorrupt, latest_checkpoint, list_checkpoints, load_checkpoint, load_config, run
from cm_train import checkpoint as ck


def _train(tiny_config, tmp_path, steps=30, **extra):
    cfg = tiny_config(run={"total_steps": steps, "dir": str(tmp_path / "r")}, checkpoint={"every": 10}, **extra)
    messages = []
    out = run(load_config(cfg), log=messages.append)
    return cfg, out, messages


def _flip_byte(path, offset=-5):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_every_file_has_a_checksum_and_a_flipped_byte_is_named(tiny_config, tmp_path):
    _, out, _ = _train(tiny_config, tmp_path)
    ckpt = latest_checkpoint(tmp_path / "r")
    meta = json.loads((ckpt / "meta.json").read_text())
    on_disk = {p.name for p in ckpt.iterdir() if p.name != "meta.json"}
    assert set(meta["files"]) == on_disk and "state.pt" in on_disk
    load_checkpoint(ckpt)  # verifies
    _flip_byte(ckpt / "net.safetensors")  # a flip inside the tensor data: safetensors alone would load it
    with pytest.raises(CheckpointCorrupt, match=r"net.safetensors: its contents differ from the checksum"):
        load_checkpoint(ckpt)


@pytest.mark.parametrize("damage", ["flip-ema", "truncate-state", "delete-meta"])
def test_resume_falls_back_to_the_newest_checkpoint_that_verifies(tiny_config, tmp_path, damage):
    cfg, _, _ = _train(tiny_config, tmp_path)
    newest = latest_checkpoint(tmp_path / "r")
    assert newest.name == "step-00000030"
    if damage == "flip-ema":
        bad = next(newest.glob("ema-*.safetensors"))
        _flip_byte(bad)
    elif damage == "truncate-state":
        bad = newest / "state.pt"
        bad.write_bytes(bad.read_bytes()[:100])
    else:
        bad = newest / "meta.json"
        bad.unlink()
    more = load_config({**cfg, "run": {**cfg["run"], "total_steps": 35, "allow_config_change": True}})
    messages = []
    out = run(more, log=messages.append)
    assert out["step"] == 35
    said = "\n".join(messages)
    assert "resumed from" in said and "step-00000020" in said  # the older one
    if damage == "delete-meta":
        assert "step-00000030 has no meta.json" in said
    else:
        assert f"checkpoint step-00000030 does not verify ({bad}" in said
    assert newest.exists()  # never deleted: kept for inspection


def test_no_verifying_checkpoint_is_one_clear_error(tiny_config, tmp_path):
    cfg, _, _ = _train(tiny_config, tmp_path, steps=10)
    for c in list_checkpoints(tmp_path / "r"):
        _flip_byte(c / "state.pt", offset=200)
    more = load_config({**cfg, "run": {**cfg["run"], "total_steps": 20, "allow_config_change": True}})
    with pytest.raises(CheckpointCorrupt, match=r"no checkpoint verifies: .*state.pt"):
        run(more, log=lambda m: None)


def test_a_kill_mid_prune_never_leaves_a_listed_half_checkpoint(tiny_config, tmp_path, monkeypatch):
    real = shutil.rmtree

    def killed(path, *a, **k):
        if ".tmp-prune-" in str(path):
            raise KeyboardInterrupt("killed while deleting")  # the rename aside has happened
        return real(path, *a, **k)

    monkeypatch.setattr(ck.shutil, "rmtree", killed)
    cfg = tiny_config(run={"total_steps": 30, "dir": str(tmp_path / "r")}, checkpoint={"every": 10, "keep_last": 1})
    with pytest.raises(KeyboardInterrupt):
        run(load_config(cfg), log=lambda m: None)
    listed = list_checkpoints(tmp_path / "r")
    assert [c.name for c in listed] == ["step-00000020"]  # step 10 was renamed out of the listing
    for c in listed:
        load_checkpoint(c)  # every listed checkpoint is whole
    monkeypatch.setattr(ck.shutil, "rmtree", real)
    run(load_config({**cfg, "run": {**cfg["run"], "total_steps": 40, "allow_config_change": True}}), log=lambda m: None)
    hidden = [p.name for p in (tmp_path / "r" / "checkpoints").iterdir() if p.name.startswith(".")]
    assert not hidden  # the next save swept the half-deleted folder


def test_a_finished_run_run_again_keeps_its_checkpoints(tiny_config, tmp_path):
    cfg, out, _ = _train(tiny_config, tmp_path, steps=20)
    ckpt = latest_checkpoint(tmp_path / "r")
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in ckpt.iterdir()}
    meta = (ckpt / "meta.json").read_text()
    messages = []
    again = run(load_config(cfg), log=messages.append)
    assert again["step"] == 20 and again["checkpoint"] == str(ckpt)
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in ckpt.iterdir()} == before
    assert (ckpt / "meta.json").read_text() == meta  # metrics not replaced with {}
    assert any("nothing to train, checkpoints kept" in m for m in messages)


def test_a_full_disk_says_so_and_names_the_file(tiny_config, tmp_path, monkeypatch):
    def full(obj, path, *a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(ck.torch, "save", full)
    monkeypatch.setattr(ck.shutil, "disk_usage", lambda p: Usage(10 << 30, 10 << 30, 1 << 20))
    cfg = tiny_config(run={"total_steps": 10, "dir": str(tmp_path / "r")}, checkpoint={"every": 5})
    with pytest.raises(OSError, match=r"no space left on the device writing .*step-00000005/state.pt \(1 MiB free\)"):
        run(load_config(cfg), log=lambda m: None)
    assert not list_checkpoints(tmp_path / "r")
    assert not [p for p in (tmp_path / "r" / "checkpoints").iterdir()]  # no temporary left behind


def test_sampling_a_damaged_ema_names_the_file_and_the_network_that_verifies(tiny_config, tmp_path):
    from cm_train import load_trained

    _train(tiny_config, tmp_path, steps=10)
    ckpt = latest_checkpoint(tmp_path / "r")
    ema = next(ckpt.glob("ema-*.safetensors"))
    _flip_byte(ema)
    with pytest.raises(CheckpointCorrupt, match=rf"{ema.name}: its contents differ from the checksum .*these verify: net.* --network"):
        load_trained(tmp_path / "r")
    model = load_trained(tmp_path / "r", network="net")  # the named alternative works
    assert model.network == "net"
    assert torch.isfinite(next(model.function.parameters())).all()
    assert os.path.exists(ema)


def test_sampling_says_when_a_newer_checkpoint_lacks_its_meta(tiny_config, tmp_path):
    from cm_train import load_trained

    _train(tiny_config, tmp_path, steps=20)
    (latest_checkpoint(tmp_path / "r") / "meta.json").unlink()  # step 20 no longer committed
    with pytest.warns(UserWarning, match=r"step-00000020 has no meta.json .*skipped; using step-00000010"):
        model = load_trained(tmp_path / "r")
    assert model.checkpoint.name == "step-00000010"


def test_a_kill_mid_resave_keeps_a_committed_copy(tmp_path):
    """Re-saving a step (after a rollback) swaps folders with two renames; a process killed between
    them leaves the old copy aside. It must survive (its aside name used to be swept as a temporary by
    the next save) and come back."""
    import subprocess
    import sys
    import textwrap

    nets = {"net": ({"w": torch.ones(3)}, None)}
    first = ck.save_checkpoint(tmp_path, 10, nets, {"step": 10}, {"metrics": {"loss": 1.0}})
    script = textwrap.dedent(f"""
        import os, torch
        from cm_train import checkpoint as ck
        real, calls = os.replace, []
        def replace(src, dst):
            calls.append(src)
            if len(calls) == 2:  # the old copy is aside, the new one not in place yet: die here
                os._exit(9)
            return real(src, dst)
        os.replace = replace
        ck.save_checkpoint({str(tmp_path)!r}, 10, {{"net": ({{"w": torch.zeros(3)}}, None)}}, {{"step": 10}}, {{"metrics": {{}}}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    assert not first.exists() and list((tmp_path / "checkpoints").glob(".step-00000010.old-*"))
    with pytest.warns(UserWarning, match="restored step-00000010"):
        got = ck.usable_checkpoint(tmp_path)
    assert got == first
    nets, state, meta = load_checkpoint(first)
    assert torch.equal(nets["net"]["w"], torch.ones(3)) and meta["metrics"] == {"loss": 1.0}  # the old copy, whole
    ck.save_checkpoint(tmp_path, 20, {"net": ({"w": torch.ones(3)}, None)}, {"step": 20}, {})
    assert not list((tmp_path / "checkpoints").glob(".*"))  # nothing left aside

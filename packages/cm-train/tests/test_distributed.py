"""Two ranks (torchrun, mpiexec) with gloo reach the same weights as one rank with the same global batch."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cm_train import latest_checkpoint, load_checkpoint, load_config, run

pytestmark = pytest.mark.distributed
BIN = Path(sys.executable).parent


def _config(tmp_path, tiny_config, name):
    # batch_per_rank = 16: one rank accumulates two chunks of 16, two ranks take one chunk each;
    # every draw is keyed by (step, chunk), so both see the same noise and data.
    cfg = tiny_config(
        run={"dir": str(tmp_path / name), "total_steps": 12, "batch_size": 32, "batch_per_rank": 16},
        checkpoint={"every": 0},
        log={"every": 4, "progress": False},
    )
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return path, cfg


def _final(run_dir):
    return load_checkpoint(latest_checkpoint(run_dir))[0]["net"]


def _assert_same(a, b):
    for key in a:
        # Averaging gradients across ranks sums in another order: equal within fp32 rounding.
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


def _env():
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(k, None)
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.fixture
def single(tmp_path, tiny_config):
    _, cfg = _config(tmp_path, tiny_config, "one")
    run(load_config(cfg), log=lambda m: None)
    return _final(tmp_path / "one")


def test_torchrun_two_ranks_match_one(tmp_path, tiny_config, single):
    path, _ = _config(tmp_path, tiny_config, "torchrun")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "cm_train",
        "--config",
        str(path),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same(single, _final(tmp_path / "torchrun"))


def test_mpiexec_two_ranks_match_one(tmp_path, tiny_config, single):
    mpiexec = BIN / "mpiexec" if (BIN / "mpiexec").exists() else shutil.which("mpiexec")
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        pytest.skip("mpi4py is not installed (pip install mpi4py mpich)")
    if mpiexec is None:
        pytest.skip("no mpiexec on PATH (pip install mpich)")
    path, _ = _config(tmp_path, tiny_config, "mpi")
    # Tiny buckets: the gradients are all-reduced in many pieces, each started from a gradient
    # hook while backward still runs, and must give the same weights as one rank.
    cmd = [str(mpiexec), "-n", "2", sys.executable, "-m", "cm_train", "--config", str(path), "run.grad_bucket_mb=0.002"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    _assert_same(single, _final(tmp_path / "mpi"))
    m = re.search(r"gradient all-reduce over 2 ranks: (\d+) bucket\(s\) .*, (\d+) started during backward", proc.stdout)
    assert m and int(m.group(1)) > 3 and int(m.group(2)) == int(m.group(1)), proc.stdout[-2000:]


def test_launcher_detection(monkeypatch):
    from cm_train.distributed import _first_slurm_host, detect_launcher

    for k in (
        "RANK",
        "WORLD_SIZE",
        "SLURM_PROCID",
        "SLURM_NTASKS",
        "OMPI_COMM_WORLD_SIZE",
        "PMI_SIZE",
        "PMIX_RANK",
        "MPI_LOCALNRANKS",
    ):
        monkeypatch.delenv(k, raising=False)
    assert detect_launcher() == "single"
    monkeypatch.setenv("PMI_SIZE", "4")
    assert detect_launcher() == "mpi"
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert detect_launcher() == "slurm"
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert detect_launcher() == "torchrun"
    assert _first_slurm_host("gpu[012-015,020],cpu7") == "gpu012"
    assert _first_slurm_host("node7") == "node7"

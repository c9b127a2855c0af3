"""tools/gpu_check.sh --dry-run: every step of the GPU validation on the CPU, so the script cannot rot."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MEASURES = {
    "pseudo_huber": ("gb_per_s", "ms"),
    "attention": ("cm_kernels_ms", "sdpa_ms", "speedup", "cm_kernels_tflops", "sdpa_tflops"),
    "jvp": ("cm_kernels_ms", "math_ms", "speedup"),
    "train_step": ("step_ms", "img_per_s"),
    "sampling": ("ms", "img_per_s"),
}


@pytest.mark.slow  # about 20-30 s on 2 cores: four interpreter starts, test collection, tiny benchmarks
def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env["CM_PYTHON"] = sys.executable  # the interpreter running these tests, wherever its venv is
    proc = subprocess.run(
        ["bash", str(ROOT / "tools/gpu_check.sh"), "--dry-run", "--out", "out"],
        cwd=tmp_path,  # the script finds the repository from its own path; --out is relative to here
        env=env,
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    for part in ("detect GPU arch", "install + build", "cm info", "cuda kernels", "cuda tests", "benchmark"):
        assert f"[gpu_check] {part}: " in proc.stdout
    assert "skipped (dry run)" in proc.stdout and "CM_KERNELS_CUDA=1" in proc.stdout  # the install it would run

    md = (out / "gpu_check.md").read_text()
    assert "## GPU check: cpu (" in md and "- Device: cpu (" in md
    for row in (
        "| cm_kernels fwd+bwd |",
        "| torch copy_ |",
        "| fwd+bwd |",
        "| adm-imagenet64-no32-qkv (tiny) | bf16+fused |",
        "| adm-imagenet64-no32-qkv (tiny) | 1 |",
        "| adm-imagenet64-no32-qkv (tiny) | 2 |",
        "| cuda tests | ok |",
    ):
        assert row in md, row
    assert "tests collected" in md  # pytest -m cuda --collect-only found the cuda tests
    assert "FAILED" not in md and "timed out" not in md

    data = json.loads((out / "gpu_check.json").read_text())
    assert data["tiny"] is True and data["meta"]["device"].startswith("cpu")
    assert set(data["measures"]) == set(MEASURES)
    for key, fields in MEASURES.items():
        m = data["measures"][key]
        assert m["status"] == "ok", (key, m["status"], m["notes"])
        assert m["rows"], key
        for row in m["rows"]:
            for field in fields:
                assert isinstance(row[field], (int, float)) and math.isfinite(row[field]) and row[field] > 0, (
                    key,
                    field,
                    row,
                )
    attention = data["measures"]["attention"]["rows"]
    assert {r["N"] for r in attention} == {64, 128} and {r["pass_"] for r in attention} == {"fwd", "fwd+bwd"}
    assert all(0 <= r["max_abs_diff"] < 1e-4 for r in attention)  # fp32 on CPU: the two agree
    jvp = data["measures"]["jvp"]["rows"]
    assert [r["N"] for r in jvp] == [64] and all(0 <= r["max_abs_diff"] < 1e-4 for r in jvp)  # exact tangents agree
    assert jvp[0]["cm_kernels_peak_mib"] is None  # CUDA only
    assert data["measures"]["train_step"]["rows"][0]["peak_gib"] is None  # CUDA only
    assert [r["nfe"] for r in data["measures"]["sampling"]["rows"]] == [1, 2]
    assert (out / "logs" / "benchmark.log").is_file()


def test_gpu_check_rejects_unknown_argument():
    proc = subprocess.run(
        ["bash", str(ROOT / "tools/gpu_check.sh"), "--no-such-flag"], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2 and "--no-such-flag" in proc.stderr
    proc = subprocess.run(["bash", str(ROOT / "tools/gpu_check.sh"), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--dry-run" in proc.stdout and "CM_KERNELS_CUDA_ARCHS" in proc.stdout

"""Data-parallel throughput on this machine: the same run (same global batch) on 1 rank and on 2
gloo ranks (torchrun), with the gradient all-reduce in one bucket or in small buckets started during
backward. Prints a markdown table for bench/RESULTS.md.

    python tools/bench/ranks.py [--steps 80] [--config packages/cm-train/configs/digits.toml] [KEY=VALUE ...]

img/s is the trainer's own figure (metrics.jsonl), the median of the logged intervals after the
first (warm-up) one. Each variant runs as a fresh process with OMP_NUM_THREADS set as shown.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(name, cmd, run_dir, threads):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["img_per_s"] for r in lines[1:]] or [lines[-1]["img_per_s"]]
    overlap = next((x for x in proc.stdout.splitlines() if "gradient all-reduce" in x), "")
    return statistics.median(rates), wall, overlap.split("] ", 1)[-1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--config", default=str(ROOT / "packages/cm-train/configs/digits.toml"))
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        common = [
            f"run.total_steps={args.steps}",
            "log.every=10",
            "log.sample_every=0",
            "log.progress=false",
            "checkpoint.every=0",
            *args.overrides,
        ]
        one = [py, "-m", "cm_train", "--config", args.config]
        two = [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "cm_train"]
        two += ["--config", args.config]
        variants = [
            ("1 rank, 1 thread", one, 1, []),
            ("1 rank, 2 threads", one, 2, []),
            ("2 gloo ranks × 1 thread, one 25 MB bucket", two, 1, ["run.grad_bucket_mb=25"]),
            ("2 gloo ranks × 1 thread, 1 MB buckets (overlapped)", two, 1, ["run.grad_bucket_mb=1"]),
        ]
        rows = []
        for i, (name, cmd, threads, extra) in enumerate(variants):
            run_dir = tmp / f"run{i}"
            rate, wall, overlap = _run(name, [*cmd, *common, *extra, f"run.dir={run_dir}"], run_dir, threads)
            rows.append((name, rate, wall, overlap))
            print(f"[ranks] {name}: {rate:.0f} img/s ({wall:.0f} s) {overlap}", file=sys.stderr, flush=True)
    base = rows[0][1]
    print(f"config {Path(args.config).name} {' '.join(args.overrides)}, {args.steps} steps, same global batch\n")
    print("| variant | img/s | vs 1 rank × 1 thread | wall s | all-reduce |")
    print("|---|---:|---:|---:|---|")
    for name, rate, wall, overlap in rows:
        print(f"| {name} | {rate:.0f} | {rate / base:.2f}× | {wall:.0f} | {overlap or '–'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

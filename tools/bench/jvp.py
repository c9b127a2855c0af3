"""Forward-mode AD of normalized attention on the CPU: cm_kernels' fused JVP against torch.func.jvp
of EDM2 normalization + math attention (what sCM / MeanFlow training differentiates).

    python tools/bench/jvp.py                            # B=8 H=4 N=256 d=64 float32, 1 and 2 threads
    python tools/bench/jvp.py --json out.json --markdown out.md

What is measured, per thread count (``torch.set_num_threads``), for (out, tangent) =
torch.func.jvp(f, (q, k, v), (tq, tk, tv)):
  cm_kernels   f = ``cm_kernels.normalized_attention`` (normalize="qkv"): the one-pass fused kernel
               (O and its tangent from one P; csrc/cpu/isa_core.h ``attn_jvp_rows``).
  math         f = softmax(q_hat k_hat^T / sqrt(d)) v_hat in torch ops with q_hat etc. from
               ``cm_kernels.reference.normalize_heads`` (torch's own forward-mode rules; SDPA has
               none on the CPU, so math attention is what torch.func.jvp can run).
  op           ``torch.ops.cm_kernels.normalized_attention_jvp`` called directly (no functorch):
               the cost of the transform itself. forward: the forward alone, no tangent.
Times are medians of --repeat interleaved runs after --warmup runs each (allocator tuned, as
cm-train does on the CPU). GFLOP/s counts the JVP's six N x N x d products (S, dS = dQ K^T + Q dK^T,
O, P dV, (P o dS) V) as 12 * B*H*N^2*d for both implementations.
Peak memory: each implementation's first full-size call in a fresh subprocess (after a small
warm-up call), as the growth of the process's peak resident set over the call (VmHWM, reset
before it, minus VmRSS; glibc's default malloc, so large blocks are mapped and unmapped as used).
It includes the outputs and, for cm_kernels, the per-thread float panels the kernel allocates
outside torch's allocator.

The load average is printed at the start and the end. Above --max-load (default 1.0: the
figures in bench/RESULTS.md are taken on an otherwise idle machine) the script prints the figures
but writes no --json/--markdown file and exits with status 3, unless --force.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import cm_kernels
import torch
from cm_kernels import reference
from cm_nets.files import atomic_write_text
from timing import cpu_name, kernel_machine, load_average, median_ms

IMPLS = ("cm_kernels", "math")


def inputs(B, H, N, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(B, H, N, d, generator=g).to(dtype) for _ in range(6)]
    return tuple(xs[:3]), tuple(xs[3:])


def math_attention(q, k, v):
    n = reference.normalize_heads
    q, k, v = n(q), n(k), n(v)
    return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v


def jvp_fn(impl: str, primals, tangents):
    f = cm_kernels.normalized_attention if impl == "cm_kernels" else math_attention
    return lambda: torch.func.jvp(f, primals, tangents)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_child(impl: str, threads: int, shape, dtype) -> None:
    """(subprocess) growth of the peak resident set over one call, in bytes, printed on stdout:
    the peak (VmHWM) is reset first through /proc/self/clear_refs (Linux >= 4.0), since the one
    left by importing torch is higher than a call's."""
    torch.set_num_threads(threads)
    small, small_t = inputs(1, 1, 16, shape[3], dtype)
    jvp_fn(impl, small, small_t)()  # lazy imports and one-time set-up outside the measurement
    primals, tangents = inputs(*shape, dtype)
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    result = jvp_fn(impl, primals, tangents)()
    peak = _status_kib("VmHWM")
    del result
    print((peak - before) * 1024)


def peak_bytes(impl: str, threads: int, shape, dtype) -> int:
    cmd = [sys.executable, __file__, "--peak-child", impl, "--threads", str(threads),
           "--shape", ",".join(map(str, shape)), "--dtype", str(dtype).removeprefix("torch.")]  # fmt: skip
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
    return int(out.strip().splitlines()[-1])


def bench(threads: int, shape, dtype, args) -> dict:
    torch.set_num_threads(threads)
    B, H, N, d = shape
    primals, tangents = inputs(*shape, dtype)
    scale = d**-0.5
    fns = {impl: jvp_fn(impl, primals, tangents) for impl in IMPLS}
    fns["op"] = lambda: torch.ops.cm_kernels.normalized_attention_jvp(*primals, *tangents, scale, "qkv", 1e-4)
    fns["forward"] = lambda: cm_kernels.normalized_attention(*primals)
    ms = median_ms(fns, "cpu", args.warmup, args.repeat)
    # the two implementations agree (float32: ~1e-6 relative)
    (o1, t1), (o2, t2) = fns["cm_kernels"](), fns["math"]()
    rel = ((t1 - t2).abs().max() / t2.abs().max()).item()
    gflop = 12 * B * H * N * N * d / 1e9
    row = {"threads": threads, "ms": ms, "tangent_rel_diff": rel}
    row["gflops"] = {impl: gflop / ms[impl] * 1e3 for impl in ("cm_kernels", "math", "op")}
    row["speedup"] = ms["math"] / ms["cm_kernels"]
    row["peak_mib"] = {impl: peak_bytes(impl, threads, shape, dtype) / 2**20 for impl in IMPLS}
    return row


def markdown(result: dict) -> str:
    m = result["machine"]
    B, H, N, d = result["shape"]
    lines = [
        f"- Machine: {m['cpu']}, {m['cores']} cores; {m['date']}; load average {m['load_start']:.2f} at the "
        f"start, {m['load_end']:.2f} at the end",
        f"- torch {m['torch']}, cm-kernels {m['cm_kernels']} (CPU kernels: {m['cpu_isa']}); {result['dtype']}, "
        f"B×H×N×d = {B}×{H}×{N}×{d}, normalize=\"qkv\"",
        f"- Command: `{m['command']}`",
        "",
        "| threads | cm_kernels jvp ms | math jvp ms | speedup | op direct ms | forward ms | cm_kernels GFLOP/s "
        "| math GFLOP/s | peak MiB cm_kernels | peak MiB math |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["runs"]:
        ms, gf, pk = r["ms"], r["gflops"], r["peak_mib"]
        lines.append(
            f"| {r['threads']} | {ms['cm_kernels']:.2f} | {ms['math']:.2f} | **{r['speedup']:.2f}x** | "
            f"{ms['op']:.2f} | {ms['forward']:.2f} | {gf['cm_kernels']:.0f} | {gf['math']:.0f} | "
            f"{pk['cm_kernels']:.1f} | {pk['math']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    parser.add_argument("--shape", default="8,4,256,64", help="B,H,N,d (default 8,4,256,64)")
    parser.add_argument("--dtype", default="float32", help="float32 (default) or bfloat16")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs per implementation (default 2)")
    parser.add_argument("--repeat", type=int, default=9, help="timed runs; the median is reported (default 9)")
    parser.add_argument("--isa", default="auto", help="CPU kernels to run: auto (default), avx512, avx2, base")
    parser.add_argument("--max-load", type=float, default=1.0, help="refuse to write figures above this load")
    parser.add_argument("--json", type=Path, help="write the results as JSON")
    parser.add_argument("--markdown", type=Path, help="write the table as markdown (for bench/RESULTS.md)")
    parser.add_argument("--force", action="store_true", help="write results even when the machine is loaded")
    parser.add_argument("--peak-child", choices=IMPLS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shape = tuple(int(x) for x in args.shape.split(","))
    dtype = getattr(torch, args.dtype)
    threads = [int(t) for t in args.threads.split(",") if t.strip()]
    cm_kernels.set_cpu_isa(args.isa)
    if args.peak_child:
        peak_child(args.peak_child, threads[0], shape, dtype)
        return 0
    cores = os.cpu_count() or 1
    load_start = load_average()
    tuned = cm_kernels.tune_cpu_allocator()
    print(f"{cpu_name()}, {cores} cores; torch {torch.__version__}; cm_kernels {cm_kernels.__version__}, "
          f"CPU kernels {cm_kernels.cpu_isa()}; allocator: {tuned['reason']}")  # fmt: skip
    print(f"load average at the start: {load_start:.2f}", flush=True)
    runs = []
    for t in threads:
        r = bench(t, shape, dtype, args)
        runs.append(r)
        ms, pk = r["ms"], r["peak_mib"]
        print(f"{t} thread(s): cm_kernels {ms['cm_kernels']:.2f} ms vs math {ms['math']:.2f} ms = "
              f"{r['speedup']:.2f}x (op {ms['op']:.2f} ms, forward {ms['forward']:.2f} ms); peak "
              f"{pk['cm_kernels']:.1f} vs {pk['math']:.1f} MiB; tangents differ by {r['tangent_rel_diff']:.1e} "
              "(relative)", flush=True)  # fmt: skip
    load_end = load_average()
    print(f"load average at the end: {load_end:.2f}")
    result = {
        "machine": kernel_machine("jvp.py", argv, cores, load_start, load_end),
        "shape": list(shape),
        "dtype": args.dtype,
        "runs": runs,
    }
    print("\n" + markdown(result))
    if max(load_start, load_end) > args.max_load and not args.force:
        print(f"the load average exceeded {args.max_load}: these figures are not written "
              "(rerun on an idle machine, or --force)", file=sys.stderr)  # fmt: skip
        return 3
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    if args.markdown:
        atomic_write_text(args.markdown, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

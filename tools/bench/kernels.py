"""cm_kernels against the paths they replace, and against the machine's own limits, on the CPU.

    python tools/bench/kernels.py                        # 1 and 2 threads, every case (~4 min idle)
    python tools/bench/kernels.py --quick                # fewer cases and repeats (a smoke run)
    python tools/bench/kernels.py --json out.json --markdown out.md

What is measured, per thread count (``torch.set_num_threads``):
  copy        ``dst.copy_(src)`` of 512 MiB float32: the memory bandwidth limit of this run,
              counted as bytes read + written (2 x 512 MiB per copy).
  loss        ``cm_kernels.pseudo_huber_loss`` forward + backward through autograd (a fresh
              gradient each call, as in training) on [256, 3, 64, 64], float32 and bfloat16,
              timed on its own (not interleaved: the eager reference's temporaries would evict
              pred and target from the cache between runs), then the eager reference. "GB/s (3N)"
              counts 3N elements (read pred and target, write the gradient: the issue's measure,
              what one fused pass would move), "GB/s (5N)" what the two autograd passes do move
              (forward reads 2N; backward reads 2N and writes N, with streaming stores); "of
              copy" divides the 3N figure by the same run's copy bandwidth (the target is >= 80 %).
              pred and target (2 x 12.6 MB float32) fit this machine's 32 MB L3, so the figure
              can exceed the DRAM copy, and it varies with what else shares that L3.
  attention   ``cm_kernels.normalized_attention`` (normalize="qkv") forward + backward against
              EDM2 normalization + ``F.scaled_dot_product_attention``, float32 and bfloat16,
              N in {64, 256, 1024} x d in {32, 64, 128} with B*H*N = 8192 rows (the target is
              >= 1.3x). GFLOP/s counts 3.5 x 4*B*H*N^2*d per forward + backward (FlashAttention's
              convention); SDPA's own throughput on plain attention is the matmul-bound reference.
Implementations are interleaved round-robin and the median of --repeat runs is reported. The
allocator is tuned first (``cm_kernels.tune_cpu_allocator``, as cm-train does on the CPU);
``--malloc default`` measures glibc's defaults instead (every large tensor page-faults anew).

The load average is printed at the start and the end. When either exceeds the number of cores,
the figures are not trustworthy: the script prints them but writes no --json/--markdown file and
exits with status 3, unless --force. CUDA: tools/bench/gpu.py (part of tools/gpu_check.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import cm_kernels
import torch
import torch.nn.functional as F
from cm_kernels import reference
from cm_nets.files import atomic_write_text
from timing import cpu_name, forward_backward, kernel_machine, load_average, median_ms

ATTN_CASES = [(N, d) for N in (64, 256, 1024) for d in (32, 64, 128)]
QUICK_ATTN_CASES = [(64, 64), (256, 64), (1024, 64), (256, 32), (256, 128)]
ROWS = 8192  # B * H * N per attention case
HEADS = 4


def copy_bandwidth(args) -> float:
    src = torch.ones(512 * 2**20 // 4)
    dst = torch.empty_like(src)
    ms = median_ms({"copy": lambda: dst.copy_(src)}, "cpu", 2, max(5, args.repeat // 2))["copy"]
    return 2 * src.numel() * 4 / ms / 1e6


def bench_loss(dtype, copy_gbs, args) -> dict:
    shape = (256, 3, 64, 64)
    c = 0.00054 * (3 * 64 * 64) ** 0.5
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(shape, generator=g).to(dtype).requires_grad_()
    target = torch.randn(shape, generator=g).to(dtype)
    impls = {
        "cm_kernels": forward_backward(lambda p, t: cm_kernels.pseudo_huber_loss(p, t, c), (pred, target), (pred,)),
        "eager": forward_backward(lambda p, t: reference.pseudo_huber_loss(p, t, c), (pred, target), (pred,)),
    }
    ms = {name: median_ms({name: fn}, "cpu", args.warmup, 2 * args.repeat)[name] for name, fn in impls.items()}
    moved = 3 * pred.numel() * pred.element_size()
    gbs = moved / ms["cm_kernels"] / 1e6
    return {
        "gbs_5n": gbs * 5 / 3,
        "dtype": str(dtype).removeprefix("torch."),
        "shape": list(shape),
        "cm_kernels_ms": ms["cm_kernels"],
        "eager_ms": ms["eager"],
        "cm_kernels_gbs": gbs,
        "of_copy": gbs / copy_gbs,
        "vs_eager": ms["eager"] / ms["cm_kernels"],
    }


def bench_attention(dtype, N, d, args) -> dict:
    B = max(1, ROWS // (HEADS * N))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, HEADS, N, d, generator=g).to(dtype).requires_grad_() for _ in range(3))
    n = reference.normalize_heads
    impls = {
        "cm_kernels": forward_backward(lambda q, k, v: cm_kernels.normalized_attention(q, k, v), (q, k, v), (q, k, v)),
        "normalize+SDPA": forward_backward(
            lambda q, k, v: F.scaled_dot_product_attention(n(q), n(k), n(v)), (q, k, v), (q, k, v)
        ),
        "SDPA (plain)": forward_backward(F.scaled_dot_product_attention, (q, k, v), (q, k, v)),
    }
    ms = median_ms(impls, "cpu", args.warmup, args.repeat)
    gflop = 3.5 * 4 * B * HEADS * N * N * d / 1e9
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "B": B,
        "H": HEADS,
        "N": N,
        "d": d,
        "cm_kernels_ms": ms["cm_kernels"],
        "norm_sdpa_ms": ms["normalize+SDPA"],
        "sdpa_ms": ms["SDPA (plain)"],
        "cm_kernels_gflops": gflop / ms["cm_kernels"] * 1e3,
        "sdpa_gflops": gflop / ms["SDPA (plain)"] * 1e3,
        "speedup": ms["normalize+SDPA"] / ms["cm_kernels"],
    }


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"- Machine: {m['cpu']}, {m['cores']} cores; {m['date']}; load average {m['load_start']:.2f} at the "
        f"start, {m['load_end']:.2f} at the end",
        f"- torch {m['torch']}, cm-kernels {m['cm_kernels']} (CPU kernels: {m['cpu_isa']}), allocator: {m['malloc']}",
        f"- Command: `{m['command']}`",
        "",
        "| threads | copy GB/s | loss dtype | loss fwd+bwd ms | GB/s (3N) | of copy | GB/s (5N) | vs eager |",
        "|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for run in result["runs"]:
        for row in run["loss"]:
            lines.append(
                f"| {run['threads']} | {run['copy_gbs']:.1f} | {row['dtype']} | {row['cm_kernels_ms']:.3f} | "
                f"{row['cm_kernels_gbs']:.1f} | {100 * row['of_copy']:.0f} % | {row['gbs_5n']:.1f} | "
                f"{row['vs_eager']:.1f}x |"
            )
    lines += [
        "",
        "| threads | dtype | B×H×N×d | cm_kernels ms | norm+SDPA ms | speedup | cm_kernels GFLOP/s | SDPA (plain) GFLOP/s |",
        "|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for run in result["runs"]:
        for r in run["attention"]:
            lines.append(
                f"| {run['threads']} | {r['dtype']} | {r['B']}×{r['H']}×{r['N']}×{r['d']} | {r['cm_kernels_ms']:.2f} | "
                f"{r['norm_sdpa_ms']:.2f} | **{r['speedup']:.2f}x** | {r['cm_kernels_gflops']:.0f} | "
                f"{r['sdpa_gflops']:.0f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    parser.add_argument("--quick", action="store_true", help="5 attention cases, fewer repeats")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs per case (default 2)")
    parser.add_argument("--repeat", type=int, default=9, help="timed runs per case; the median is reported")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="attention and loss dtypes")
    parser.add_argument("--isa", default="auto", help="CPU kernels to run: auto (default), avx512, avx2, base")
    parser.add_argument("--malloc", choices=["tuned", "default"], default="tuned", help="see above (default tuned)")
    parser.add_argument("--json", type=Path, help="write the results as JSON")
    parser.add_argument("--markdown", type=Path, help="write the tables as markdown (for bench/RESULTS.md)")
    parser.add_argument("--force", action="store_true", help="write results even when the machine is loaded")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeat = min(args.repeat, 5)
    threads = [int(t) for t in args.threads.split(",") if t.strip()]
    dtypes = [getattr(torch, name.strip()) for name in args.dtypes.split(",") if name.strip()]
    cores = os.cpu_count() or 1
    cm_kernels.set_cpu_isa(args.isa)
    load_start = load_average()
    malloc = "glibc defaults"
    if args.malloc == "tuned":
        tuned = cm_kernels.tune_cpu_allocator()
        malloc = tuned["reason"] if tuned["applied"] else f"defaults ({tuned['reason']})"
    print(f"{cpu_name()}, {cores} cores; torch {torch.__version__}; cm_kernels {cm_kernels.__version__}, "
          f"CPU kernels {cm_kernels.cpu_isa()}; allocator: {malloc}")
    print(f"load average at the start: {load_start:.2f} (cores: {cores})", flush=True)
    runs = []
    for t in threads:
        torch.set_num_threads(t)
        copy_gbs = copy_bandwidth(args)
        print(f"\n== {t} thread(s): copy {copy_gbs:.1f} GB/s (read + write)", flush=True)
        loss = []
        for dtype in dtypes:
            row = bench_loss(dtype, copy_gbs, args)
            loss.append(row)
            print(f"pseudo_huber {row['dtype']:>8}: {row['cm_kernels_ms']:.3f} ms, {row['cm_kernels_gbs']:.1f} GB/s "
                  f"= {100 * row['of_copy']:.0f} % of copy, {row['vs_eager']:.1f}x eager", flush=True)
        attention = []
        for dtype in dtypes:
            for N, d in QUICK_ATTN_CASES if args.quick else ATTN_CASES:
                r = bench_attention(dtype, N, d, args)
                attention.append(r)
                print(f"attention {r['dtype']:>8} B{r['B']} H{r['H']} N{N:<5} d{d:<4}: {r['cm_kernels_ms']:8.2f} ms vs "
                      f"norm+SDPA {r['norm_sdpa_ms']:8.2f} ms = {r['speedup']:.2f}x  ({r['cm_kernels_gflops']:.0f} vs "
                      f"plain SDPA {r['sdpa_gflops']:.0f} GFLOP/s)", flush=True)
        runs.append({"threads": t, "copy_gbs": copy_gbs, "loss": loss, "attention": attention})
    load_end = load_average()
    print(f"\nload average at the end: {load_end:.2f} (cores: {cores})")
    result = {
        "machine": kernel_machine("kernels.py", argv, cores, load_start, load_end, malloc=malloc),
        "runs": runs,
    }
    print("\n" + markdown(result))
    loaded = max(load_start, load_end) > cores
    if loaded and not args.force:
        print(f"the load average exceeded {cores} (the core count): these figures are not written "
              "(rerun on an idle machine, or --force)", file=sys.stderr)
        return 3
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    if args.markdown:
        atomic_write_text(args.markdown, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark cm_kernels against eager PyTorch, torch.compile and normalize+SDPA.

    python tools/bench/kernels.py                  # CPU (and CUDA when a GPU is visible)
    python tools/bench/kernels.py --no-compile     # skip torch.compile baselines (slow on CPU)

Timings are medians over --repeat runs after --warmup runs (implementations interleaved
round-robin; CUDA events on a GPU, see timing.py). Bandwidth counts the bytes a fused
kernel must move: pseudo-Huber forward 2*N*bytes (read pred, target), forward+backward
3*N*bytes (as specified: read pred, target, write grad; the recompute read is not counted).
Attention FLOPs: forward 4*B*H*Nq*Nk*d (two GEMMs), forward+backward 3.5x that (the backward's
five GEMMs count 2.5x the forward, the FlashAttention convention).
"""

from __future__ import annotations

import argparse

import cm_kernels
import torch
import torch.nn.functional as F
from cm_kernels import reference
from timing import forward_backward, forward_only, median_ms


def bench_pseudo_huber(device, dtype, shape, c, args):
    g = torch.Generator(device=device).manual_seed(0)
    pred = torch.randn(shape, device=device, dtype=dtype, generator=g).requires_grad_()
    target = torch.randn(shape, device=device, dtype=dtype, generator=g)
    impls = {
        "cm_kernels": lambda p, t: cm_kernels.pseudo_huber_loss(p, t, c),
        "eager reference": lambda p, t: reference.pseudo_huber_loss(p, t, c),
    }
    if not args.no_compile:
        impls["compiled reference"] = torch.compile(lambda p, t: reference.pseudo_huber_loss(p, t, c))
    n_bytes = pred.numel() * pred.element_size()
    fwd = median_ms({k: forward_only(f, (pred, target)) for k, f in impls.items()}, device, args.warmup, args.repeat)
    both = median_ms(
        {k: forward_backward(f, (pred, target), (pred,)) for k, f in impls.items()}, device, args.warmup, args.repeat
    )
    rows = [(k, fwd[k], both[k], 2 * n_bytes / fwd[k] / 1e6, 3 * n_bytes / both[k] / 1e6) for k in impls]
    eager = {r[0]: r for r in rows}["eager reference"]
    print(f"\npseudo_huber_loss  {device}  {dtype}  shape={list(shape)}  c={c}")
    print(f"{'impl':<22}{'fwd ms':>9}{'fwd GB/s':>10}{'f+b ms':>9}{'f+b GB/s':>10}{'f+b vs eager':>14}")
    for name, fwd, both, bw_f, bw_b in rows:
        print(f"{name:<22}{fwd:>9.3f}{bw_f:>10.2f}{both:>9.3f}{bw_b:>10.2f}{eager[2] / both:>13.2f}x")
    return rows


def bench_attention(device, dtype, B, H, N, d, args):
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(B, H, N, d, device=device, dtype=dtype, generator=g).requires_grad_() for _ in range(3))
    n = reference.normalize_heads

    def norm_sdpa(q, k, v):
        return F.scaled_dot_product_attention(n(q), n(k), n(v))

    impls = {
        "cm_kernels": lambda q, k, v: cm_kernels.normalized_attention(q, k, v),
        "eager reference": reference.normalized_attention,
        "normalize+SDPA": norm_sdpa,
    }
    if not args.no_compile:
        impls["compiled reference"] = torch.compile(reference.normalized_attention)
        impls["compiled norm+SDPA"] = torch.compile(norm_sdpa)
    flops = 4 * B * H * N * N * d
    fwd = median_ms({k_: forward_only(f, (q, k, v)) for k_, f in impls.items()}, device, args.warmup, args.repeat)
    both = median_ms(
        {k_: forward_backward(f, (q, k, v), (q, k, v)) for k_, f in impls.items()}, device, args.warmup, args.repeat
    )
    rows = [(k_, fwd[k_], both[k_], flops / fwd[k_] / 1e9, 3.5 * flops / both[k_] / 1e9) for k_ in impls]
    by = {r[0]: r for r in rows}
    print(f"\nnormalized_attention (qkv)  {device}  {dtype}  B={B} H={H} N={N} d={d}")
    print(
        f"{'impl':<22}{'fwd ms':>9}{'fwd TF/s':>10}{'f+b ms':>9}{'f+b TF/s':>10}"
        f"{'f+b vs eager':>14}{'vs norm+SDPA':>14}"
    )
    for name, fwd, both, tf_f, tf_b in rows:
        print(
            f"{name:<22}{fwd:>9.3f}{tf_f:>10.4f}{both:>9.3f}{tf_b:>10.4f}"
            f"{by['eager reference'][2] / both:>13.2f}x{by['normalize+SDPA'][2] / both:>13.2f}x"
        )
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--device", choices=["cpu", "cuda", "all"], default="all", help="devices to time (default: all present)"
    )
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile baselines")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs per case (default 3)")
    parser.add_argument(
        "--repeat", type=int, default=15, help="timed runs per case; the median is reported (default 15)"
    )
    args = parser.parse_args(argv)
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"backends: {cm_kernels.backends()['normalized_attention']}"
    )
    for device in devices:
        bench_pseudo_huber(device, torch.float32, (256, 3, 64, 64), 0.00054 * (3 * 64 * 64) ** 0.5, args)
        bench_attention(device, torch.float32, 8, 4, 256, 64, args)
        if device == "cuda":
            bench_pseudo_huber(device, torch.bfloat16, (256, 3, 64, 64), 0.03, args)
            bench_attention(device, torch.bfloat16, 8, 8, 1024, 64, args)


if __name__ == "__main__":
    main()

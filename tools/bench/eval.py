"""Benchmark cm_eval: feature extraction and FID throughput, and FD-digits sanity numbers.

    python tools/bench/eval.py                      # CPU (and CUDA when a GPU is visible)
    python tools/bench/eval.py --device cpu --json out.json

Measures (medians over --repeat runs after --warmup runs):
- FID Inception-v3 feature extraction (random weights: the cost does not depend on the values),
  32×32 inputs resized to 299 (CIFAR-10 style), images/s, fp32;
- the digits classifier (FD-digits features), images/s;
- streaming statistics (FeatureStats.update) for 2048-d features, images/s;
- Fréchet distance of two 2048-d Gaussians: the eigen method (default) vs pytorch-fid's sqrtm;
- the end-to-end FID throughput implied for 50k images (extraction + statistics + FD);
- FD-digits between two halves of the real digits and to uniform noise (needs scikit-learn).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import cm_eval
import numpy as np
import torch


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_s(fn, device, warmup, repeat):
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_device(device, args) -> dict:
    res = {}
    torch.manual_seed(0)
    inc = cm_eval.inception_fid(None).to(device)
    for dtype_name in ["fp32"] + (["bf16-autocast"] if device.type == "cuda" else []):
        b = args.inception_batch if device.type == "cpu" else 256
        x = torch.rand(b, 3, 32, 32, device=device)

        def run(x=x, low=dtype_name != "fp32"):
            with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=low):
                inc(x)

        t = median_s(run, device, args.warmup, args.repeat)
        res[f"inception_{dtype_name}_img_per_s"] = b / t
        res[f"inception_{dtype_name}_batch"] = b
    net = cm_eval.load_digits_classifier().to(device)
    x = torch.rand(4096, 1, 8, 8, device=device) * 2 - 1
    t = median_s(lambda: net(x), device, args.warmup, args.repeat)
    res["digits_img_per_s"] = 4096 / t
    return res


def bench_cpu_math(args) -> dict:
    res = {}
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((1000, 2048))
    s = cm_eval.FeatureStats(2048)
    res["stats_update_img_per_s"] = 1000 / median_s(lambda: s.update(feats), torch.device("cpu"), 1, args.repeat)
    a = rng.standard_normal((2048, 2048)) / 45
    sigma1, sigma2 = a @ a.T, (a + 0.01) @ (a + 0.01).T
    mu = np.zeros(2048)
    for method in ("eigh", "sqrtm"):
        t0 = time.perf_counter()
        fd = cm_eval.frechet_distance(mu, sigma1, mu, sigma2, method=method)
        res[f"fd_2048_{method}_s"] = time.perf_counter() - t0
        res[f"fd_2048_{method}_value"] = fd
    return res


def fd_digits_numbers() -> dict:
    try:
        x, _ = cm_eval.load_digits_data("all")
    except ImportError:
        return {}
    net = cm_eval.load_digits_classifier()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        f1, f2 = net(x[perm[:898]])["features"], net(x[perm[898:]])["features"]
        fn = net(torch.rand(898, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1)["features"]
    xt, yt = cm_eval.load_digits_data("test")
    return {
        "fd_digits_real_halves": cm_eval.frechet_distance_from_features(f1, f2),
        "fd_digits_real_vs_noise": cm_eval.frechet_distance_from_features(f1, fn),
        "digits_test_accuracy": cm_eval.digits_class_accuracy(xt, yt, classifier=net),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--inception-batch", type=int, default=16, help="CPU batch for the Inception timing")
    p.add_argument("--json", help="also write the numbers to this JSON file")
    args = p.parse_args()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) if args.device == "auto" else [args.device]
    out = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    for d in devices:
        out[d] = bench_device(torch.device(d), args)
    out["cpu_math"] = bench_cpu_math(args)
    out.update(fd_digits_numbers())
    for d in devices:
        ips = out[d]["inception_fp32_img_per_s"]
        t_50k = 50_000 / ips + 50_000 / out["cpu_math"]["stats_update_img_per_s"] + out["cpu_math"]["fd_2048_eigh_s"]
        out[d]["fid_50k_estimated_s"] = t_50k
    print(json.dumps(out, indent=2))
    if args.json:
        cm_eval.write_report(args.json, out)


if __name__ == "__main__":
    main()

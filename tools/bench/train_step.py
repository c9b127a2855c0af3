"""Training-step benchmark: one optimizer step of a real preset with a real objective.

    python tools/bench/train_step.py [--device cpu|cuda] [--presets ddpmpp-cifar10 adm-imagenet64-no32-qkv]
                                     [--batch N] [--steps 5] [--compile]

For each preset: eager fp32, bf16 autocast (SDPA attention), bf16 with the fused cm-kernels
attention, and torch.compile when asked. Prints images/s, step time (median) and peak memory
(CUDA only). Results go to bench/RESULTS.md by hand, with the machine and the command.
"""

from __future__ import annotations

import argparse
import statistics
import time

import cm_core
import cm_nets
import torch
from timing import sync

SETUPS = {
    # preset: (objective name, objective kwargs, image shape, c_noise, default GPU batch)
    "ddpmpp-cifar10": ("ect", {"double_steps": 1000}, (3, 32, 32), "edm", 128),
    "adm-imagenet64-no32-qkv": ("ict", {"total_steps": 800_000}, (3, 64, 64), "openai", 64),
    "unet-tiny": ("ict", {"total_steps": 10_000}, (1, 16, 16), "edm", 64),
}


def make_step(preset, variant, device, batch, *, overrides=None, shape=None):
    """-> (step, net): ``step()`` runs one optimizer step of SETUPS[preset]'s objective on a fixed
    random batch; ``overrides`` go to ``cm_nets.create`` and ``shape`` replaces the image shape
    (gpu.py's tiny CPU run of the same preset)."""
    name, kwargs, preset_shape, c_noise, _ = SETUPS[preset]
    device = torch.device(device)
    torch.manual_seed(0)
    backend = {"fused": "fused", "sdpa": "sdpa"}.get(variant.split("+")[-1], None)
    overrides = dict(overrides or {})
    if backend and "attention_backend" in cm_nets.preset_config(preset):
        overrides["attention_backend"] = backend
    net = cm_nets.create(preset, **overrides).to(device)
    cond = {}
    if getattr(net, "num_classes", None):
        cond["class_labels"] = torch.randint(0, net.num_classes, (batch,), device=device)
    f = cm_core.ConsistencyFunction(net, c_noise=c_noise, boundary="edm" if name == "ect" else "shifted")
    model = torch.compile(f) if "compile" in variant else f
    objective = cm_core.create_objective(name, **kwargs)
    opt = torch.optim.RAdam(net.parameters(), lr=1e-4)
    dtype = torch.bfloat16 if "bf16" in variant else None
    x0 = torch.randn((batch,) + tuple(shape or preset_shape), device=device)
    gen = torch.Generator(device).manual_seed(0)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss, _ = objective(model, x0, step=1000, generator=gen, **cond)
        opt.zero_grad(set_to_none=True)
        loss.float().mean().backward()
        opt.step()

    return step, net


def bench(preset, variant, device, batch, steps, warmup, *, overrides=None, shape=None, deadline=None):
    """-> (median step s, img/s, peak GiB (CUDA, else nan), timed steps). ``deadline`` (a
    ``time.monotonic()`` value) ends the run early, after one warm-up and one timed step."""
    device = torch.device(device)
    step, _ = make_step(preset, variant, device, batch, overrides=overrides, shape=shape)
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        if deadline is not None and time.monotonic() > deadline and times:
            break
    med = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return med, batch / med, peak, len(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--presets", nargs="+", default=["ddpmpp-cifar10", "adm-imagenet64-no32-qkv"])
    p.add_argument("--batch", type=int, default=0, help="images per step (0: 2 on CPU, the paper's on GPU)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="also time torch.compile")
    p.add_argument(
        "--variants",
        nargs="+",
        default=None,
        help="subset of: fp32 bf16+sdpa bf16+fused bf16+fused+compile (CPU bf16 is slow without AMX)",
    )
    args = p.parse_args()
    device = torch.device(args.device)
    variants = args.variants or ["fp32", "bf16+sdpa", "bf16+fused"] + (["bf16+fused+compile"] if args.compile else [])
    print(
        f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), "
        f"torch {torch.__version__}, threads {torch.get_num_threads()}"
    )
    print("| preset | variant | batch | step s (median) | img/s | peak GiB |\n|---|---|---:|---:|---:|---:|")
    for preset in args.presets:
        batch = args.batch or (SETUPS[preset][4] if device.type == "cuda" else 2)
        for variant in variants:
            try:
                med, ips, peak, _ = bench(preset, variant, device, batch, args.steps, args.warmup)
                print(f"| {preset} | {variant} | {batch} | {med:.3f} | {ips:.2f} | {peak:.2f} |", flush=True)
            except Exception as exc:  # a missing backend is a row, not a crash
                print(f"| {preset} | {variant} | {batch} | failed: {type(exc).__name__}: {exc} | | |", flush=True)


if __name__ == "__main__":
    main()

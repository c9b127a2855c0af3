"""Benchmark cm_nets presets: forward and forward+backward images/s per preset and attention backend.

    python tools/bench/nets.py                                   # every preset, CPU (+ CUDA if visible)
    python tools/bench/nets.py --presets unet-tiny,ddpmpp-cifar10 --repeat 5
    python tools/bench/nets.py --device cuda --dtype bf16        # on a GPU, under bf16 autocast

Each preset runs at its native input size (ADM and EDM2 at 64×64, SongUNet at 32×32, unet-tiny
at 8×8 (the digits), mlp-toy on 2-vectors) with --batch samples (default per preset, small on CPU).
Forward: eval mode, no_grad. Forward+backward: train mode (dropout on), loss = mean(out²),
gradients into every parameter. Timings are medians of --repeat runs after --warmup runs, the
backends of one preset interleaved round-robin so that background load on a shared machine hits
them alike. A backend that cannot run a preset (head dim, device, dtype, not installed) is listed
with the reason instead of a number.
"""

from __future__ import annotations

import argparse

import cm_nets
import torch
from timing import median_ms

# preset -> (input shape without batch, needs labels, BCM, default CPU batch, default CUDA batch)
SHAPES = {
    "mlp-toy": ((2,), False, False, 4096, 65536),
    "unet-tiny": ((1, 8, 8), False, False, 128, 1024),
    "ddpmpp-cifar10": ((3, 32, 32), False, False, 4, 128),
    "ncsnpp-cifar10": ((3, 32, 32), False, False, 4, 128),
    "edm2-xs": ((4, 64, 64), True, False, 2, 128),
    "adm-imagenet64": ((3, 64, 64), True, False, 1, 64),
    "adm-imagenet64-no32-qkv": ((3, 64, 64), True, False, 1, 64),
    "adm-imagenet64-bcm": ((3, 64, 64), True, True, 1, 64),
}
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _has_attention(net: torch.nn.Module) -> bool:
    return any(hasattr(m, "attention_backend") for m in net.modules())


def _inputs(name: str, batch: int, device: str):
    shape, labels, bcm, _, _ = SHAPES[name]
    g = torch.Generator().manual_seed(0)
    x = torch.randn((batch, *shape), generator=g).to(device)
    c = torch.randn(batch, generator=g).to(device)
    kw = {}
    if labels:
        kw["class_labels"] = torch.randint(0, 10, (batch,), generator=g).to(device)
    if bcm:
        kw["c_noise_end"] = torch.randn(batch, generator=g).to(device)
    return x, c, kw


def bench_preset(name, backends, device, dtype, batch, warmup, repeat):
    torch.manual_seed(0)
    net = cm_nets.create(name).to(device)
    with torch.no_grad():  # wake zero-initialized layers so the backward does real work everywhere
        for p in net.parameters():
            if p.abs().max() == 0:
                p.normal_(std=0.01)
    x, c, kw = _inputs(name, batch, device)
    if not _has_attention(net):
        backends = ["-"]
    runs, skipped = {}, {}
    for backend in backends:
        if backend not in ("-", *cm_nets.available_backends()):
            continue  # not installed: reported once in main()
        if backend != "-":
            try:
                cm_nets.set_attention_backend(net, backend)
                with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=dtype is not None):
                    net.eval()(x[:1], c[:1], **{k: v[:1] for k, v in kw.items()})
            except (ValueError, TypeError, RuntimeError) as e:
                skipped[backend] = str(e).split(";")[0][:160]
                continue

        def fwd(backend=backend):
            if backend != "-":
                cm_nets.set_attention_backend(net, backend)
            net.eval()
            with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=dtype is not None):
                net(x, c, **kw)

        def fwd_bwd(backend=backend):
            if backend != "-":
                cm_nets.set_attention_backend(net, backend)
            net.train()
            net.zero_grad(set_to_none=True)
            with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
                loss = net(x, c, **kw).float().square().mean()
            loss.backward()

        runs[backend] = (fwd, fwd_bwd)
    ms = median_ms({(b, i): fn for b, fns in runs.items() for i, fn in enumerate(fns)}, device, warmup, repeat)
    rows = []
    for b in runs:
        f_ms, fb_ms = ms[b, 0], ms[b, 1]
        rows.append((name, b, batch, batch / f_ms * 1e3, f_ms, batch / fb_ms * 1e3, fb_ms))
    return rows, skipped, cm_nets.count_parameters(net)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default=",".join(SHAPES), help="comma-separated preset names (default: all)")
    parser.add_argument("--backends", default="math,sdpa,fused,flash,xformers", help="attention backends to compare")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: both when a GPU is visible)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="autocast dtype (fp32 = off)")
    parser.add_argument("--batch", type=int, default=None, help="batch size for every preset (default: per preset)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per implementation (default 1)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per implementation (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n for n in args.presets.split(",") if n]
    for n in names:
        if n not in SHAPES:
            parser.error(f"unknown preset {n!r}; valid: {', '.join(SHAPES)}")
    devices = [args.device] if args.device else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    backends = [b for b in args.backends.split(",") if b]
    print(
        f"torch {torch.__version__}, cm_nets {cm_nets.__version__}, threads {torch.get_num_threads()}, "
        f"installed attention backends: {cm_nets.available_backends()}, dtype {args.dtype}"
    )
    for device in devices:
        print(f"\n### {device}\n")
        print("| preset | params | attention | batch | fwd img/s | fwd ms | fwd+bwd img/s | fwd+bwd ms |")
        print("|---|---:|---|---:|---:|---:|---:|---:|")
        notes = []
        for name in names:
            batch = args.batch or SHAPES[name][3 if device == "cpu" else 4]
            rows, skipped, params = bench_preset(
                name, backends, device, DTYPES[args.dtype], batch, args.warmup, args.repeat
            )
            for preset, b, bs, f_ips, f_ms, fb_ips, fb_ms in rows:
                print(
                    f"| {preset} | {params / 1e6:.2f}M | {b} | {bs} | {f_ips:.2f} | {f_ms:.1f} | {fb_ips:.2f} | "
                    f"{fb_ms:.1f} |",
                    flush=True,
                )
            notes += [f"- {name} / {b}: not run ({why})" for b, why in skipped.items()]
        missing = [b for b in backends if b not in cm_nets.available_backends()]
        if missing:
            notes.append(f"- not installed, not run: {', '.join(missing)}")
        if notes:
            print("\n" + "\n".join(notes))


if __name__ == "__main__":
    main()

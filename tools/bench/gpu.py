"""GPU validation benchmark: the figures tools/gpu_check.sh records for bench/RESULTS.md.

    python tools/bench/gpu.py --out DIR                         # the default device (CUDA when visible), real sizes
    python tools/bench/gpu.py --device cpu --tiny --out DIR     # every code path in seconds (CI's dry run)
    python tools/bench/gpu.py --check-kernels --device cuda     # only check that the CUDA kernels are active

Measures, each stopped at --time-limit seconds (no new configuration or timed run starts after
it; a hard stop at 1.5x + 5 s ends a measure stuck in one call). A failed measure is recorded and
the others still run; DIR/gpu_check.md and DIR/gpu_check.json are rewritten after each measure, so
a run killed from outside keeps what it measured.

  pseudo_huber  cm_kernels.pseudo_huber_loss (reduction "mean"), forward and forward+backward
                into pred. Effective bandwidth = bytes counted / time; bytes counted with s bytes
                per element and N elements: forward 2*N*s (read pred, target); forward+backward
                5*N*s (forward 2*N*s, then the backward reads pred and target again and writes
                grad: 3*N*s). Compared with torch's copy_ of one N-element tensor (2*N*s: read,
                write) in the same run; eager PyTorch's loss is timed with the same count. On
                CUDA the L2 is flushed (a 256 MiB write) before every timed run.
  attention     cm_kernels.normalized_attention (normalize="qkv") vs EDM2 normalization
                x / (1e-4 + ||x|| / sqrt(d)) of q, k, v per head followed by
                F.scaled_dot_product_attention (flash backend on CUDA, the default on CPU);
                bf16 on CUDA (fp32 on CPU), d = 64, N = 256 and 1024 (--tiny: 64 and 128), forward
                and forward+backward. FLOPs: forward 4*B*H*N^2*d, forward+backward 3.5x that. On
                CUDA also the opt-in tensor-core kernels (cm_kernels.set_cuda_tensor_cores(True)).
  jvp           torch.func.jvp of cm_kernels.normalized_attention (the fused JVP kernel: output and
                tangent in one pass) vs torch.func.jvp of the reference (normalize + matmul/softmax),
                normalize="qkv", same dtype and sizes as attention (--tiny: N = 64): time, peak CUDA
                memory above the inputs, and the largest difference of the two tangents.
  train_step    one iCT optimizer step (objective, backward, RAdam) of adm-imagenet64-no32-qkv,
                bf16 autocast, batch 64 at 64x64, fused attention then SDPA (--tiny: a 2-level
                32-channel version of the same preset at 16x16, batch 2, fused only): img/s and
                torch.cuda.max_memory_allocated.
  sampling      1-NFE (sigma 80) and 2-NFE (80 -> 2.4, BCM's ImageNet-64 middle sigma) sampling
                with cm_core.onestep_sample / multistep_sample through the same network, bf16
                autocast, fused attention, batch 256 (--tiny: 2): img/s.

Timings: CUDA events on a GPU, wall clock on CPU; medians; implementations of one measure are
interleaved round-robin (timing.py). Exit status: 0 when every measure gave figures (possibly
fewer than planned, stopped by the time limit), 1 when one failed or gave none.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import cm_core
import cm_kernels
import cm_nets
import torch
import torch.nn.functional as F
import train_step
from cm_kernels import reference
from timing import cpu_name, forward_backward, forward_only, median_ms

PRESET = "adm-imagenet64-no32-qkv"
# --tiny: the same preset (class-conditional ADM, QKV-normalized attention at both levels, 32-channel
# heads) with 2 levels of 32/64 channels at 16x16: a few MB, a training step in well under a second on CPU.
TINY_OVERRIDES = dict(image_size=16, model_channels=32, channel_mult=(1, 2), num_res_blocks=1, num_head_channels=32)
TINY_SHAPE = (3, 16, 16)
TWO_STEP_SIGMAS = (80.0, 2.4)


class MeasureTimeout(BaseException):
    """A BaseException, so that no ``except Exception`` on the way swallows the stop."""


@contextlib.contextmanager
def hard_limit(seconds: float):
    """Raise MeasureTimeout in the main thread after ``seconds`` (POSIX; a no-op elsewhere). It lands
    when control returns to Python, so a single long CUDA call is only stopped by gpu_check.sh's timeout."""
    if not hasattr(signal, "setitimer"):
        yield
        return

    def handler(signum, frame):
        raise MeasureTimeout(f"hard stop after {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Measure:
    """One measure's record: rows of figures, notes, and whether the time limit cut it short."""

    def __init__(self, key: str, title: str, columns: list[tuple[str, str]], explain: str):
        self.key, self.title, self.columns, self.explain = key, title, columns, explain
        self.rows: list[dict] = []
        self.notes: list[str] = []
        self.status = "not run"
        self.seconds = 0.0
        self.deadline = math.inf

    def late(self, skipping: str) -> bool:
        """True (and noted) when the time limit has passed: ``skipping`` is not measured. The first
        configuration always runs (only the hard stop ends it), so every measure gives a figure."""
        if not self.rows or time.monotonic() <= self.deadline:
            return False
        self.notes.append(f"time limit reached: not measured: {skipping}")
        return True


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def _sdpa_context(device: torch.device):
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.FLASH_ATTENTION)
    return contextlib.nullcontext()


# --- the measures ---------------------------------------------------------------------------------


def measure_pseudo_huber(m: Measure, device: torch.device, args) -> None:
    # Real: 4096 ImageNet-64 samples, 50M elements (200 MB per fp32 tensor): on an H100/H200 one
    # fwd+bwd moves 1 GB in ~0.3 ms, so launch overheads of a few µs stay below the noise.
    shape = (8, 3, 16, 16) if args.tiny else (4096, 3, 64, 64)
    dtypes = [torch.float32, torch.bfloat16] if device.type == "cuda" else [torch.float32]
    c = 0.00054 * math.prod(shape[1:]) ** 0.5  # iCT's c for this sample size
    for dtype in dtypes:
        if m.late(f"{_dtype_name(dtype)} {list(shape)}"):
            return
        g = torch.Generator(device=device).manual_seed(0)
        pred = torch.randn(shape, device=device, dtype=dtype, generator=g).requires_grad_()
        target = torch.randn(shape, device=device, dtype=dtype, generator=g)
        src, dst = torch.randn(shape, device=device, dtype=dtype, generator=g), torch.empty_like(pred)

        def kernel(p, t):
            return cm_kernels.pseudo_huber_loss(p, t, c)

        def eager(p, t):
            return reference.pseudo_huber_loss(p, t, c)

        fns = {
            ("cm_kernels fwd", 2): forward_only(kernel, (pred, target)),
            ("cm_kernels fwd+bwd", 5): forward_backward(kernel, (pred, target), (pred,)),
            ("eager PyTorch fwd+bwd", 5): forward_backward(eager, (pred, target), (pred,)),
            ("torch copy_", 2): lambda: dst.copy_(src),
        }
        ms = median_ms(fns, device, args.warmup, args.repeat, flush_l2=True, deadline=m.deadline)
        element_bytes = pred.numel() * pred.element_size()
        copy_gbps = 2 * element_bytes / ms["torch copy_", 2] / 1e6
        for (name, n_passes), t in ms.items():
            gbps = n_passes * element_bytes / t / 1e6
            m.rows.append(
                dict(
                    dtype=_dtype_name(dtype),
                    shape=str(list(shape)),
                    op=name,
                    ms=t,
                    bytes_counted=n_passes * element_bytes,
                    gb_per_s=gbps,
                    vs_copy=gbps / copy_gbps,
                )
            )


def measure_attention(m: Measure, device: torch.device, args) -> None:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    d = 64
    # B*N = 16k tokens per config (the real ones): ADM at 16x16 with a batch of 64 has 256 tokens.
    configs = [(1, 2, 64, d), (1, 2, 128, d)] if args.tiny else [(64, 8, 256, d), (16, 8, 1024, d)]
    n = reference.normalize_heads

    def fused(q, k, v):
        return cm_kernels.normalized_attention(q, k, v)

    def norm_sdpa(q, k, v):
        with _sdpa_context(device):
            return F.scaled_dot_product_attention(n(q), n(k), n(v))

    def tensor_cores(run):
        """``run`` (a timed callable: forward, or forward and backward) with the opt-in tensor-core
        kernels on, then the setting before."""

        def wrapped():
            before = cm_kernels.cuda_tensor_cores()
            cm_kernels.set_cuda_tensor_cores(True)
            try:
                return run()
            finally:
                cm_kernels.set_cuda_tensor_cores(before)

        return wrapped

    def fused_mma(q, k, v):
        return tensor_cores(lambda: fused(q, k, v))()

    impls = {"cm_kernels": fused, "normalize+SDPA": norm_sdpa}
    if device.type == "cuda" and dtype != torch.float32:
        impls["cm_kernels mma"] = fused  # timed inside tensor_cores(...) below
    for B, H, N, d in configs:
        if m.late(f"N={N}"):
            return
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(B, H, N, d, device=device, dtype=dtype, generator=g).requires_grad_() for _ in range(3))
        with torch.no_grad():
            diff = (fused(q, k, v).float() - norm_sdpa(q, k, v).float()).abs().max().item()
            mma_diff = (
                (fused_mma(q, k, v).float() - norm_sdpa(q, k, v).float()).abs().max().item()
                if "cm_kernels mma" in impls
                else None
            )
        flops = 4 * B * H * N * N * d
        for pass_name, wrap, flop_factor in (
            ("fwd", lambda f: forward_only(f, (q, k, v)), 1.0),
            ("fwd+bwd", lambda f: forward_backward(f, (q, k, v), (q, k, v)), 3.5),
        ):
            if m.late(f"N={N} {pass_name}"):
                return
            fns = {name: tensor_cores(wrap(f)) if name.endswith("mma") else wrap(f) for name, f in impls.items()}
            ms = median_ms(fns, device, args.warmup, args.repeat, deadline=m.deadline)
            fused_ms, sdpa_ms, mma_ms = ms["cm_kernels"], ms["normalize+SDPA"], ms.get("cm_kernels mma")
            m.rows.append(
                dict(
                    dtype=_dtype_name(dtype),
                    shape=f"{B}x{H}x{N}x{d}",
                    N=N,
                    pass_=pass_name,
                    cm_kernels_ms=fused_ms,
                    sdpa_ms=sdpa_ms,
                    speedup=sdpa_ms / fused_ms,
                    cm_kernels_tflops=flop_factor * flops / fused_ms / 1e9,
                    sdpa_tflops=flop_factor * flops / sdpa_ms / 1e9,
                    max_abs_diff=diff,
                    mma_ms=mma_ms,
                    mma_speedup=None if mma_ms is None else sdpa_ms / mma_ms,
                    mma_max_abs_diff=mma_diff,
                )
            )


def _peak_mib(fn, device: torch.device) -> float | None:
    """Peak CUDA memory above what was allocated before one call of fn, in MiB (None on CPU:
    tools/bench/jvp.py measures the CPU's)."""
    if device.type != "cuda":
        return None
    _free(device)
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def measure_jvp(m: Measure, device: torch.device, args) -> None:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    d = 64
    configs = [(1, 2, 64, d)] if args.tiny else [(64, 8, 256, d), (16, 8, 1024, d)]

    def jvp_of(attn, q, k, v, tq, tk, tv):
        return lambda: torch.func.jvp(attn, (q, k, v), (tq, tk, tv))

    impls = {"cm_kernels": cm_kernels.normalized_attention, "normalize+math": reference.normalized_attention}
    for B, H, N, d in configs:
        if m.late(f"N={N}"):
            return
        g = torch.Generator(device=device).manual_seed(0)
        x = [torch.randn(B, H, N, d, device=device, dtype=dtype, generator=g) for _ in range(6)]
        fns = {name: jvp_of(f, *x) for name, f in impls.items()}
        with torch.no_grad():
            (_, t_fused), (_, t_math) = fns["cm_kernels"](), fns["normalize+math"]()
            diff = (t_fused.float() - t_math.float()).abs().max().item()
        peaks = {name: _peak_mib(fn, device) for name, fn in fns.items()}
        ms = median_ms(fns, device, args.warmup, args.repeat, deadline=m.deadline)
        m.rows.append(
            dict(
                dtype=_dtype_name(dtype),
                shape=f"{B}x{H}x{N}x{d}",
                N=N,
                cm_kernels_ms=ms["cm_kernels"],
                math_ms=ms["normalize+math"],
                speedup=ms["normalize+math"] / ms["cm_kernels"],
                cm_kernels_peak_mib=peaks["cm_kernels"],
                math_peak_mib=peaks["normalize+math"],
                max_abs_diff=diff,
            )
        )


def _network_setup(args):
    if args.tiny:
        return dict(TINY_OVERRIDES), TINY_SHAPE
    return {}, None


def measure_train_step(m: Measure, device: torch.device, args) -> None:
    overrides, shape = _network_setup(args)
    batch = args.batch or (2 if args.tiny else train_step.SETUPS[PRESET][4])
    variants = ["bf16+fused"] if args.tiny else ["bf16+fused", "bf16+sdpa"]
    steps, warmup = (2, 1) if args.tiny else (6, 2)
    for variant in variants:
        if m.late(variant):
            return
        _free(device)
        med, ips, peak, n_timed = train_step.bench(
            PRESET, variant, device, batch, steps, warmup, overrides=overrides, shape=shape, deadline=m.deadline
        )
        m.rows.append(
            dict(
                preset=PRESET + (" (tiny)" if args.tiny else ""),
                variant=variant,
                batch=batch,
                image="x".join(map(str, shape or train_step.SETUPS[PRESET][2])),
                step_ms=med * 1e3,
                img_per_s=ips,
                peak_gib=None if math.isnan(peak) else peak,
                steps_timed=n_timed,
            )
        )


def measure_sampling(m: Measure, device: torch.device, args) -> None:
    overrides, shape = _network_setup(args)
    shape = shape or train_step.SETUPS[PRESET][2]
    batch = args.sample_batch or (2 if args.tiny else 256)
    _free(device)
    torch.manual_seed(0)
    net = cm_nets.create(PRESET, attention_backend="fused", **overrides).to(device).eval()
    f = cm_core.ConsistencyFunction(net, c_noise=train_step.SETUPS[PRESET][3])
    g = torch.Generator(device=device).manual_seed(0)
    z = torch.randn((batch, *shape), device=device, generator=g)
    labels = torch.randint(0, net.num_classes, (batch,), device=device, generator=g)
    dtype = torch.bfloat16

    def sampler(nfe: int):
        def run():
            with torch.no_grad(), torch.autocast(device.type, dtype=dtype):
                if nfe == 1:
                    return cm_core.onestep_sample(f, z, TWO_STEP_SIGMAS[0], class_labels=labels)
                return cm_core.multistep_sample(f, z, TWO_STEP_SIGMAS, generator=g, class_labels=labels)

        return run

    ms = median_ms({1: sampler(1), 2: sampler(2)}, device, args.warmup, args.repeat, deadline=m.deadline)
    for nfe, t in ms.items():
        m.rows.append(
            dict(
                preset=PRESET + (" (tiny)" if args.tiny else ""),
                nfe=nfe,
                sigmas=" -> ".join(f"{s:g}" for s in TWO_STEP_SIGMAS[:nfe]),
                batch=batch,
                ms=t,
                img_per_s=batch / t * 1e3,
            )
        )


MEASURES = [
    (
        "pseudo_huber",
        "pseudo_huber_loss: effective bandwidth",
        [("dtype", "dtype"), ("shape", "shape"), ("op", "op"), ("ms", "ms"), ("gb_per_s", "GB/s"),
         ("vs_copy", "vs copy")],  # fmt: skip
        "Bytes counted: fwd 2·N·s (read pred, target); fwd+bwd 5·N·s (fwd, then read pred, target and write "
        "grad); copy_ 2·N·s. Eager PyTorch is credited with the same bytes. L2 flushed before each timed run "
        "on CUDA.",
        measure_pseudo_huber,
    ),
    (
        "attention",
        "normalized attention (qkv) vs normalize + SDPA",
        [("dtype", "dtype"), ("shape", "B×H×N×d"), ("pass_", "pass"), ("cm_kernels_ms", "cm_kernels ms"),
         ("sdpa_ms", "norm+SDPA ms"), ("speedup", "speedup"), ("cm_kernels_tflops", "cm_kernels TFLOP/s"),
         ("sdpa_tflops", "norm+SDPA TFLOP/s"), ("max_abs_diff", "max abs diff"), ("mma_ms", "mma ms"),
         ("mma_speedup", "mma speedup"), ("mma_max_abs_diff", "mma max abs diff")],  # fmt: skip
        "SDPA backend: flash on CUDA, default on CPU. speedup = norm+SDPA time / cm_kernels time. FLOPs: fwd "
        "4·B·H·N²·d, fwd+bwd 3.5× that. max abs diff: forward outputs of the two. mma: the opt-in tensor-core "
        "kernels (cm_kernels.set_cuda_tensor_cores(True): forward, and backward for d ≤ 64), CUDA half dtypes only.",
        measure_attention,
    ),
    (
        "jvp",
        "normalized attention JVP (forward mode) vs torch.func.jvp of normalize + math attention",
        [("dtype", "dtype"), ("shape", "B×H×N×d"), ("cm_kernels_ms", "cm_kernels ms"), ("math_ms", "norm+math ms"),
         ("speedup", "speedup"), ("cm_kernels_peak_mib", "cm_kernels peak MiB"),
         ("math_peak_mib", "norm+math peak MiB"), ("max_abs_diff", "max abs diff")],  # fmt: skip
        "torch.func.jvp of cm_kernels.normalized_attention (normalize=\"qkv\"; the fused JVP kernel: output and "
        "tangent in one pass) and of cm_kernels.reference.normalized_attention (EDM2 normalization, matmul, "
        "softmax, matmul: what backends without a forward-mode rule fall back to). speedup = norm+math time / "
        "cm_kernels time. Peak MiB: CUDA memory above the inputs during one call (CUDA only; "
        "tools/bench/jvp.py measures the CPU). max abs diff: the two tangents.",
        measure_jvp,
    ),
    (
        "train_step",
        "iCT training step",
        [("preset", "preset"), ("variant", "variant"), ("batch", "batch"), ("image", "image"),
         ("step_ms", "step ms"), ("img_per_s", "img/s"), ("peak_gib", "peak GiB"),
         ("steps_timed", "steps")],  # fmt: skip
        "One optimizer step: iCT objective (pseudo-Huber, lognormal σ), backward, RAdam; median step. peak GiB "
        "= torch.cuda.max_memory_allocated (CUDA only).",
        measure_train_step,
    ),
    (
        "sampling",
        "sampling",
        [("preset", "preset"), ("nfe", "NFE"), ("sigmas", "σ"), ("batch", "batch"), ("ms", "ms"),
         ("img_per_s", "img/s")],  # fmt: skip
        "cm_core.onestep_sample / multistep_sample, bf16 autocast, fused attention, no_grad, eval mode.",
        measure_sampling,
    ),
]


# --- the report -----------------------------------------------------------------------------------


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _driver_version() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.splitlines()[0].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown (no nvidia-smi)"


def machine(device: torch.device, argv: list[str]) -> dict:
    from cm_kernels import _build_info as build

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device_type": device.type,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda or "none",
        "cm_kernels": f"{cm_kernels.__version__}, backend {cm_kernels.backends()['normalized_attention']['backend']}, "
        f"CUDA archs {', '.join(build.CUDA_ARCHS) or 'none'}"
        + (f", nvcc {build.NVCC_VERSION}" if getattr(build, "NVCC_VERSION", None) else ""),
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "command": " ".join(["python", "tools/bench/gpu.py", *argv]),
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(
            device=torch.cuda.get_device_name(device),
            device_detail=f"sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB",
            driver=_driver_version(),
        )
    else:
        info.update(device=f"cpu ({cpu_name()})", device_detail=f"{os.cpu_count()} logical cores", driver="n/a")
    return info


def _cell(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "–"
        return f"{v:.3g}" if abs(v) < 10 else f"{v:,.1f}"
    return str(v)


def markdown(meta: dict, measures: list[Measure], tiny: bool) -> str:
    lines = [
        f"## GPU check: {meta['device']}, {meta['date'][:10]}",
        "",
        f"- Device: {meta['device']} ({meta['device_detail']}); driver {meta['driver']}",
        f"- torch {meta['torch']} (CUDA {meta['torch_cuda']}), Python {meta['python']}, "
        f"torch threads {meta['threads']}; cm_kernels {meta['cm_kernels']}",
        f"- Date: {meta['date']}; command: `{meta['command']}`",
    ]
    if tiny:
        lines.append("- **--tiny sizes: a smoke test of every code path, not figures to quote.**")
    for m in measures:
        lines += ["", f"### {m.title}", "", m.explain, ""]
        if m.rows:
            lines.append("| " + " | ".join(head for _, head in m.columns) + " |")
            numeric = {key for r in m.rows for key, v in r.items() if v is None or isinstance(v, (int, float))}
            aligns = ["---:" if key in numeric else "---" for key, _ in m.columns]
            lines.append("|" + "|".join(aligns) + "|")
            lines += ["| " + " | ".join(_cell(r.get(key)) for key, _ in m.columns) + " |" for r in m.rows]
            lines.append("")
        lines.append(f"Status: {m.status} ({m.seconds:.1f} s)." + "".join(f" {n}." for n in m.notes))
    return "\n".join(lines) + "\n"


def _json_safe(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def write(out: Path | None, meta: dict, measures: list[Measure], tiny: bool) -> str:
    text = markdown(meta, measures, tiny)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        data = {
            "meta": meta,
            "tiny": tiny,
            "measures": {
                m.key: {
                    "title": m.title,
                    "status": m.status,
                    "seconds": m.seconds,
                    "notes": m.notes,
                    "rows": [{k: _json_safe(v) for k, v in r.items()} for r in m.rows],
                }
                for m in measures
            },
        }
        for name, content in (("gpu_check.md", text), ("gpu_check.json", json.dumps(data, indent=2) + "\n")):
            tmp = out / f".{name}.tmp"
            tmp.write_text(content)
            tmp.replace(out / name)
    return text


def check_kernels(device: torch.device) -> int:
    """Print cm_kernels' build and backends; on CUDA, fail unless the CUDA kernels are active for this GPU."""
    from cm_kernels import _build_info as build

    print(f"cm_kernels {cm_kernels.__version__}: torch {build.TORCH_VERSION}, CUDA archs {build.CUDA_ARCHS}")
    for op, entry in cm_kernels.backends().items():
        print(f"  {op:<26} {entry['backend']:<10} {entry['reason']}")
    if device.type != "cuda":
        backend = cm_kernels.backends()["pseudo_huber_loss"]["backend"]
        print(f"ok: cm_kernels imports; {device.type} tensors use {backend}")
        return 0
    problems = []
    if not torch.cuda.is_available():
        problems.append("torch sees no CUDA GPU")
    else:
        major, minor = torch.cuda.get_device_capability(device)
        if f"{major}{minor}" not in {str(a) for a in build.CUDA_ARCHS}:
            problems.append(f"the GPU is sm_{major}{minor} but cm_kernels was built for {build.CUDA_ARCHS or 'no GPU'}")
        inactive = [op for op, e in cm_kernels.backends().items() if e["backend"] != "cuda-ext"]
        if inactive:
            problems.append(f"CUDA kernels inactive for {', '.join(inactive)}")
    if not problems:
        major, minor = torch.cuda.get_device_capability(device)
        print(f"ok: CUDA kernels active on {torch.cuda.get_device_name(device)} (sm_{major}{minor})")
    print("".join(f"FAILED: {p}\n" for p in problems), end="", flush=True)
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="gpu.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default=None, help="device to measure (default: cuda when visible)"
    )
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: every code path in seconds (CI dry run)")
    parser.add_argument(
        "--out", type=Path, default=None, help="folder for gpu_check.md and gpu_check.json (default: $OUT when set)"
    )
    parser.add_argument(
        "--time-limit", type=float, default=20.0, help="seconds per measure (default 20; 5 measures)"
    )
    parser.add_argument("--repeat", type=int, default=None, help="timed runs per case (default 20, --tiny 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs per case (default 3, --tiny 1)")
    parser.add_argument("--batch", type=int, default=0, help="training batch (default 64, --tiny 2)")
    parser.add_argument("--sample-batch", type=int, default=0, help="sampling batch (default 256, --tiny 2)")
    parser.add_argument(
        "--only", default=None, help=f"comma-separated subset of: {', '.join(k for k, *_ in MEASURES)}"
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (default: torch's, --tiny 1)"
    )
    parser.add_argument(
        "--check-kernels", action="store_true", help="only print cm_kernels' backends; on cuda fail unless active"
    )
    args = parser.parse_args(argv)
    if args.time_limit <= 0:
        parser.error("--time-limit must be > 0")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.check_kernels:
        return check_kernels(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA GPU")
    # Tiny tensors: OpenMP hand-offs between threads cost more than the arithmetic, and stall
    # badly when another process holds a core (the root conftest.py's reasoning).
    if args.threads or args.tiny:
        torch.set_num_threads(args.threads or 1)
    args.repeat = args.repeat or (3 if args.tiny else 20)
    args.warmup = args.warmup or (1 if args.tiny else 3)
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    keys = [k for k, *_ in MEASURES]
    only = keys if args.only is None else [k for k in args.only.split(",") if k]
    unknown = sorted(set(only) - set(keys))
    if unknown or not only:
        parser.error(f"--only: unknown or no measure(s) {unknown}; valid: {', '.join(keys)}")

    meta = machine(device, argv)
    measures = [Measure(k, title, cols, explain) for k, title, cols, explain, _ in MEASURES if k in only]
    run = {k: fn for k, *_, fn in MEASURES}
    ok = True
    for m in measures:
        print(f"[gpu.py] {m.key}: measuring (time limit {args.time_limit:g} s)", flush=True)
        t0 = time.monotonic()
        m.deadline = t0 + args.time_limit
        try:
            with hard_limit(1.5 * args.time_limit + 5):
                run[m.key](m, device, args)
            m.status = "ok" if not m.notes else "stopped at the time limit"
        except MeasureTimeout as exc:
            m.status = f"timed out ({exc})"
        except Exception as exc:  # one measure's failure is a record, not the end of the run
            traceback.print_exc()
            m.status = f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        if not m.rows and not m.status.startswith("FAILED"):
            m.status = f"FAILED: no figures ({m.status})"
        ok = ok and not m.status.startswith("FAILED")
        m.seconds = time.monotonic() - t0
        print(f"[gpu.py] {m.key}: {m.status} ({m.seconds:.1f} s, {len(m.rows)} rows)", flush=True)
        _free(device)
        text = write(out, meta, measures, args.tiny)
    print("\n" + text)
    if out is not None:
        print(f"[gpu.py] wrote {out / 'gpu_check.md'} and {out / 'gpu_check.json'}")
    print("[gpu.py] measures: " + ", ".join(f"{m.key} {m.status.split(':')[0]}" for m in measures))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

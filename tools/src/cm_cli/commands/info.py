"""``cm info``: versions, devices, compiled kernels and attention backends, with the reasons."""

from __future__ import annotations

import importlib.metadata
import platform
import sys

import click

PACKAGES = ("cm-kernels", "cm-core", "cm-nets", "cm-train", "cm-eval", "cm-tools")
ATTENTION_WHY_NOT = {
    "fused": "cm-kernels is not installed (a dependency of cm-nets: pip install cm-nets)",
    "flash": "flash-attn is not installed (pip install flash-attn; CUDA, fp16/bf16 only)",
    "xformers": "xformers is not installed (pip install xformers; CUDA only)",
}


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


@click.command()
def info() -> None:
    """Versions, devices, cm_kernels build and active ops, attention backends; exits 0.

    \b
    Example:
      cm info
    """
    import torch

    out = click.echo
    out(f"python      {sys.version.split()[0]} ({platform.platform()})")
    out(f"torch       {torch.__version__} (CUDA {torch.version.cuda or 'none'}, threads {torch.get_num_threads()})")
    for dist in PACKAGES:
        out(f"{dist:<11} {_version(dist)}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            out(f"device      cuda:{i} {p.name} ({p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor})")
    else:
        out("device      cpu only (torch sees no CUDA GPU)")

    try:
        import cm_kernels
        from cm_kernels import _build_info as build
    except Exception as exc:  # a broken build must not hide the rest of the report
        out(f"cm_kernels  unavailable: {type(exc).__name__}: {exc}")
    else:
        kernels = f"CPU + CUDA (sm_{', sm_'.join(build.CUDA_ARCHS)})" if build.WITH_CUDA else "CPU only"
        out(f"cm_kernels  {kernels}, built against torch {build.TORCH_VERSION} "
            f"(CM_KERNELS_CUDA={getattr(build, 'CUDA_MODE', '?')})")  # fmt: skip
        if getattr(build, "CUDA_HOME", None):
            out(f"            toolkit {build.CUDA_HOME} (nvcc {build.NVCC_VERSION})")
        out(f"            {build.CUDA_REASON}")
        report = cm_kernels.backends()
        out("  ops       " + ", ".join(f"{op} {entry['backend']}" for op, entry in report.items()))
        if "cpu_isa" in next(iter(report.values())):
            out(f"            CPU kernels: {cm_kernels.cpu_isa()} instruction set (chosen at run time; "
                "CM_KERNELS_ISA=avx512|avx2|base overrides)")  # fmt: skip
        if build.WITH_CUDA:
            state = "on" if cm_kernels.cuda_tensor_cores() else "off (opt-in: CM_KERNELS_CUDA_MMA=1; not yet run on a GPU)"
            out(f"            CUDA tensor-core attention (fp16/bf16, sm_80+): {state}")
        for why in sorted({entry["reason"] for entry in report.values()}):  # what adds to the build line
            extra = why.removeprefix(build.CUDA_REASON).lstrip(",; ")
            if extra:
                out(f"            {extra}")

    import cm_nets

    available = set(cm_nets.available_backends())
    out("attention backends (cm_nets):")
    for name in cm_nets.BACKENDS[1:]:
        state = "available" if name in available else f"missing: {ATTENTION_WHY_NOT.get(name, 'not installed')}"
        out(f"  {name:<9} {state}")
    out("  auto      the measured-faster backend per device, dtype, head dim and normalization:")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for normalize in ("qkv", "none"):
                name, why = cm_nets.auto_choice(device, dtype, 64, normalize)
                label = f"{device} {str(dtype).removeprefix('torch.')} d=64 normalize={normalize}"
                out(f"    {label:<40} -> {name:<8} {why}")


COMMANDS = [info]

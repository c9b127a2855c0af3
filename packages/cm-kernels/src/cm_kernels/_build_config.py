"""Build flags and the CUDA decision, shared by setup.py (ahead-of-time build, the default) and
the JIT loader (CM_KERNELS_JIT=1). Imports only torch; setup.py loads this file by path.

Environment: CM_KERNELS_SKIP_CUDA=1 (CPU kernels only), CM_KERNELS_CUDA_ARCHS="80;90".
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import torch

# -O3 for kernels; no -march=native: the binary must not depend on the build machine.
CXX_FLAGS = ["-O3", "-fvisibility=hidden"]
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
DEFAULT_CUDA_ARCHS = "80;90"


def nvcc_path() -> str | None:
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is not None and (Path(CUDA_HOME) / "bin" / "nvcc").exists():
        return str(Path(CUDA_HOME) / "bin" / "nvcc")
    return shutil.which("nvcc")


def cuda_decision() -> tuple[bool, str]:
    """Whether to compile the CUDA kernels, and why. Decided by what torch was built with and
    whether a toolkit is installed, never by torch.cuda.is_available(): build hosts often have
    no GPU."""
    if os.environ.get("CM_KERNELS_SKIP_CUDA", "0") == "1":
        return False, "CUDA kernels not built: CM_KERNELS_SKIP_CUDA=1"
    if torch.version.cuda is None:
        return False, f"CUDA kernels not built: torch {torch.__version__} is a CPU build"
    if nvcc_path() is None:
        return False, "CUDA kernels not built: no nvcc (CUDA_HOME unset and nvcc not on PATH)"
    return True, f"CUDA kernels built with torch CUDA {torch.version.cuda} and {nvcc_path()}"


def cuda_archs() -> list[str]:
    raw = os.environ.get("CM_KERNELS_CUDA_ARCHS", DEFAULT_CUDA_ARCHS)
    archs = [a.strip().replace(".", "") for a in raw.replace(",", ";").split(";") if a.strip()]
    if not archs or not all(a.isdigit() for a in archs):
        raise ValueError(f"CM_KERNELS_CUDA_ARCHS must look like '80;90', got {raw!r}")
    return archs


def gencode_flags(archs: list[str]) -> list[str]:
    return [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]


def sources(csrc: Path, with_cuda: bool) -> list[Path]:
    files = [csrc / "ops.cpp", *sorted((csrc / "cpu").glob("*.cpp"))]
    if with_cuda:
        files += sorted((csrc / "cuda").glob("*.cpp")) + sorted((csrc / "cuda").glob("*.cu"))
    return files


def source_hash(csrc: Path, with_cuda: bool, archs: list[str]) -> str:
    """Hash of every source and header, the flags and the torch version: the JIT cache key."""
    h = hashlib.sha256()
    for p in sorted(csrc.rglob("*")):
        if p.is_file() and p.suffix in (".cpp", ".cu", ".h", ".cuh"):
            h.update(str(p.relative_to(csrc)).encode())
            h.update(p.read_bytes())
    h.update(repr((CXX_FLAGS, NVCC_FLAGS, with_cuda, archs, torch.__version__)).encode())
    return h.hexdigest()[:16]


def build_info_text(with_cuda: bool, reason: str, archs: list[str]) -> str:
    return (
        '"""Generated at build time; records what cm_kernels._C was built with. Do not edit."""\n\n'
        f"TORCH_VERSION = {torch.__version__!r}\n"
        f"TORCH_CUDA_VERSION = {torch.version.cuda!r}\n"
        f"WITH_CUDA = {with_cuda!r}\n"
        f"CUDA_ARCHS = {tuple(archs) if with_cuda else ()!r}\n"
        f"CUDA_REASON = {reason!r}\n"
    )

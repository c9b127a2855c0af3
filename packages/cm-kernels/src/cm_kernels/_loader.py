"""Loads the compiled ops (cm_kernels._C, or a JIT build when CM_KERNELS_JIT=1) and says why
not when it cannot. The only place in cm_kernels that reads environment variables."""

from __future__ import annotations

import dataclasses
import importlib
import os
import warnings
from pathlib import Path

import torch


class KernelFallbackWarning(UserWarning):
    """cm_kernels runs a slower path than the compiled kernels (stated once, with the reason)."""


@dataclasses.dataclass(frozen=True)
class ExtState:
    loaded: bool
    with_cuda: bool
    reason: str  # why the extension (or its CUDA part) is or is not available
    source: str  # "aot", "jit" or "none"


_CSRC = Path(__file__).resolve().parents[2] / "csrc"  # present in a source checkout only


def _load_aot() -> ExtState:
    info = importlib.import_module("cm_kernels._build_info")
    importlib.import_module("cm_kernels._C")  # runs the TORCH_LIBRARY registrations
    if info.TORCH_VERSION != torch.__version__:
        warnings.warn(
            f"cm_kernels._C was built against torch {info.TORCH_VERSION} but torch "
            f"{torch.__version__} is installed; rebuild with "
            "`pip install --no-build-isolation -e packages/cm-kernels` if ops misbehave",
            RuntimeWarning,
            stacklevel=3,
        )
    return ExtState(True, bool(info.WITH_CUDA), info.CUDA_REASON, "aot")


def _load_jit() -> ExtState:
    from torch.utils.cpp_extension import load

    from . import _build_config as cfg

    if not _CSRC.is_dir():
        raise FileNotFoundError(f"CM_KERNELS_JIT=1 needs the C++ sources, not found at {_CSRC}")
    # No test build here (it costs seconds per import); a broken toolkit fails the JIT build,
    # which falls back to the reference with the reason.
    decision = cfg.cuda_decision()
    with_cuda = decision.with_cuda
    archs = cfg.cuda_archs() if with_cuda else []
    key = cfg.source_hash(_CSRC, with_cuda, archs)
    cache = Path(os.environ.get("CM_KERNELS_JIT_DIR", Path.home() / ".cache" / "cm_kernels"))
    build_dir = cache / f"jit-{key}"
    build_dir.mkdir(parents=True, exist_ok=True)
    include_dirs, link_flags = [], []
    if with_cuda:
        cfg.use_toolkit(decision.toolkit)
        include_dirs = list(decision.toolkit.include_dirs)
        link_flags = [f"-L{d}" for d in cfg.link_dirs(decision.toolkit, build_dir / "cudart-link")]
    load(
        name=f"cm_kernels_jit_{key}",
        sources=[str(p) for p in cfg.sources(_CSRC, with_cuda)],
        extra_cflags=cfg.CXX_FLAGS + (["-DCM_KERNELS_WITH_CUDA=1"] if with_cuda else []),
        extra_cuda_cflags=cfg.NVCC_FLAGS + cfg.gencode_flags(archs),
        extra_include_paths=include_dirs,
        extra_ldflags=cfg.LINK_FLAGS + link_flags,
        build_directory=str(build_dir),
        with_cuda=with_cuda,
        is_python_module=False,
    )
    return ExtState(True, with_cuda, decision.reason, "jit")


def load_extension() -> ExtState:
    jit = os.environ.get("CM_KERNELS_JIT", "0") == "1"
    try:
        return _load_jit() if jit else _load_aot()
    except Exception as err:  # noqa: BLE001  any failure means: use the reference, say why once
        how = "JIT build (CM_KERNELS_JIT=1)" if jit else "compiled extension cm_kernels._C"
        reason = f"{how} unavailable ({type(err).__name__}: {err})"
        warnings.warn(
            f"cm_kernels: {reason}; using the pure-PyTorch reference implementations (slower). "
            "Build with `pip install --no-build-isolation -e packages/cm-kernels`.",
            KernelFallbackWarning,
            stacklevel=3,
        )
        return ExtState(False, False, reason, "none")

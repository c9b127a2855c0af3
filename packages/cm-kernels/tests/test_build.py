"""Build and backend checks: every .cu compiles with nvcc for sm_80 and sm_90 (so a CUDA syntax
error fails CPU-only CI), the backend report, and the build-info record."""

import concurrent.futures
import os
import subprocess
from pathlib import Path

import cm_kernels
import pytest
import torch

CSRC = Path(__file__).resolve().parents[1] / "csrc"
CU_FILES = sorted((CSRC / "cuda").glob("*.cu"))


OPS = ("pseudo_huber_fwd", "normalized_attention_fwd", "normalized_attention_qkv_fwd")


def _has_cuda_kernel(op: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"cm_kernels::{op}", "CUDA")


def test_cuda_kernels_compiled_and_linked_or_sources_compile(tmp_path):
    """A CUDA build's kernels are registered for the CUDA dispatch key (compiled and linked, no
    GPU needed to check); without one, every .cu still compiles with nvcc for sm_80 and sm_90 so a
    CUDA syntax error fails a CPU-only run."""
    from cm_kernels import _build_config as cfg

    if cm_kernels._STATE.loaded and cm_kernels._STATE.with_cuda:
        missing = [op for op in OPS if not _has_cuda_kernel(op)]
        assert not missing, f"built with CUDA but no CUDA kernel registered for {missing}"
        return
    toolkit, notes = cfg.find_toolkit()
    if toolkit is None:
        pytest.skip(f"no CUDA toolkit to compile the .cu files: {'; '.join(notes) or 'no nvcc'}")
    assert CU_FILES, f"no .cu files under {CSRC / 'cuda'}"
    includes = [f"-I{d}" for d in toolkit.include_dirs]

    def compile_one(cu: Path) -> tuple[Path, subprocess.CompletedProcess]:
        cmd = [toolkit.nvcc, "-c", str(cu), "-o", str(tmp_path / f"{cu.stem}.o"), "-std=c++17", *includes]
        cmd += cfg.NVCC_FLAGS + cfg.gencode_flags(["80", "90"])
        return cu, subprocess.run(cmd, capture_output=True, text=True)

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(compile_one, CU_FILES))
    failures = [f"{cu.name}:\n{r.stderr}" for cu, r in results if r.returncode != 0]
    assert not failures, "\n".join(failures)


def test_build_record_matches_the_binary():
    """What _build_info says was built is what the loaded extension has; a build asked for CUDA
    (CM_KERNELS_CUDA=1, as CI does) has it."""
    if not cm_kernels._STATE.loaded or cm_kernels._STATE.source != "aot":
        pytest.skip(f"no ahead-of-time build loaded: {cm_kernels._STATE.reason}")
    from cm_kernels import _build_info as info

    assert all(_has_cuda_kernel(op) == bool(info.WITH_CUDA) for op in OPS), info.CUDA_REASON
    if info.CUDA_MODE == "1" or os.environ.get("CM_KERNELS_CUDA") == "1":
        assert info.WITH_CUDA, f"CM_KERNELS_CUDA=1 but the build has no CUDA kernels: {info.CUDA_REASON}"
        assert set(info.CUDA_ARCHS) >= {"80", "90"} or os.environ.get("CM_KERNELS_CUDA_ARCHS")
    if info.WITH_CUDA:
        assert info.CUDA_HOME and info.NVCC_VERSION.split(".")[0] == torch.version.cuda.split(".")[0]


def test_cu_files_include_no_torch_headers():
    for path in list(CU_FILES) + sorted((CSRC / "cuda").glob("*.cuh")) + [CSRC / "cuda" / "launchers.h"]:
        text = path.read_text()
        for banned in ("<torch/", "<ATen/", "<c10/"):
            assert banned not in text, f"{path.name} includes {banned}"


def test_backends_report():
    report = cm_kernels.backends()
    assert set(report) == {"pseudo_huber_loss", "normalized_attention", "normalized_attention_qkv"}
    for entry in report.values():
        assert entry["backend"] in ("cpu-ext", "cuda-ext", "reference")
        assert isinstance(entry["reason"], str) and entry["reason"]
    if torch.version.cuda is None:
        assert all(e["backend"] != "cuda-ext" for e in report.values())


def test_extension_loaded_and_build_info():
    if not cm_kernels._STATE.loaded:
        pytest.skip(f"compiled extension not loaded: {cm_kernels._STATE.reason}")
    assert cm_kernels.backends()["normalized_attention"]["backend"] in ("cpu-ext", "cuda-ext")
    if cm_kernels._STATE.source == "aot":
        from cm_kernels import _build_info

        assert _build_info.TORCH_VERSION == torch.__version__
        if torch.version.cuda is None:
            assert _build_info.WITH_CUDA is False


def test_fallback_warns_once_with_reason(monkeypatch):
    import importlib
    import warnings

    from cm_kernels import _loader

    def broken():
        raise ImportError("simulated missing cm_kernels._C")

    monkeypatch.setattr(_loader, "_load_aot", broken)
    monkeypatch.delenv("CM_KERNELS_JIT", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = _loader.load_extension()
    assert not state.loaded and "simulated missing" in state.reason
    msgs = [w for w in caught if issubclass(w.category, _loader.KernelFallbackWarning)]
    assert len(msgs) == 1 and "simulated missing" in str(msgs[0].message)
    assert importlib.import_module("cm_kernels.reference")  # the fallback is importable

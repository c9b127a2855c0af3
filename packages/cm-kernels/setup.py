"""Ahead-of-time build of cm_kernels._C: CPU kernels always, CUDA kernels when torch is a CUDA
build and nvcc is installed. Flags and the CUDA decision live in src/cm_kernels/_build_config.py
(shared with the JIT loader). Install against the torch already present:

    pip install --no-build-isolation -e packages/cm-kernels

Environment: CM_KERNELS_SKIP_CUDA=1, CM_KERNELS_CUDA_ARCHS="80;90", MAX_JOBS=N (ninja jobs).
"""

import importlib.util
import shutil
from pathlib import Path

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("_build_config", ROOT / "src/cm_kernels/_build_config.py")
cfg = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cfg)


def extension():
    with_cuda, reason = cfg.cuda_decision()
    archs = cfg.cuda_archs() if with_cuda else []
    (ROOT / "src/cm_kernels/_build_info.py").write_text(cfg.build_info_text(with_cuda, reason, archs))
    srcs = [str(p.relative_to(ROOT)) for p in cfg.sources(ROOT / "csrc", with_cuda)]
    if not with_cuda:
        return CppExtension("cm_kernels._C", srcs, extra_compile_args={"cxx": cfg.CXX_FLAGS})
    return CUDAExtension(
        "cm_kernels._C",
        srcs,
        define_macros=[("CM_KERNELS_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cfg.CXX_FLAGS, "nvcc": cfg.NVCC_FLAGS + cfg.gencode_flags(archs)},
    )


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)},
)

"""Ahead-of-time build of cm_kernels._C: CPU kernels always, CUDA kernels when torch is a CUDA
build and a usable CUDA toolkit is found (see src/cm_kernels/_build_config.py, shared with the JIT
loader, for the search, the test build and the flags). Install against the torch already present:

    pip install --no-build-isolation -e packages/cm-kernels

Environment: CM_KERNELS_CUDA=auto|0|1 (1: CUDA or a failed build), CM_KERNELS_CUDA_ARCHS="80;90",
CUDA_HOME (the toolkit to use), MAX_JOBS=N (ninja jobs).
"""

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from setuptools import Extension, setup

ROOT = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("_build_config", ROOT / "src/cm_kernels/_build_config.py")
cfg = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = cfg  # dataclasses look their module up while the file executes
_spec.loader.exec_module(cfg)

# torch reads CUDA_HOME once, when cpp_extension is imported, and guesses wrong from an nvcc
# wrapper script; point it at the toolkit our search finds (cheap: no test build yet).
TOOLKIT = None
if cfg.requested_mode() != "0" and not os.environ.get("CUDA_HOME"):
    TOOLKIT, _ = cfg.find_toolkit()
    if TOOLKIT is not None:
        cfg.use_toolkit(TOOLKIT)

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def extension(decision, archs, build_temp: Path) -> Extension:
    srcs = [str(p.relative_to(ROOT)) for p in cfg.sources(ROOT / "csrc", decision.with_cuda)]
    if not decision.with_cuda:
        return CppExtension(
            "cm_kernels._C", srcs, extra_compile_args={"cxx": cfg.CXX_FLAGS}, extra_link_args=cfg.LINK_FLAGS
        )
    tk = decision.toolkit
    return CUDAExtension(
        "cm_kernels._C",
        srcs,
        include_dirs=list(tk.include_dirs),
        library_dirs=cfg.link_dirs(tk, build_temp / "cudart-link"),
        define_macros=[("CM_KERNELS_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cfg.CXX_FLAGS, "nvcc": cfg.NVCC_FLAGS + cfg.gencode_flags(archs)},
        extra_link_args=cfg.LINK_FLAGS,
    )


_EXTENSION_FIELDS = (
    "sources",
    "include_dirs",
    "define_macros",
    "library_dirs",
    "libraries",
    "runtime_library_dirs",
    "extra_compile_args",
    "extra_link_args",
    "language",
)


class BuildExt(BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)):
    """Decides CPU or CPU+CUDA once, at build time (after a test build of the toolkit), builds,
    and only then records what was built in cm_kernels/_build_info.py."""

    def run(self):
        build_temp = Path(self.build_temp).resolve()
        # CudaBuildError here when CM_KERNELS_CUDA=1 and no toolkit passes the test build.
        decision = cfg.cuda_decision(probe_dir=build_temp / "cuda-probe", toolkit=TOOLKIT)
        print(f"[cm-kernels] {decision.reason}", flush=True)
        if decision.with_cuda:
            cfg.use_toolkit(decision.toolkit)
        archs = cfg.cuda_archs() if decision.with_cuda else []
        # Fill the placeholder in place: setuptools prepared it in finalize_options (stub and
        # output-name bookkeeping), which a fresh Extension object would lack.
        built, placeholder = extension(decision, archs, build_temp), self.extensions[0]
        for attr in _EXTENSION_FIELDS:
            setattr(placeholder, attr, getattr(built, attr))
        super().run()
        info = cfg.build_info_text(decision, archs)
        if self.inplace or getattr(self, "editable_mode", False):  # editable installs import src/
            cfg.write_atomic(ROOT / "src/cm_kernels/_build_info.py", info)
        else:  # a wheel: build_py has copied src/ into build_lib already
            cfg.write_atomic(Path(self.build_lib) / "cm_kernels" / "_build_info.py", info)


setup(
    # A placeholder with the final name; BuildExt.run replaces it once the CUDA decision is made.
    ext_modules=[Extension("cm_kernels._C", sources=["csrc/ops.cpp"])],
    cmdclass={"build_ext": BuildExt},
)

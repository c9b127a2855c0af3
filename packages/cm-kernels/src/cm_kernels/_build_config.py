"""Build flags, the CUDA toolkit search and the CUDA decision, shared by setup.py (ahead-of-time
build, the default) and the JIT loader (CM_KERNELS_JIT=1). Imports only torch and the standard
library; setup.py loads this file by path. ``python _build_config.py`` prints what a build would do.

Environment:
  CM_KERNELS_CUDA        "auto" (default): CUDA kernels when torch is a CUDA build and a usable
                         toolkit is found, else the CPU kernels, saying why; "1": CUDA kernels or a
                         failed build (CI uses this); "0": CPU kernels only.
  CM_KERNELS_SKIP_CUDA=1 the older spelling of CM_KERNELS_CUDA=0.
  CM_KERNELS_CUDA_ARCHS  "80;90" (default): the SM architectures compiled.
  CUDA_HOME / CUDA_PATH  the toolkit to use; when set, no other is searched.

Why a search of our own: torch guesses CUDA_HOME as the folder above the first `nvcc` on PATH,
which is wrong when that nvcc is a wrapper script (e.g. /usr/local/bin/nvcc → /usr/local, where no
CUDA headers are). We ask nvcc where its toolkit is, try the usual install folders, and take the
headers and cudart that ship in torch's own `nvidia-*` wheels when a toolkit lacks them. Before the
build commits to CUDA, a probe compiles and links a one-kernel library with the chosen toolkit, so
a build is either whole (CPU + CUDA) or CPU-only with the reason, never half.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

# -O3 for kernels; no -march=native: the binary must not depend on the build machine (the CPU
# kernels pick AVX-512, AVX2 or the baseline at run time, csrc/cpu/isa.cpp). -fopenmp: at::parallel_for
# is a header template that runs serially unless the extension itself is compiled with OpenMP;
# the link resolves libgomp.so.1 to the copy torch already loaded (one thread pool, not two).
CXX_FLAGS = ["-O3", "-fvisibility=hidden", "-fopenmp"]
LINK_FLAGS = ["-fopenmp"]
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
DEFAULT_CUDA_ARCHS = "80;90"
MODES = ("auto", "0", "1")


class CudaBuildError(RuntimeError):
    """CM_KERNELS_CUDA=1 asked for the CUDA kernels and they cannot be built here."""


@dataclasses.dataclass(frozen=True)
class Toolkit:
    """A CUDA toolkit usable for the build: CUDA_HOME for torch, plus what it lacks."""

    home: str  # given to torch as CUDA_HOME (bin/nvcc lives here)
    nvcc: str
    version: str  # "13.0", from `nvcc --version`
    include_dirs: tuple[str, ...] = ()  # extra -I (CUDA headers from the nvidia wheels)
    cudart_dir: str = ""  # extra -L holding libcudart.so when the toolkit has none
    found_by: str = ""  # how it was found, for the build record


@dataclasses.dataclass(frozen=True)
class Decision:
    with_cuda: bool
    reason: str  # one line: what is built and why
    mode: str  # CM_KERNELS_CUDA as read: auto | 0 | 1
    toolkit: Toolkit | None = None


def requested_mode() -> str:
    """CM_KERNELS_CUDA (auto | 0 | 1); CM_KERNELS_SKIP_CUDA=1 means 0."""
    raw = os.environ.get("CM_KERNELS_CUDA", "").strip().lower()
    if not raw:
        return "0" if os.environ.get("CM_KERNELS_SKIP_CUDA", "0") == "1" else "auto"
    aliases = {"true": "1", "yes": "1", "on": "1", "false": "0", "no": "0", "off": "0"}
    mode = aliases.get(raw, raw)
    if mode not in MODES:
        raise ValueError(f"CM_KERNELS_CUDA must be auto, 0 or 1, got {raw!r}")
    return mode


def cuda_archs() -> list[str]:
    raw = os.environ.get("CM_KERNELS_CUDA_ARCHS", DEFAULT_CUDA_ARCHS)
    archs = [a.strip().replace(".", "") for a in raw.replace(",", ";").split(";") if a.strip()]
    if not archs or not all(a.isdigit() for a in archs):
        raise ValueError(f"CM_KERNELS_CUDA_ARCHS must look like '80;90', got {raw!r}")
    return archs


def gencode_flags(archs: list[str]) -> list[str]:
    return [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]


# --------------------------------------------------------------------------------------------
# Finding a toolkit


def _run(cmd: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _nvcc_version(nvcc: str) -> str | None:
    try:
        out = _run([nvcc, "--version"], timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def _nvcc_top(nvcc: str) -> str | None:
    """The toolkit folder nvcc itself uses (its `TOP`), which sees through wrapper scripts."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "t.cu"
        src.write_text("int main() { return 0; }\n")
        try:
            out = _run([nvcc, "--dryrun", "-c", str(src), "-o", str(Path(tmp) / "t.o")], timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
    m = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    return os.path.realpath(m.group(1).strip()) if m else None


def _nvidia_wheel_dirs() -> list[Path]:
    """The folders of torch's `nvidia-*` wheels (nvidia/cu13, nvidia/cuda_runtime, …)."""
    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        return []
    roots = list(spec.submodule_search_locations or []) if spec else []
    return sorted(p for root in roots for p in Path(root).iterdir() if p.is_dir())


def _has_headers(folder: Path) -> bool:
    return (folder / "cuda_runtime_api.h").is_file()


def _headers_for(home: Path) -> tuple[str, ...] | None:
    """Extra include dirs needed for cuda_runtime_api.h: () if the toolkit has them, a wheel's
    include dir if only a wheel has them, None if nothing does."""
    if _has_headers(home / "include") or any(_has_headers(Path(p)) for p in glob.glob(str(home / "targets/*/include"))):
        return ()
    for wheel in _nvidia_wheel_dirs():
        if _has_headers(wheel / "include"):
            return (str(wheel / "include"),)
    return None


def _cudart_for(home: Path) -> str | None:
    """"" if the toolkit links -lcudart by itself, else a folder holding a libcudart (possibly
    only a versioned libcudart.so.N from a wheel, linked through a shim), None if none exists."""
    lib_dirs = [home / "lib64", home / "lib", *map(Path, glob.glob(str(home / "targets/*/lib")))]
    if any((d / "libcudart.so").exists() for d in lib_dirs):
        return ""
    for wheel in _nvidia_wheel_dirs():
        libs = sorted((wheel / "lib").glob("libcudart.so*"))
        if libs:
            return str(libs[0].parent)
    return None


def _candidates() -> list[tuple[str, str]]:
    """(nvcc path, how it was found), in order of preference."""
    explicit = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if explicit:
        var = "CUDA_HOME" if os.environ.get("CUDA_HOME") else "CUDA_PATH"
        return [(str(Path(explicit) / "bin" / "nvcc"), f"{var}={explicit}")]
    found = []
    on_path = shutil.which("nvcc")
    if on_path:
        top = _nvcc_top(on_path)
        if top:
            found.append((str(Path(top) / "bin" / "nvcc"), f"the toolkit of {on_path} (nvcc --dryrun TOP={top})"))
        found.append((os.path.realpath(on_path), f"nvcc on PATH ({on_path})"))
    if torch.version.cuda:
        found.append((f"/usr/local/cuda-{torch.version.cuda}/bin/nvcc", "the default install folder"))
    found.append(("/usr/local/cuda/bin/nvcc", "the default install folder"))
    for wheel in _nvidia_wheel_dirs():
        found.append((str(wheel / "bin" / "nvcc"), f"the {wheel.name} wheel"))
    seen, unique = set(), []
    for nvcc, how in found:
        key = os.path.realpath(nvcc)
        if key not in seen:
            seen.add(key)
            unique.append((nvcc, how))
    return unique


def find_toolkit() -> tuple[Toolkit | None, list[str]]:
    """The first usable CUDA toolkit for torch's CUDA version, and why each other candidate was not."""
    notes: list[str] = []
    want = torch.version.cuda
    for nvcc, how in _candidates():
        if not os.access(nvcc, os.X_OK):
            notes.append(f"{how}: no nvcc at {nvcc}")
            continue
        version = _nvcc_version(nvcc)
        if version is None:
            notes.append(f"{how}: {nvcc} --version did not say its release")
            continue
        if want and version.split(".")[0] != want.split(".")[0]:
            notes.append(f"{how}: nvcc {version} cannot build for torch's CUDA {want} (major versions differ)")
            continue
        home = Path(nvcc).parent.parent
        includes = _headers_for(home)
        if includes is None:
            notes.append(f"{how}: no cuda_runtime_api.h in {home}/include nor in an nvidia wheel")
            continue
        cudart = _cudart_for(home)
        if cudart is None:
            notes.append(f"{how}: no libcudart in {home}/lib64, {home}/lib nor in an nvidia wheel")
            continue
        return Toolkit(str(home), nvcc, version, includes, cudart, how), notes
    return None, notes


def link_dirs(toolkit: Toolkit, shim_dir: Path) -> list[str]:
    """Extra -L folders for -lcudart. A wheel ships only libcudart.so.N: link through a folder
    with a libcudart.so symlink to it (the loaded torch provides the same soname at run time)."""
    if not toolkit.cudart_dir:
        return []
    src = Path(toolkit.cudart_dir)
    if (src / "libcudart.so").exists():
        return [str(src)]
    target = sorted(src.glob("libcudart.so.*"))[0]
    shim_dir.mkdir(parents=True, exist_ok=True)
    link = shim_dir / "libcudart.so"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target)
    return [str(shim_dir)]


def use_toolkit(toolkit: Toolkit) -> None:
    """Point torch's extension builder at ``toolkit`` (it reads CUDA_HOME once, at import)."""
    os.environ["CUDA_HOME"] = toolkit.home
    cpp_extension = sys.modules.get("torch.utils.cpp_extension")
    if cpp_extension is not None:
        cpp_extension.CUDA_HOME = toolkit.home


_PROBE_CU = """#include <cuda_runtime.h>
__global__ void cm_probe_kernel(float* x) { x[threadIdx.x] *= 2.0f; }
extern "C" int cm_probe_launch(float* x) { cm_probe_kernel<<<1, 32>>>(x); return (int)cudaGetLastError(); }
"""
_PROBE_CPP = """#include <cuda_runtime_api.h>
extern "C" int cm_probe_launch(float* x);
extern "C" int cm_probe_count() { int n = 0; return (int)cudaGetDeviceCount(&n) + n + cm_probe_launch(nullptr) * 0; }
"""


def probe(toolkit: Toolkit, archs: list[str], workdir: Path) -> str | None:
    """Compile a one-kernel .cu for ``archs`` with the toolkit's nvcc, a host file against its
    headers, and link them with -lcudart into a shared library: None if that works, else the
    first error. Catches a toolkit that is found but unusable before the real build starts."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "probe.cu").write_text(_PROBE_CU)
    (workdir / "probe.cpp").write_text(_PROBE_CPP)
    inc = [f"-I{d}" for d in (str(Path(toolkit.home) / "include"), *toolkit.include_dirs)]
    cxx = os.environ.get("CXX", "c++")
    steps = [
        [toolkit.nvcc, "-c", "probe.cu", "-o", "probe_cu.o", "-Xcompiler", "-fPIC", *inc, *gencode_flags(archs)],
        [cxx, "-c", "probe.cpp", "-o", "probe_cpp.o", "-fPIC", *inc],
        [cxx, "-shared", "probe_cu.o", "probe_cpp.o", "-o", "probe.so"]
        + [f"-L{d}" for d in [str(Path(toolkit.home) / s) for s in ("lib64", "lib")]]
        + [f"-L{d}" for d in link_dirs(toolkit, workdir / "cudart-link")]
        + ["-lcudart"],
    ]
    for cmd in steps:
        try:
            r = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.SubprocessError) as err:
            return f"`{Path(cmd[0]).name}` failed to run: {err}"
        if r.returncode != 0:
            lines = [ln.strip() for ln in (r.stderr + r.stdout).splitlines() if ln.strip()]
            first = next((ln for ln in lines if "error" in ln.lower()), lines[0] if lines else "no output")
            return f"`{Path(cmd[0]).name} {' '.join(cmd[1:3])}` failed: {first}"
    return None


def cuda_decision(*, probe_dir: Path | None = None, toolkit: Toolkit | None = None) -> Decision:
    """Whether to compile the CUDA kernels, and why. Decided by CM_KERNELS_CUDA, by what torch was
    built with and by a usable toolkit — never by torch.cuda.is_available(): build hosts often have
    no GPU. With ``probe_dir`` the chosen toolkit must also pass :func:`probe`. Raises
    :class:`CudaBuildError` when CM_KERNELS_CUDA=1 and the CUDA kernels cannot be built.
    ``toolkit``: one :func:`find_toolkit` already returned (it is searched for otherwise)."""
    mode = requested_mode()
    if mode == "0":
        why = "CM_KERNELS_SKIP_CUDA=1" if not os.environ.get("CM_KERNELS_CUDA") else "CM_KERNELS_CUDA=0"
        return Decision(False, f"CUDA kernels not built: {why}", mode)
    if torch.version.cuda is None:
        reason = f"CUDA kernels not built: torch {torch.__version__} is a CPU build"
        toolkit = None
    else:
        notes: list[str] = []
        if toolkit is None:
            toolkit, notes = find_toolkit()
        if toolkit is None:
            tried = "; ".join(notes) or "no nvcc anywhere"
            reason = f"CUDA kernels not built: no usable CUDA {torch.version.cuda} toolkit ({tried})"
        else:
            archs = cuda_archs()
            error = probe(toolkit, archs, probe_dir) if probe_dir is not None else None
            if error is None:
                reason = (
                    f"CUDA kernels built for sm_{', sm_'.join(archs)} with nvcc {toolkit.version} from "
                    f"{toolkit.home} ({toolkit.found_by}), torch CUDA {torch.version.cuda}"
                )
                return Decision(True, reason, mode, toolkit)
            reason = f"CUDA kernels not built: the toolkit at {toolkit.home} failed a test build: {error}"
    if mode == "1":
        raise CudaBuildError(
            f"CM_KERNELS_CUDA=1 but {reason.removeprefix('CUDA kernels not built: ')}. "
            "Install a CUDA toolkit matching torch (or set CUDA_HOME to one), or unset CM_KERNELS_CUDA "
            "to build the CPU kernels only."
        )
    return Decision(False, reason, mode)


# --------------------------------------------------------------------------------------------
# Sources and the build record


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
    h.update(repr((CXX_FLAGS, LINK_FLAGS, NVCC_FLAGS, with_cuda, archs, torch.__version__)).encode())
    return h.hexdigest()[:16]


def build_info_text(decision: Decision, archs: list[str]) -> str:
    tk = decision.toolkit if decision.with_cuda else None
    return (
        '"""Generated at build time; records what cm_kernels._C was built with. Do not edit."""\n\n'
        f"TORCH_VERSION = {torch.__version__!r}\n"
        f"TORCH_CUDA_VERSION = {torch.version.cuda!r}\n"
        f"WITH_CUDA = {decision.with_cuda!r}\n"
        f"CUDA_ARCHS = {tuple(archs) if decision.with_cuda else ()!r}\n"
        f"CUDA_REASON = {decision.reason!r}\n"
        f"CUDA_MODE = {decision.mode!r}\n"
        f"CUDA_HOME = {tk.home if tk else None!r}\n"
        f"NVCC_VERSION = {tk.version if tk else None!r}\n"
    )


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder (fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


if __name__ == "__main__":  # what would a build do here? (CudaBuildError when CM_KERNELS_CUDA=1 cannot)
    with tempfile.TemporaryDirectory() as tmp:
        print(cuda_decision(probe_dir=Path(tmp)).reason)

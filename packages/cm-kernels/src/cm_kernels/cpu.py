"""CPU-side facts and settings: which instruction set the CPU kernels run, and the allocator
setting that keeps large tensors from page-faulting on every training step.

``cpu_isa()``            "avx512" | "avx2" | "base": the vectorized kernels chosen at run time
                         (``CM_KERNELS_ISA`` in the environment picks another one the CPU has).
``set_cpu_isa(name)``    switch ("auto" for the default); for tests and benchmarks.
``tune_cpu_allocator()`` keep freed large blocks mapped (glibc ``mallopt``), see its docstring.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

import torch

__all__ = ["cpu_isa", "set_cpu_isa", "tune_cpu_allocator"]

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's upper limit for M_MMAP_THRESHOLD on 64-bit
TRIM_THRESHOLD_BYTES = 1 << 30

_tuned: dict | None = None
_isa: str | None = None  # cpu_isa(), cached (set_cpu_isa updates it)


def _loaded() -> bool:
    from . import _STATE

    return _STATE.loaded


def cpu_isa() -> str:
    """The instruction set of the CPU kernels in use ("avx512", "avx2", "base"), or "reference"
    when the compiled extension is not loaded."""
    global _isa
    if _isa is None:
        _isa = str(torch.ops.cm_kernels.cpu_isa()) if _loaded() else "reference"
    return _isa


def set_cpu_isa(name: str) -> str:
    """Run the CPU kernels with ``name`` ("avx512" | "avx2" | "base" | "auto"); returns the set in
    effect. ValueError when this CPU cannot run it."""
    global _isa
    if not _loaded():
        raise RuntimeError("cm_kernels: the compiled extension is not loaded; there is no CPU ISA to set")
    _isa = None  # also when the switch fails: ask the extension again
    _isa = str(torch.ops.cm_kernels.set_cpu_isa(name))
    return _isa


def tune_cpu_allocator() -> dict:
    """Make glibc's malloc serve blocks up to 32 MiB from its heap and keep up to 1 GiB of freed
    memory mapped, instead of mapping every large block fresh and unmapping it on free.

    Why: torch's CPU allocator asks malloc for each tensor; with glibc's defaults a block above
    its mmap threshold is a new mapping, so the first write to every 4 KiB page of it faults.
    A training step allocates its activations and gradients anew each step, and on a 2-core
    machine of ours first-writing a fresh 12.6 MB gradient took 5 ms of page faults against
    0.8 ms for the kernel that computes it (bench/RESULTS.md). Numerics are unchanged; the
    process keeps freed memory for reuse. Process-wide; cm-train calls it for CPU runs, the
    kernel benchmarks too. Returns what was done: {"applied": bool, "reason": str, ...}.
    Idempotent; a no-op (applied False) off glibc."""
    global _tuned
    if _tuned is not None:
        return dict(_tuned)
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        _tuned = {"applied": False, "reason": f"not glibc ({platform.system()} {platform.libc_ver()[0] or '?'})"}
        return dict(_tuned)
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
        )
    except (OSError, AttributeError) as err:
        _tuned = {"applied": False, "reason": f"mallopt unavailable: {err}"}
        return dict(_tuned)
    _tuned = {
        "applied": ok,
        "reason": "glibc mallopt: blocks <= 32 MiB from the heap, up to 1 GiB of freed memory kept"
        if ok
        else "glibc mallopt refused the setting",
        "mmap_threshold": MMAP_THRESHOLD_BYTES,
        "trim_threshold": TRIM_THRESHOLD_BYTES,
    }
    return dict(_tuned)

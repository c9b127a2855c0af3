"""Timing helpers shared by the tools/bench scripts (they run as files, so they import this by name).

``median_ms`` times callables round-robin: on a shared machine background load then hits every
implementation alike and the ratios stay meaningful. On CUDA it times with CUDA events (GPU time,
not launch time) and can flush the L2 cache before every timed run, so a kernel that re-reads an
input it just wrote is not credited with cache bandwidth.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable, Hashable
from pathlib import Path

import torch

L2_FLUSH_BYTES = 256 * 2**20  # larger than the L2 of any current GPU (H100/H200: 50 MiB, B200: 126 MiB)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class L2Flush:
    """Writes a buffer of ``max(256 MiB, 2 × L2)`` bytes: afterwards no input of the timed call is in L2."""

    def __init__(self, device) -> None:
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
        self.buffer = torch.empty(max(L2_FLUSH_BYTES, 2 * l2), dtype=torch.uint8, device=device)

    def __call__(self) -> None:
        self.buffer.zero_()


def median_ms(
    fns: dict[Hashable, Callable[[], object]],
    device,
    warmup: int,
    repeat: int,
    *,
    flush_l2: bool = False,
    deadline: float | None = None,
) -> dict[Hashable, float]:
    """Median time (ms) per callable over ``repeat`` interleaved runs after ``warmup`` runs each.

    ``deadline`` (a ``time.monotonic()`` value) ends warm-up and timing early, after at least one
    warm-up and one timed run per callable; the medians are over the runs made. ``flush_l2``
    (CUDA only) flushes L2 before each timed run, outside the timed interval."""
    cuda = torch.device(device).type == "cuda"
    flush = L2Flush(device) if cuda and flush_l2 else None

    def late() -> bool:
        return deadline is not None and time.monotonic() > deadline

    for i in range(warmup):
        for fn in fns.values():
            fn()
        sync(device)
        if late():
            break
    times: dict[Hashable, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        events = {}
        for name, fn in fns.items():
            if flush is not None:
                flush()
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                events[name] = (start, end)
            else:
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1e3)
        sync(device)
        for name, (start, end) in events.items():
            times[name].append(start.elapsed_time(end))
        if late():
            break
    return {name: statistics.median(t) for name, t in times.items()}


def forward_only(fn, inputs) -> Callable[[], None]:
    def run():
        with torch.no_grad():
            fn(*inputs)

    return run


def forward_backward(fn, inputs, grad_inputs) -> Callable[[], None]:
    """fn(*inputs), then backward with an all-ones output gradient into ``grad_inputs``."""

    def run():
        for x in grad_inputs:
            x.grad = None
        out = fn(*inputs)
        out.backward(torch.ones_like(out))

    return run


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> float:
    """The 1-minute load average (nan where the system has none)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def kernel_machine(script: str, argv, cores: int, load_start: float, load_end: float, **extra) -> dict:
    """The "machine" record of a cm-kernels benchmark's JSON: CPU, cores, date, load at start and end,
    torch and cm-kernels versions, the ISA in use and the command line (``script`` plus ``argv``)."""
    import sys

    import cm_kernels
    from cm_kernels import _build_info

    return {
        "cpu": cpu_name(),
        "cores": cores,
        "date": datetime.date.today().isoformat(),
        "load_start": load_start,
        "load_end": load_end,
        "torch": torch.__version__,
        "cm_kernels": f"{cm_kernels.__version__} ({getattr(_build_info, 'CUDA_REASON', '')})",
        "cpu_isa": cm_kernels.cpu_isa(),
        **extra,
        "command": f"python tools/bench/{script} " + " ".join(argv if argv is not None else sys.argv[1:]),
    }

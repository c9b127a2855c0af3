"""How many CPU threads a run uses: ``run.threads``, or a choice from the cores this process may
use, the ranks that share them and what else is running.

torch's default is one thread per physical core. On a machine where another process already
keeps a core busy, two OpenMP threads on two cores wait on each other at every parallel region:
digits.toml trained 5× slower with 2 threads than with 1 on a loaded 2-core machine (0.8 vs 4.2
it/s). The choice here counts the cores the scheduler lets this process run on
(``os.sched_getaffinity``: cgroups/taskset/SLURM's binding), divides them among the ranks on this
node, and leaves out the cores the 1-minute load average says are busy.

One thread gives bit-identical CPU results from run to run (and so a bit-exact resume); with
several, some kernels sum in a thread-dependent order.
"""

from __future__ import annotations

import math
import os

__all__ = ["available_cores", "local_ranks", "choose_threads"]


def available_cores() -> int:
    """Cores this process may run on (its affinity mask), else the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def local_ranks() -> int:
    """Processes of this run on this node, from the launcher's environment (1 when launched alone)."""
    for key in ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(key, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    tasks = os.environ.get("SLURM_TASKS_PER_NODE", "")  # e.g. "4(x2)" or "4,3"
    head = tasks.split("(")[0].split(",")[0]
    return int(head) if head.isdigit() and int(head) > 0 else 1


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def choose_threads(
    requested: int = 0, *, ranks: int | None = None, cores: int | None = None, load: float | None = -1.0
) -> tuple[int, str]:
    """(threads, why). ``requested`` > 0 is used as given; 0 chooses.

    The choice: OMP_NUM_THREADS when set (the usual way a cluster script pins threads); else the
    node's available cores shared by its ranks, less the cores the 1-minute load average says
    other processes keep busy (rounded to the nearest core), and at least one.
    """
    if requested > 0:
        return requested, f"run.threads = {requested}"
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:
        return int(omp), f"OMP_NUM_THREADS = {omp}"
    cores = available_cores() if cores is None else cores
    ranks = local_ranks() if ranks is None else max(1, ranks)
    load = _load() if load == -1.0 else load
    share = max(1, cores // ranks)
    where = f"{cores} core{'s' if cores != 1 else ''} available" + (f" to {ranks} ranks" if ranks > 1 else "")
    if load is None:
        return share, f"{where}; no load average on this system"
    free = max(0.0, cores - load)
    threads = max(1, min(share, math.floor(free / ranks + 0.5)))
    why = f"{where}, 1-minute load {load:.1f}"
    if threads < share:
        why += f"; busy cores left out (run.threads = {share} or cm --threads {share} uses them all)"
    return threads, why

"""One bootstrap for every launcher: mpiexec (mpi4py), torchrun, SLURM srun, or a single process.

It reads the launcher's environment (the only place in cm-train that does), then initializes
``torch.distributed`` (NCCL on GPUs, gloo on CPUs). Everything after it is the same code for
1 rank or 1,000.
"""

from __future__ import annotations

import datetime
import os
import re
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = [
    "DistInfo",
    "detect_launcher",
    "init",
    "shutdown",
    "all_reduce_mean_",
    "all_finite",
    "barrier",
    "broadcast_",
    "mean_scalar",
]


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    launcher: str = "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM nodelist such as ``gpu[012-015,020],cpu7`` → ``gpu012``."""
    m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist)
    if not m:
        return nodelist
    prefix, _, ranges = m.groups()
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def _mpi_env() -> bool:
    return any(k in os.environ for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS"))


def detect_launcher() -> str:
    """``torchrun`` | ``slurm`` | ``mpi`` | ``single`` from the environment."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return "torchrun"
    if "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return "slurm"
    if _mpi_env():
        return "mpi"
    return "single"


def _rendezvous() -> tuple[str, int, int, int, int]:
    """(launcher, rank, world, local_rank) plus the master address/port, per launcher."""
    launcher = detect_launcher()
    if launcher == "torchrun":
        return (
            launcher,
            int(os.environ["RANK"]),
            int(os.environ["WORLD_SIZE"]),
            int(os.environ.get("LOCAL_RANK", 0)),
            None,
        )
    if launcher == "slurm":
        rank, world = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
        local = int(os.environ.get("SLURM_LOCALID", 0))
        addr = os.environ.get("MASTER_ADDR") or _first_slurm_host(os.environ.get("SLURM_NODELIST", "127.0.0.1"))
        # A port every rank can compute without talking: derived from the job id.
        port = int(os.environ.get("MASTER_PORT", 20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000))
        return launcher, rank, world, local, (addr, port)
    if launcher == "mpi":
        try:
            from mpi4py import MPI
        except ImportError:
            raise RuntimeError(
                "launched under MPI but mpi4py is missing: `pip install mpi4py mpich` (or cm-train[mpi])"
            ) from None
        comm = MPI.COMM_WORLD
        rank, world = comm.Get_rank(), comm.Get_size()
        local = comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
        # Rank 0 picks the rendezvous address and a free port and tells everyone.
        addr_port = None
        if rank == 0:
            addr = os.environ.get("MASTER_ADDR") or socket.gethostbyname(socket.gethostname())
            addr_port = (addr, int(os.environ.get("MASTER_PORT", _free_port())))
        addr_port = comm.bcast(addr_port, root=0)
        return launcher, rank, world, local, addr_port
    return "single", 0, 1, 0, None


def init(device: str = "auto", timeout_s: int = 1800) -> DistInfo:
    """Initialize the process group (when there is more than one rank) and pick the device."""
    launcher, rank, world, local, addr_port = _rendezvous()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("run.device = 'cuda' but torch sees no CUDA GPU; use run.device = 'cpu' or 'auto'")
        torch.cuda.set_device(local % torch.cuda.device_count())
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    info = DistInfo(rank, world, local, dev, launcher)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = dict(backend=backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
        if addr_port is not None:
            kwargs["init_method"] = f"tcp://{addr_port[0]}:{addr_port[1]}"
        dist.init_process_group(**kwargs)  # torchrun: env:// from MASTER_ADDR/MASTER_PORT
    return info


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean_(tensors: list[torch.Tensor]) -> None:
    """Average tensors across ranks in place, in flat buckets (no-op on one rank)."""
    if not dist.is_initialized() or dist.get_world_size() == 1 or not tensors:
        return
    world = dist.get_world_size()
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= world
        offset = 0
        for t in group:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def all_finite(flag: bool, device: torch.device) -> bool:
    """True only when ``flag`` holds on every rank (a collective: every rank must call it)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1 if flag else 0], device=device, dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def broadcast_(tensors: list[torch.Tensor], src: int = 0) -> None:
    """Copy rank ``src``'s values into every rank's tensors (no-op on one rank)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    with torch.no_grad():
        for t in tensors:
            dist.broadcast(t.data, src)


def mean_scalar(value: float, device: torch.device) -> float:
    """The mean of a per-rank number over all ranks (a collective when distributed)."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], device=device, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.item() / dist.get_world_size()

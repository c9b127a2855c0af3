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
    "GradSync",
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


class GradSync:
    """Averages gradients over ranks while the backward pass still runs.

    Parameters are grouped, in reverse order of registration (about the order backward finishes
    them), into flat buckets of ≤ ``bucket_mb`` MB of one dtype. During the backward pass of a step's
    last micro-batch (:meth:`arm`), a hook on each parameter counts its accumulated gradient in; when
    a bucket is complete its all-reduce starts asynchronously, overlapping the rest of backward.
    :meth:`finish` reduces what the hooks did not launch (parameters without a gradient this step,
    or a single-rank run: nothing), waits, and writes the averages back — the same values as one
    all-reduce of every gradient. A no-op on one rank.
    """

    def __init__(self, params: list[torch.Tensor], bucket_mb: float = 25.0):
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.armed = False
        self.buckets: list[list[torch.Tensor]] = []
        self._pending: list[int] = []
        self._work: list[tuple[list[torch.Tensor], torch.Tensor, object]] = []
        self._launched: set[int] = set()
        self.overlapped = 0  # buckets of the last step whose all-reduce started during backward
        if self.world == 1:
            return
        limit, size = bucket_mb * 2**20, 0.0
        current: list[torch.Tensor] = []
        for p in reversed(params):
            nbytes = p.numel() * p.element_size()
            if current and (size + nbytes > limit or p.dtype != current[0].dtype):
                self.buckets.append(current)
                current, size = [], 0.0
            current.append(p)
            size += nbytes
        if current:
            self.buckets.append(current)
        self._bucket_of = {id(p): i for i, bucket in enumerate(self.buckets) for p in bucket}
        for p in params:
            p.register_post_accumulate_grad_hook(self._ready)

    def arm(self) -> None:
        """The next backward pass completes this step's gradients: reduce buckets as they fill."""
        if self.world > 1:
            self.armed, self.overlapped = True, 0
            self._pending = [len(b) for b in self.buckets]

    def _ready(self, p: torch.Tensor) -> None:
        if not self.armed:
            return
        i = self._bucket_of[id(p)]
        self._pending[i] -= 1
        if self._pending[i] == 0:
            self._launch(i)
            self.overlapped += 1

    def _launch(self, i: int) -> None:
        grads = [p.grad for p in self.buckets[i] if p.grad is not None]
        if grads:
            flat = torch.cat([g.reshape(-1) for g in grads])
            self._work.append((grads, flat, dist.all_reduce(flat, op=dist.ReduceOp.SUM, async_op=True)))
        self._launched.add(i)

    def finish(self) -> None:
        """Reduce the rest, wait for every bucket, write the rank averages into the gradients."""
        if self.world == 1:
            return
        for i in range(len(self.buckets)):
            if i not in self._launched:
                self._launch(i)
        for grads, flat, work in self._work:
            work.wait()
            flat /= self.world
            offset = 0
            for g in grads:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
        self.armed, self._work, self._launched = False, [], set()


def broadcast_(tensors: list[torch.Tensor], src: int = 0) -> None:
    """Copy rank ``src``'s values into every rank's tensors (no-op on one rank)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    with torch.no_grad():
        for t in tensors:
            dist.broadcast(t.data, src)


def max_scalar(value: float, device: torch.device) -> float:
    """The largest per-rank number over all ranks (a collective when distributed)."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], device=device, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def mean_scalar(value: float, device: torch.device) -> float:
    """The mean of a per-rank number over all ranks (a collective when distributed)."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], device=device, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.item() / dist.get_world_size()

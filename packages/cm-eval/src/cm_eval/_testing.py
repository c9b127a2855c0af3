"""Helpers shared by the tests and the benchmark (importable by spawned processes)."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import torch
from cm_core import GaussianMixture


class GaussianImages:
    """Exact consistency / BCM function of N(m, s²I) over images of ``shape`` (picklable).

    One Gaussian component has the closed-form PF-ODE map (cm_core.GaussianMixture.flow), which
    acts pixel by pixel: outputs do not depend on the batch, so it isolates the sampler's
    randomness in determinism tests.
    """

    def __init__(self, shape=(1, 8, 8), std: float = 0.2, seed: int = 0):
        self.shape = tuple(shape)
        g = torch.Generator().manual_seed(seed)
        mean = 0.8 * torch.tanh(torch.randn(self.shape, generator=g, dtype=torch.float64))
        self.mixture = GaussianMixture(mean.reshape(1, -1), [std])

    def __call__(self, x, sigma, sigma_end=0.002, **cond):
        flat = self.mixture.flow(x.reshape(len(x), -1), sigma, sigma_end)
        return flat.reshape(x.shape).to(x.dtype)

    def denoise(self, x, sigma, **cond):
        return self.mixture.denoise(x.reshape(len(x), -1), sigma).reshape(x.shape).to(x.dtype)


def stats_features(n: int = 101, d: int = 6) -> np.ndarray:
    """A fixed feature matrix for the distributed statistics test."""
    return np.random.default_rng(0).standard_normal((n, d)) * np.arange(1, d + 1) + 50.0


def _generate_worker(rank: int, world: int, init_file: str, runs: list, stats_out) -> None:
    import torch.distributed as dist

    from .sampling import generate
    from .stats import FeatureStats

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for kwargs in runs:
            generate(GaussianImages(kwargs["shape"]), **kwargs)
        if stats_out is not None:  # each rank holds an uneven share of the rows; merge over ranks
            x = stats_features()
            share = x[:30] if rank == 0 else x[30 + (rank - 1) :: world - 1]
            stats = FeatureStats(x.shape[1]).update(share).all_reduce()
            if rank == world - 1:
                stats.save(stats_out)
    finally:
        dist.destroy_process_group()


def spawn_generate(world: int, runs: list[dict], stats_out=None) -> None:
    """For each kwargs dict in ``runs``: cm_eval.generate(GaussianImages(shape), **kwargs) on
    ``world`` gloo ranks (local processes, one process group for all runs). With ``stats_out``,
    the ranks then merge FeatureStats of shares of :func:`stats_features` and save the result."""
    import torch.multiprocessing as mp

    fd, init_file = tempfile.mkstemp(prefix="cm_eval_gloo_")
    os.close(fd)
    os.unlink(init_file)  # the file store creates it
    try:
        mp.spawn(
            _generate_worker,
            args=(world, init_file, runs, None if stats_out is None else str(stats_out)),
            nprocs=world,
            join=True,
        )
    finally:
        if os.path.exists(init_file):
            os.unlink(init_file)

"""The CPU thread choice (cm_train.threads) and that a run applies and reports it."""

import pytest
import torch

import cm_train
from cm_train import threads


@pytest.fixture
def no_omp(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)


def test_requested_count_is_used_as_given(no_omp):
    assert threads.choose_threads(3, cores=2, load=5.0) == (3, "run.threads = 3")


def test_omp_num_threads_wins_over_the_choice(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert threads.choose_threads(0, cores=2, load=0.0)[0] == 4


@pytest.mark.parametrize(
    "cores, ranks, load, want",
    [
        (2, 1, 0.0, 2),  # idle: every core
        (2, 1, 1.0, 1),  # another process keeps one core busy: the loaded-machine case of the issue
        (2, 1, 1.4, 1),
        (2, 1, 0.4, 2),  # a light load rounds away
        (2, 1, 7.0, 1),  # overloaded: still one
        (16, 4, 0.0, 4),  # ranks share the node's cores
        (16, 4, 8.0, 2),
        (3, 2, 0.0, 1),
    ],
)
def test_choice_from_cores_ranks_and_load(no_omp, cores, ranks, load, want):
    count, why = threads.choose_threads(0, cores=cores, ranks=ranks, load=load)
    assert count == want
    assert f"{cores} core" in why and f"load {load:.1f}" in why
    assert ("busy cores left out" in why) == (count < max(1, cores // ranks))


def test_no_load_average_uses_the_share(no_omp):
    assert threads.choose_threads(0, cores=8, ranks=2, load=None)[0] == 4


def test_local_ranks_from_launcher_environment(monkeypatch):
    for key in ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS_PER_NODE",
                "SLURM_TASKS_PER_NODE"):  # fmt: skip
        monkeypatch.delenv(key, raising=False)
    assert threads.local_ranks() == 1
    monkeypatch.setenv("SLURM_TASKS_PER_NODE", "4(x2)")
    assert threads.local_ranks() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert threads.local_ranks() == 8


def test_available_cores_follows_the_affinity_mask():
    import os

    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no sched_getaffinity on this system")
    assert threads.available_cores() == len(os.sched_getaffinity(0))


def test_run_sets_logs_and_restores_threads(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    seen = []

    class Probe(cm_train.Callback):
        def on_step_end(self, trainer, result, record):
            seen.append(torch.get_num_threads())

    cfg = cm_train.load_config(
        "packages/cm-train/configs/digits.toml",
        [f"run.dir={tmp_path / 'run'}", "run.total_steps=3", "run.batch_size=8", "run.threads=2", "objective.name=edm",
         "objective.kwargs={}",
         "log.sample_every=0", "log.sample_count=0", "checkpoint.every=0"],
    )  # fmt: skip
    lines = []
    before = torch.get_num_threads()
    result = cm_train.run(cfg, log=lines.append, callbacks=[Probe()])
    assert seen == [2] * 3
    assert result["samples"] == []  # log.sample_count = 0: no grids (it failed in the sampler before)
    assert any("cpu threads: 2 (run.threads = 2)" in line for line in lines)
    assert torch.get_num_threads() == before


def test_run_threads_is_range_checked():
    with pytest.raises(cm_train.ConfigError, match="run.threads"):
        cm_train.load_config("packages/cm-train/configs/digits.toml", ["run.threads=-1"])

"""Root pytest configuration shared by every package's tests."""

import os

import pytest
import torch

# Most tests run on tiny tensors, where OpenMP hand-offs between 2 threads cost more than the
# arithmetic (and stall badly when another process holds a core). CM_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("CM_TEST_THREADS", "1")))
# cm-train chooses its CPU threads from OMP_NUM_THREADS when set (cm_train.threads): the same count
# for the runs the tests start in this process and in subprocesses, whatever the machine's load.
os.environ["OMP_NUM_THREADS"] = os.environ.get("CM_TEST_THREADS", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is visible to torch on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _dataset_check_cache(tmp_path, monkeypatch):
    """cm-train remembers checked datasets under CM_TRAIN_CACHE: a temporary one per test."""
    monkeypatch.setenv("CM_TRAIN_CACHE", str(tmp_path / "cm-train-cache"))

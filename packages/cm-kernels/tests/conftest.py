"""Fixtures shared by cm-kernels' tests."""

import pytest
import torch


@pytest.fixture
def two_threads():
    """torch at 2 threads for the test (tasks split across threads), restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        yield 2
    finally:
        torch.set_num_threads(before)

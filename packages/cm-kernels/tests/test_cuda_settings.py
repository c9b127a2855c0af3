"""The CUDA settings' switch (cm_kernels.cuda) on any machine: it round-trips, is off by default,
refuses non-bools, and leaves CPU tensors alone."""

import os

import cm_kernels
import pytest
import torch

pytestmark = pytest.mark.skipif(
    cm_kernels.backends()["normalized_attention"]["backend"] == "reference",
    reason="compiled cm_kernels extension not loaded",
)


def test_tensor_cores_switch_round_trips_and_is_off_by_default():
    before = cm_kernels.cuda_tensor_cores()
    assert before == (os.environ.get("CM_KERNELS_CUDA_MMA") == "1")
    try:
        assert cm_kernels.set_cuda_tensor_cores(True) is True and cm_kernels.cuda_tensor_cores() is True
        assert cm_kernels.set_cuda_tensor_cores(False) is False and cm_kernels.cuda_tensor_cores() is False
        with pytest.raises(TypeError, match="must be a bool"):
            cm_kernels.set_cuda_tensor_cores(1)
    finally:
        cm_kernels.set_cuda_tensor_cores(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tensor_cores_switch_leaves_cpu_tensors_alone(dtype):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 32, generator=g).to(dtype) for _ in range(3))
    before = cm_kernels.cuda_tensor_cores()
    try:
        cm_kernels.set_cuda_tensor_cores(False)
        off = cm_kernels.normalized_attention(q, k, v)
        cm_kernels.set_cuda_tensor_cores(True)
        on = cm_kernels.normalized_attention(q, k, v)
    finally:
        cm_kernels.set_cuda_tensor_cores(before)
    assert torch.equal(off, on)

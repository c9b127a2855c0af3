"""CUDA-side settings of the compiled kernels.

``cuda_tensor_cores()``          whether the CUDA attention uses its tensor-core kernels (float16 /
                                 bfloat16 on sm_80+; ``csrc/cuda/attention_mma.cuh``): the forward,
                                 and the backward for head dims up to 64.
``set_cuda_tensor_cores(on)``    switch them (``CM_KERNELS_CUDA_MMA=1`` in the environment turns them
                                 on at load). Off by default: compiled, not yet run on a GPU;
                                 ``tests/test_cuda.py`` checks them against the float64 reference and
                                 ``tools/bench/gpu.py`` times them when a GPU is present. The JVP and
                                 the backward of larger heads use the SIMT kernels either way; float32
                                 and CPU tensors are unaffected.
"""

from __future__ import annotations

import torch

__all__ = ["cuda_tensor_cores", "set_cuda_tensor_cores"]


def _ops():
    from . import _STATE

    if not _STATE.loaded:
        raise RuntimeError("cm_kernels: the compiled extension is not loaded; there is no CUDA setting to read or set")
    return torch.ops.cm_kernels


def cuda_tensor_cores() -> bool:
    """Whether float16 / bfloat16 CUDA attention runs the tensor-core (mma.sync) kernels."""
    return bool(_ops().cuda_tensor_cores())


def set_cuda_tensor_cores(on: bool) -> bool:
    """Turn the tensor-core attention kernels on or off (process-wide); returns the setting."""
    if not isinstance(on, bool):
        raise TypeError(f"cm_kernels.set_cuda_tensor_cores: on must be a bool, got {on!r}")
    return bool(_ops().set_cuda_tensor_cores(on))

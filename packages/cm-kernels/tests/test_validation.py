"""Bad input gives a ValueError/TypeError that names the problem."""

import cm_kernels
import pytest
import torch

x = torch.randn(4, 3, 8)
q = torch.randn(2, 2, 8, 32)


@pytest.mark.parametrize(
    "args,kwargs,exc,match",
    [
        ((x, torch.randn(4, 3, 9), 0.1), {}, ValueError, "differ in shape"),
        ((x, x.double(), 0.1), {}, TypeError, "dtypes differ"),
        ((x.long(), x.long(), 0.1), {}, TypeError, "dtype torch.int64"),
        ((torch.randn(0, 3), torch.randn(0, 3), 0.1), {}, ValueError, "empty batch"),
        ((x, x, 0.0), {}, ValueError, "c must be"),
        ((x, x, -1.0), {}, ValueError, "c must be"),
        ((x, x, "0.1"), {}, TypeError, "c must be a Python float"),
        ((x, x, 0.1), {"reduction": "avg"}, ValueError, "reduction must be"),
        ((x, x, 0.1), {"weight": torch.ones(3)}, ValueError, r"weight must have shape \[B\]"),
        ((x, x, 0.1), {"weight": torch.ones(4, 1)}, ValueError, r"weight must have shape \[B\]"),
        ((x, x, 0.1), {"weight": torch.ones(4, dtype=torch.long)}, TypeError, "weight must be a floating"),
        (([1.0], x, 0.1), {}, TypeError, "pred must be a torch.Tensor"),
    ],
)
def test_pseudo_huber_bad_input(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        cm_kernels.pseudo_huber_loss(*args, **kwargs)


@pytest.mark.parametrize(
    "args,kwargs,exc,match",
    [
        ((q, q, torch.randn(2, 2, 9, 32)), {}, ValueError, "differ in shape"),
        ((q, torch.randn(2, 3, 8, 32), torch.randn(2, 3, 8, 32)), {}, ValueError, "must agree in B, H and d"),
        ((q, q.half(), q), {}, TypeError, "dtypes differ"),
        ((q.int(), q.int(), q.int()), {}, TypeError, "dtype torch.int32"),
        ((q[:0], q[:0], q[:0]), {}, ValueError, "empty batch"),
        ((torch.randn(2, 2, 8, 48),) * 3, {}, ValueError, "unsupported head dim 48"),
        ((q, q, q), {"normalize": "kv"}, ValueError, "normalize must be"),
        ((q, q, q), {"scale": 0.0}, ValueError, "scale must be"),
        ((q, q, q), {"eps": -1.0}, ValueError, "eps must be"),
        ((q[0], q[0], q[0]), {}, ValueError, r"must be \[B, H, N, d\]"),
    ],
)
def test_attention_bad_input(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        cm_kernels.normalized_attention(*args, **kwargs)


@pytest.mark.parametrize(
    "args,exc,match",
    [
        ((torch.randn(2, 3 * 2 * 32 + 1, 5), 2), ValueError, "not divisible"),
        ((torch.randn(2, 3 * 2 * 48, 5), 2), ValueError, "unsupported head dim 48"),
        ((torch.randn(0, 3 * 2 * 32, 5), 2), ValueError, "empty batch"),
        ((torch.randn(2, 3 * 2 * 32, 5), 0), ValueError, "num_heads"),
        ((torch.randn(2, 3 * 2 * 32), 2), ValueError, r"\[B, 3\*H\*d, N\]"),
        ((torch.randint(0, 3, (2, 3 * 2 * 32, 5)), 2), TypeError, "dtype torch.int64"),
    ],
)
def test_attention_qkv_bad_input(args, exc, match):
    with pytest.raises(exc, match=match):
        cm_kernels.normalized_attention_qkv(*args)


def test_ops_check_inputs_too():
    # Direct op calls (e.g. from other C++/Python code) still get typed errors, not crashes.
    with pytest.raises(ValueError, match="normalize must be"):
        torch.ops.cm_kernels.normalized_attention_fwd(q, q, q, 0.1, "bad", 1e-4)
    with pytest.raises(ValueError, match="c must be > 0"):
        torch.ops.cm_kernels.pseudo_huber_fwd(x, x, 0.0)

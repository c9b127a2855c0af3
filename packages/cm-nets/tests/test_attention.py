import logging
import math

import cm_nets
import cm_nets.backends as A
import pytest
import torch

CPU_BACKENDS = [b for b in ("math", "sdpa", "fused") if b in cm_nets.available_backends()]
TOL = {
    torch.float32: dict(atol=2e-5, rtol=1e-4),
    torch.float64: dict(atol=1e-10, rtol=1e-9),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
}


def reference(q, k, v, normalize):
    """float64 truth: x̂ = x / (1e-4 + ‖x‖/√d) per head vector, softmax(q̂k̂ᵀ/√d) v̂."""
    q, k, v = (t.double() for t in (q, k, v))
    n = lambda t: t / (1e-4 + t.norm(dim=-1, keepdim=True) / math.sqrt(t.shape[-1]))
    if normalize != "none":
        q, k = n(q), n(k)
        if normalize == "qkv":
            v = n(v)
    w = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)
    return w @ v


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("normalize", ["none", "qk", "qkv"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backends_match_reference(backend, normalize, dtype):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 40, 32, generator=g).to(dtype) for _ in range(3))
    out = A.attention(q, k, v, backend=backend, normalize=normalize)
    assert out.dtype == dtype and out.shape == q.shape
    truth = reference(q, k, v, normalize)
    err = (out.double() - truth).abs().max().item()
    # Low precision: at most about twice the error of the same-precision math path (STYLE.md).
    base = (A.attention(q, k, v, backend="math", normalize=normalize).double() - truth).abs().max().item()
    assert err <= max(2.5 * base, TOL[dtype]["atol"]), (backend, err, base)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backend_gradients_agree(backend):
    g = torch.Generator().manual_seed(2)
    inputs = [torch.randn(1, 2, 24, 32, generator=g, requires_grad=True) for _ in range(3)]
    A.attention(*inputs, backend=backend, normalize="qkv").square().sum().backward()
    grads = [t.grad.clone() for t in inputs]
    ref = [t.detach().double().requires_grad_() for t in inputs]
    reference(*ref, "qkv").square().sum().backward()
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a.double(), b.grad, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["auto"])
def test_qkv_layouts(backend):
    """openai order (three, heads, d) with scale 1/√√d on q and k, and EDM's (heads, d, three)."""
    B, H, d, N = 2, 2, 32, 20
    qkv = torch.randn(B, 3 * H * d, N, generator=torch.Generator().manual_seed(3))
    # openai QKVAttention written out: chunk into q, k, v, then split heads
    q, k, v = (t.reshape(B * H, d, N) for t in qkv.chunk(3, dim=1))
    s = 1 / math.sqrt(math.sqrt(d))
    w = torch.einsum("bct,bcs->bts", q * s, k * s).softmax(-1)
    expected = torch.einsum("bts,bcs->bct", w, v).reshape(B, H * d, N)
    out = A.attention_qkv(qkv, H, layout="three_heads_d", backend=backend)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)
    # EDM: reshape(B·H, d, 3, N).unbind(2), scale 1/√d on k
    q, k, v = qkv.reshape(B * H, d, 3, N).unbind(2)
    w = torch.einsum("ncq,nck->nqk", q, k / math.sqrt(d)).softmax(2)
    expected = torch.einsum("nqk,nck->ncq", w, v).reshape(B, H * d, N)
    out = A.attention_qkv(qkv, H, layout="heads_d_three", backend=backend)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)


def test_missing_backend_names_package():
    for name, package in (("flash", "flash-attn"), ("xformers", "xformers")):
        if name in cm_nets.available_backends():
            continue
        with pytest.raises(ValueError, match=f"needs {package}.*not installed"):
            cm_nets.create("unet-tiny", attention_backend=name)


def test_unknown_backend():
    with pytest.raises(ValueError, match=r"attention_backend must be one of \('auto', 'math'"):
        A.attention(*(torch.zeros(1, 1, 2, 16),) * 3, backend="cudnn")


def test_unsupported_call_is_explained():
    if "fused" not in CPU_BACKENDS:
        pytest.skip("cm-kernels not installed")
    q = torch.randn(1, 1, 4, 12)  # head dim 12 is not compiled
    with pytest.raises(ValueError, match="head dim 12"):
        A.attention(q, q, q, backend="fused")
    assert A.resolve_backend("auto", q, "qkv") == "sdpa"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_normalizations_keep_float64_and_widen_half(dtype):
    # torch >= 2.14 refuses vector_norm(dtype=float32) on float64 input; half must still
    # accumulate in float32. Truth: the formulas in float64.
    from cm_nets.edm2 import normalize

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 8, generator=g, dtype=torch.float64).to(dtype)
    x64 = x.double()
    heads = A.normalize_heads(x)
    whole = normalize(x)
    assert heads.dtype == dtype and whole.dtype == dtype
    want_heads = x64 / (1e-4 + x64.norm(dim=-1, keepdim=True) / math.sqrt(8))
    norm_all = x64.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    want_whole = x64 / (1e-4 + norm_all * math.sqrt(1 / x64[0].numel()))
    tol = {torch.float64: 1e-12, torch.float32: 1e-6}.get(dtype, 1e-2)
    torch.testing.assert_close(heads.double(), want_heads, rtol=tol, atol=tol)
    torch.testing.assert_close(whole.double(), want_whole, rtol=tol, atol=tol)


def test_auto_logs_once(caplog):
    A._logged.clear()
    q = torch.randn(1, 1, 4, 16, dtype=torch.float64)
    with caplog.at_level(logging.INFO, logger="cm_nets"):
        for _ in range(3):
            A.attention(q, q, q, normalize="qk")
    records = [r for r in caplog.records if "attention auto" in r.getMessage()]
    assert len(records) == 1 and "head dim 16" in records[0].getMessage()


def test_set_attention_backend_network_equivalence():
    """Whole networks agree across backends (ADM with cosine attention, EDM2, SongUNet)."""
    from cm_nets.testing import SMALL, make_inputs

    for name in ("adm-imagenet64-no32-qkv", "adm-imagenet64", "edm2-xs", "ddpmpp-cifar10"):
        torch.manual_seed(0)
        net = cm_nets.create(name, **SMALL[name][0]).eval()
        for p in net.parameters():  # wake up zero-initialized layers so attention matters
            if p.dim() > 0 and p.abs().max() == 0:
                torch.nn.init.normal_(p, std=0.05)
        x, c, kw = make_inputs(name)
        outs = {}
        for backend in CPU_BACKENDS:
            cm_nets.set_attention_backend(net, backend)
            with torch.no_grad():
                outs[backend] = net(x, c, **kw)
        for backend, y in outs.items():
            torch.testing.assert_close(y, outs["math"], atol=1e-4, rtol=1e-4, msg=f"{name}: {backend}")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["sdpa", "fused", "flash", "xformers"])
@pytest.mark.parametrize("normalize", ["none", "qkv"])
def test_cuda_backends_match_math(backend, normalize):
    if backend not in cm_nets.available_backends():
        pytest.skip(f"{backend} is not installed")
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 4, 256, 64, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))
    truth = reference(q, k, v, normalize)
    err = (A.attention(q, k, v, backend=backend, normalize=normalize).double() - truth).abs().max().item()
    base = (A.attention(q, k, v, backend="math", normalize=normalize).double() - truth).abs().max().item()
    assert err <= max(2.5 * base, 3e-2), (backend, err, base)


def test_auto_follows_the_measured_table():
    """auto picks the fused kernel only where bench/RESULTS.md measured it faster: per CPU
    instruction set, dtype and normalization; float64 and the unmeasured CUDA kernel take SDPA."""
    if "fused" not in CPU_BACKENDS:
        pytest.skip("cm-kernels not installed")
    import cm_kernels

    if cm_kernels.cpu_isa() == "reference":
        pytest.skip("cm_kernels' compiled extension is not loaded")
    assert A.auto_choice("cpu", torch.float64, 64, "qkv")[0] == "sdpa"
    assert A.auto_choice("cpu", torch.float32, 12, "qkv")[0] == "sdpa"
    name, why = A.auto_choice("cuda", torch.bfloat16, 64, "qkv")
    assert name != "fused" and "not yet measured" in why
    supported = [isa for isa in ("avx512", "avx2", "base") if _isa_ok(cm_kernels, isa)]
    try:
        for isa in supported:
            cm_kernels.set_cpu_isa(isa)
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                for normalize in ("qkv", "none"):
                    want = A._CPU_FUSED_FASTER[isa][dtype][0 if normalize != "none" else 1]
                    name, why = A.auto_choice("cpu", dtype, 64, normalize)
                    assert name == ("fused" if want else "sdpa"), (isa, dtype, normalize, why)
                    assert isa in why
        if "base" in supported:  # the SSE2 build is slower than SDPA for float32: auto must not pick it
            cm_kernels.set_cpu_isa("base")
            q = torch.randn(1, 1, 8, 64)
            assert A.resolve_backend("auto", q, "qkv") == "sdpa"
    finally:
        cm_kernels.set_cpu_isa("auto")


def _isa_ok(cm_kernels, isa: str) -> bool:
    try:
        cm_kernels.set_cpu_isa(isa)
    except ValueError:
        return False
    finally:
        cm_kernels.set_cpu_isa("auto")
    return True

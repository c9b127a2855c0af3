import json
from pathlib import Path

import cm_nets
import pytest
import torch
from cm_nets.testing import SMALL, make_inputs

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "openai_unet_keys.json").read_text())


def _wake(net, std=0.05):
    """Give zero-initialized layers (output convs, proj_out, gains) small random values."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in net.parameters():
            if p.abs().max() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return net


@pytest.mark.parametrize("name", sorted(FIXTURE["variants"]))
def test_openai_key_names_and_shapes(name):
    expected = FIXTURE["variants"][name]
    with torch.device("meta"):
        net = cm_nets.create(name)
    got = {k: list(v.shape) for k, v in net.state_dict().items()}
    assert got == expected["tensors"]
    assert len(got) == expected["num_tensors"] and cm_nets.count_parameters(net) == expected["num_parameters"]


def test_no32_upsample_moves_to_sub_index_1():
    with torch.device("meta"):
        keys = cm_nets.create("adm-imagenet64-no32-qkv").state_dict()
    assert "output_blocks.11.1.in_layers.0.weight" in keys and "output_blocks.11.2.in_layers.0.weight" not in keys


def test_gradient_flow(small_preset):
    overrides = SMALL[small_preset][0]
    torch.manual_seed(0)
    net = _wake(cm_nets.create(small_preset, **overrides)).train()
    x, c, kw = make_inputs(small_preset)
    x.requires_grad_(True)
    net(x, c, **kw).square().mean().backward()
    # Parameters that cannot receive a gradient for this input: label tables of absent classes.
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    # time_embed_end feeds the zero half of time_embed_align at init (BCM's [I | 0]): its gradient is
    # zero until the alignment weight moves, which its own (non-zero) gradient makes happen.
    zero = [
        n
        for n, p in net.named_parameters()
        if p.grad.abs().max() == 0 and "label_emb" not in n and "time_embed_end" not in n
    ]
    assert not zero, zero
    if small_preset == "adm-imagenet64-bcm":
        assert net.time_embed_align.weight.grad[:, 128:].abs().max() > 0
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_determinism_under_seed(small_preset):
    overrides = SMALL[small_preset][0]
    outs = []
    for _ in range(2):
        torch.manual_seed(7)
        net = _wake(cm_nets.create(small_preset, **overrides)).eval()
        x, c, kw = make_inputs(small_preset)
        with torch.no_grad():
            outs.append(net(x, c, **kw))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("name", ["adm-imagenet64-bcm", "unet-tiny", "ddpmpp-cifar10", "edm2-xs", "mlp-toy"])
def test_bf16_autocast(name):
    torch.manual_seed(0)
    net = _wake(cm_nets.create(name, **SMALL[name][0])).eval()
    x, c, kw = make_inputs(name)
    with torch.no_grad():
        ref = net(x, c, **kw)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = net(x, c, **kw)
    assert y.shape == ref.shape and torch.isfinite(y).all()
    rel = (y.float() - ref).norm() / ref.norm()
    assert rel < 0.05, rel


@pytest.mark.parametrize("name", ["adm-imagenet64-no32-qkv", "ncsnpp-cifar10", "edm2-xs"])
def test_channels_last(name):
    torch.manual_seed(0)
    net = _wake(cm_nets.create(name, **SMALL[name][0])).eval()
    x, c, kw = make_inputs(name)
    with torch.no_grad():
        ref = net(x, c, **kw)
        net = net.to(memory_format=torch.channels_last)
        y = net(x.to(memory_format=torch.channels_last), c, **kw)
    torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)


def test_bcm_t_end_init_equals_ict_network():
    """At initialization the BCM network ignores t_end and equals the no32 iCT network with the
    same shared weights (time_embed_align = [I | 0], time_embed_end = copy of time_embed)."""
    overrides = SMALL["adm-imagenet64-bcm"][0]
    torch.manual_seed(0)
    bcm = cm_nets.create("adm-imagenet64-bcm", **overrides).eval()
    _wake(bcm)  # random values for zero-init layers only; the alignment weight is not zero
    ict = cm_nets.create("adm-imagenet64-no32-qkv", **overrides).eval()
    missing, unexpected = ict.load_state_dict(bcm.state_dict(), strict=False)
    assert not missing and sorted({k.split(".")[0] for k in unexpected}) == ["time_embed_align", "time_embed_end"]
    torch.testing.assert_close(bcm.time_embed_end[0].weight, bcm.time_embed[0].weight)
    x, c, kw = make_inputs("adm-imagenet64-bcm")
    with torch.no_grad():
        ref = ict(x, c, kw["class_labels"])
        assert ref.abs().max() > 0
        for c_end in (torch.full((2,), -3.0), torch.zeros(2), torch.tensor([250.0, -1000.0])):
            torch.testing.assert_close(bcm(x, c, kw["class_labels"], c_noise_end=c_end), ref, atol=1e-5, rtol=1e-5)


def test_bcm_t_end_matters_after_training_the_alignment():
    torch.manual_seed(0)
    bcm = _wake(cm_nets.create("adm-imagenet64-bcm", **SMALL["adm-imagenet64-bcm"][0])).eval()
    with torch.no_grad():
        bcm.time_embed_align.weight.add_(0.01 * torch.randn_like(bcm.time_embed_align.weight))
        x, c, kw = make_inputs("adm-imagenet64-bcm")
        a = bcm(x, c, kw["class_labels"], c_noise_end=torch.zeros(2))
        b = bcm(x, c, kw["class_labels"], c_noise_end=torch.ones(2))
    assert (a - b).abs().max() > 1e-6


def test_openai_time_embedding():
    """[cos, sin] with frequencies exp(−ln(1e4)·i/half) (openai timestep_embedding)."""
    from cm_nets.layers import sinusoidal_embedding

    t = torch.tensor([0.0, 3.0, 250 * -1.5])
    e = sinusoidal_embedding(t, 8)
    f = torch.exp(-torch.log(torch.tensor(1e4)) * torch.arange(4) / 4)
    torch.testing.assert_close(e, torch.cat([torch.cos(t[:, None] * f), torch.sin(t[:, None] * f)], 1))


def test_zero_init_outputs_are_zero():
    for name in ("adm-imagenet64-bcm", "unet-tiny", "edm2-xs", "mlp-toy"):
        net = cm_nets.create(name, **SMALL[name][0])
        x, c, kw = make_inputs(name)
        with torch.no_grad():
            assert net(x, c, **kw).abs().max() == 0


def test_mlp_toy_bcm_end_time_starts_neutral_and_dropout_is_active():
    import cm_nets

    torch.manual_seed(0)
    net = cm_nets.create("mlp-toy", dim=3, hidden=32, depth=2, emb_dim=16, bcm=True, dropout=0.5)
    torch.nn.init.normal_(net.out.weight)  # the zero-initialized output would hide everything
    x, c = torch.randn(8, 3), torch.randn(8)
    net.eval()
    a = net(x, c, c_noise_end=torch.full((8,), -1.5))
    b = net(x, c, c_noise_end=torch.full((8,), 0.7))
    torch.testing.assert_close(a, b)  # zero-initialized end-time embedding: no effect at init
    torch.nn.init.normal_(net.map_noise_end[2].weight)
    assert not torch.allclose(net(x, c, c_noise_end=torch.full((8,), -1.5)), b)
    net.train()
    assert not torch.equal(net(x, c, c_noise_end=c), net(x, c, c_noise_end=c))  # dropout masks differ
    plain = cm_nets.create("mlp-toy", dim=3, hidden=32, depth=2, emb_dim=16)
    with pytest.raises(ValueError, match="bcm=True"):
        plain(x, c, c_noise_end=c)

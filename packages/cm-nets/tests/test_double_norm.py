"""sCM's adaptive double normalization (Lu & Song 2025, §4.1), ``ada_norm="double"`` on ADMUNet,
SongUNet and EDM2UNet (last section): AdaGN's ``norm(x)·s(t) + b(t)`` becomes
``norm(x)·pnorm(s(t)) + pnorm(b(t))``, pnorm the pixel normalization of ProGAN (unit RMS over
channels, eps 1e-8 inside the root). Checked against a float64 formula written here with plain
torch ops, by a property that plain AdaGN lacks (invariance to the scale of the affine layer, or for
EDM2 of the embedding), under torch.func.jvp against finite differences, in bfloat16, and through
save/load. The default ("plain") builds the same networks as before."""

import math

import pytest
import torch
import torch.nn.functional as F

import cm_nets
from cm_nets.adm import ResBlock
from cm_nets.edm2 import Block as EDM2Block
from cm_nets.layers import pixel_norm
from cm_nets.song import UNetBlock
from cm_nets.testing import SMALL, make_inputs

NETS = ["adm-imagenet64", "ddpmpp-cifar10", "ncsnpp-cifar10"]


def _perturb(module, seed=1, size=0.05):
    """Zero-initialized output layers would hide the embedding path: move every weight a little."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(size * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def _net(name, dtype=torch.float32, **kw):
    torch.manual_seed(0)
    over = {**SMALL[name][0], "attention_backend": "math", **kw}
    return _perturb(cm_nets.create(name, **over)).to(dtype).eval()


def _pnorm64(v):  # written out: v / sqrt(mean_c v² + 1e-8), per sample
    return v / torch.sqrt((v * v).mean(dim=1, keepdim=True) + 1e-8)


def _block_inputs(cin, emb_dim):
    g = torch.Generator().manual_seed(2)
    return torch.randn(2, cin, 8, 8, generator=g), 2 * torch.randn(2, emb_dim, generator=g)


def test_adm_resblock_is_the_papers_layer():
    torch.manual_seed(0)
    block = _perturb(ResBlock(32, 16, 0.0, out_channels=64, use_scale_shift_norm=True, ada_norm="double")).eval()
    x, emb = _block_inputs(32, 16)
    p = {k: v.double() for k, v in block.state_dict().items()}
    x64, e64 = x.double(), emb.double()
    h = F.conv2d(F.silu(F.group_norm(x64, 32, p["in_layers.0.weight"], p["in_layers.0.bias"], 1e-5)),
                 p["in_layers.2.weight"], p["in_layers.2.bias"], padding=1)  # fmt: skip
    st = F.linear(F.silu(e64), p["emb_layers.1.weight"], p["emb_layers.1.bias"])
    s, b = st[:, :64], st[:, 64:]
    y = F.group_norm(h, 32, p["out_layers.0.weight"], p["out_layers.0.bias"], 1e-5)
    y = y * _pnorm64(s)[:, :, None, None] + _pnorm64(b)[:, :, None, None]
    y = F.conv2d(F.silu(y), p["out_layers.3.weight"], p["out_layers.3.bias"], padding=1)
    ref = F.conv2d(x64, p["skip_connection.weight"], p["skip_connection.bias"]) + y
    with torch.no_grad():
        out = block(x, emb)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_song_unetblock_is_the_papers_layer():
    torch.manual_seed(0)
    block = UNetBlock(32, 64, 16, skip_scale=math.sqrt(0.5), eps=1e-6, resample_proj=True,
                      adaptive_scale=True, ada_norm="double")  # fmt: skip
    block = _perturb(block).eval()
    x, emb = _block_inputs(32, 16)
    p = {k: v.double() for k, v in block.state_dict().items()}
    x64, e64 = x.double(), emb.double()
    # EDM's GroupNorm: min(32, C/4) groups -> 8 for 32 channels, 16 for 64
    h = F.conv2d(F.silu(F.group_norm(x64, 8, p["norm0.weight"], p["norm0.bias"], 1e-6)),
                 p["conv0.weight"], p["conv0.bias"], padding=1)  # fmt: skip
    st = F.linear(e64, p["affine.weight"], p["affine.bias"])
    s, b = st[:, :64], st[:, 64:]
    y = F.group_norm(h, 16, p["norm1.weight"], p["norm1.bias"], 1e-6)
    y = y * _pnorm64(s)[:, :, None, None] + _pnorm64(b)[:, :, None, None]
    y = F.conv2d(F.silu(y), p["conv1.weight"], p["conv1.bias"], padding=1)
    ref = (y + F.conv2d(x64, p["skip.weight"], p["skip.bias"])) * math.sqrt(0.5)
    with torch.no_grad():
        out = block(x, emb)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NETS + ["unet-tiny"])
def test_default_is_bit_identical(name):
    """A network built without the argument and one with ada_norm="plain": same keys, shapes,
    values (same seed) and outputs, bit for bit."""
    x, c, kw = make_inputs(name)
    bare, plain = _net(name), _net(name, ada_norm="plain")
    assert list(bare.state_dict()) == list(plain.state_dict())
    for (k, a), (_, b) in zip(bare.state_dict().items(), plain.state_dict().items()):
        assert torch.equal(a, b), k
    with torch.no_grad():
        assert torch.equal(bare(x, c, **kw), plain(x, c, **kw))
    if name.startswith("adm"):  # "double" reuses AdaGN's tensors: openai checkpoints load into it
        shapes = {k: v.shape for k, v in _net(name, ada_norm="double").state_dict().items()}
        assert shapes == {k: v.shape for k, v in bare.state_dict().items()}


@pytest.mark.parametrize("name", NETS)
def test_output_ignores_the_scale_of_the_embedding_affine(name):
    """pnorm(α·v) = pnorm(v) for α > 0: multiplying every AdaGN affine layer (ADM ``emb_layers.1``,
    EDM ``affine``) by α leaves the output unchanged; plain AdaGN does not."""
    x, c, kw = make_inputs(name)
    outs = {}
    for mode in ("double", "plain"):
        net = _net(name, ada_norm=mode)
        with torch.no_grad():
            before = net(x, c, **kw)
            for mod_name, mod in net.named_modules():
                if mod_name.endswith("emb_layers.1") or mod_name.endswith(".affine"):
                    mod.weight.mul_(3.0)
                    mod.bias.mul_(3.0)
            outs[mode] = (before, net(x, c, **kw))
    torch.testing.assert_close(outs["double"][1], outs["double"][0], rtol=1e-4, atol=1e-5)
    before, after = outs["plain"]
    assert (after - before).norm() > 0.05 * before.norm()


def _jvp_and_central_difference(net, x, c, kw, h=3e-3):
    """torch.func.jvp of net(x, c) along (dx, dc) and along dc alone (random float64 directions),
    and the central differences of step h along the same directions."""
    c = c.double()
    g = torch.Generator().manual_seed(3)
    dx = torch.randn(x.shape, generator=g, dtype=torch.float64)
    dc = torch.randn(c.shape, generator=g, dtype=torch.float64)

    def fn(a, b):
        return net(a, b, **kw)

    with torch.no_grad():
        _, tangent = torch.func.jvp(fn, (x, c), (dx, dc))
        _, t_only = torch.func.jvp(lambda b: fn(x, b), (c,), (dc,))
        fd = (fn(x + h * dx, c + h * dc) - fn(x - h * dx, c - h * dc)) / (2 * h)
        fd_c = (fn(x, c + h * dc) - fn(x, c - h * dc)) / (2 * h)
    return tangent, t_only, fd, fd_c


@pytest.mark.parametrize("name", ["adm-imagenet64", "ddpmpp-cifar10"])
def test_jvp_matches_central_finite_difference(name):
    """float64 networks, along x and the time input together, and along time alone (the path
    through pnorm). Their GroupNorm and noise embedding compute in float32 by design (as the
    reference networks'), hence h = 3e-3 and tolerances above float32's resolution (measured:
    ≤ 7e-5 and ≤ 5e-4; a pnorm whose denominator is treated as constant gives 2e-3 and 0.1)."""
    x, c, kw = make_inputs(name, dtype=torch.float64)
    tangent, t_only, fd, fd_c = _jvp_and_central_difference(_net(name, dtype=torch.float64, ada_norm="double"), x, c, kw)
    assert t_only.norm() > 1e-3 * tangent.norm()  # the time path (through pnorm) is exercised
    assert (tangent - fd).norm() <= 5e-4 * fd.norm(), ((tangent - fd).norm() / fd.norm()).item()
    assert (t_only - fd_c).norm() <= 3e-3 * fd_c.norm(), ((t_only - fd_c).norm() / fd_c.norm()).item()


@pytest.mark.parametrize("name", NETS)
def test_bfloat16_autocast_and_float16_statistics(name):
    net = _net(name, ada_norm="double")
    x, c, kw = make_inputs(name)
    with torch.no_grad():
        ref = net(x, c, **kw)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = net(x, c, **kw)
    assert torch.isfinite(y).all()
    assert (y.float() - ref).norm() < 0.05 * ref.norm()  # measured 1.3–1.8 % (plain AdaGN: the same)
    # mean(v²) of a float16 vector at 300 overflows float16 (9e4 > 65504): the statistics are float32
    v = torch.full((2, 8), 300.0, dtype=torch.float16)
    assert pixel_norm(v).dtype == torch.float16
    torch.testing.assert_close(pixel_norm(v), torch.ones_like(v))


@pytest.mark.parametrize("name", NETS)
def test_a_bad_value_is_refused_by_name(name):
    with pytest.raises(ValueError, match=r"ada_norm must be one of \('plain', 'double'\), got 'Double'"):
        cm_nets.create(name, **SMALL[name][0], ada_norm="Double")


def test_double_needs_a_scale_and_shift():
    with pytest.raises(ValueError, match="ada_norm='double'.*use_scale_shift_norm=True"):
        cm_nets.create("adm-imagenet64-no32-qkv", **SMALL["adm-imagenet64-no32-qkv"][0], ada_norm="double")
    with pytest.raises(ValueError, match="ada_norm='double'.*adaptive_scale=True"):
        UNetBlock(32, 32, 16, adaptive_scale=False, ada_norm="double")


@pytest.mark.parametrize("name", ["adm-imagenet64", "ncsnpp-cifar10"])
def test_save_load_keeps_the_option(name, tmp_path):
    net = _net(name, ada_norm="double")
    path = cm_nets.save(net, tmp_path / "net.safetensors")
    assert cm_nets.read_config(path)["overrides"]["ada_norm"] == "double"
    back = cm_nets.load(path).eval()
    assert back.ada_norm == "double"
    x, c, kw = make_inputs(name)
    with torch.no_grad():
        torch.testing.assert_close(back(x, c, **kw), net(x, c, **kw), rtol=0, atol=0)


# ---- EDM2 (EDM2UNet, edm2-xs) --------------------------------------------------------------------
#
# EDM2's block has no GroupNorm and modulates the output y of conv_res0 by a scale only,
# y·(1 + emb_linear(emb, gain=emb_gain)); "double" makes emb_linear 2C wide and gives
# y·pnorm(s) + pnorm(b), without emb_gain (see cm_nets.edm2.Block).


def _edm2_inputs(bcm=False, dtype=None):
    x, c, kw = make_inputs("edm2-xs", dtype=dtype)
    if bcm:
        kw["c_noise_end"] = 0.5 * c
    return x, c, kw


def _mp_weight64(w, gain=1.0):  # EDM2's weight normalization and scaling (eqs. 47, 66), written out
    fan_in = w[0].numel()
    norm = w.flatten(1).norm(dim=1).reshape(-1, *[1] * (w.ndim - 1))
    return w / (1e-4 + norm / math.sqrt(fan_in)) * (gain / math.sqrt(fan_in))


def _mp_silu64(v):
    return F.silu(v) / 0.596


@pytest.mark.parametrize("flavor", ["enc", "dec"])
def test_edm2_block_is_the_papers_layer(flavor):
    torch.manual_seed(0)
    block = _perturb(EDM2Block(32, 64, 16, flavor=flavor, ada_norm="double")).eval()
    assert not hasattr(block, "emb_gain")
    x, emb = _block_inputs(32, 16)
    p = {k: v.double() for k, v in block.state_dict().items()}
    x64, e64 = x.double(), emb.double()
    if flavor == "enc":  # 1×1 skip conv, then pixel norm (EDM2's: eps 1e-4 added to the channel RMS)
        x64 = F.conv2d(x64, _mp_weight64(p["conv_skip.weight"]))
        x64 = x64 / (1e-4 + x64.square().mean(dim=1, keepdim=True).sqrt())
    y = F.conv2d(_mp_silu64(x64), _mp_weight64(p["conv_res0.weight"]), padding=1)
    st = e64 @ _mp_weight64(p["emb_linear.weight"]).t()  # [2, 2C]: no gain
    s, b = st[:, :64], st[:, 64:]
    y = _mp_silu64(y * _pnorm64(s)[:, :, None, None] + _pnorm64(b)[:, :, None, None])
    y = F.conv2d(y, _mp_weight64(p["conv_res1.weight"]), padding=1)
    if flavor == "dec":
        x64 = F.conv2d(x64, _mp_weight64(p["conv_skip.weight"]))
    ref = (0.7 * x64 + 0.3 * y) / math.sqrt(0.7**2 + 0.3**2)  # mp_sum, res_balance 0.3
    with torch.no_grad():
        out = block(x, emb)
    assert ref.abs().max() < 256  # clip_act not reached
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bcm", [False, True])
def test_edm2_default_is_bit_identical(bcm):
    """edm2-xs (and its BCM variant) built without the argument and with ada_norm="plain": same keys,
    shapes, values and outputs, bit for bit. "double": emb_gain gone, emb_linear 2C wide, the rest
    the same keys and shapes."""
    x, c, kw = _edm2_inputs(bcm)
    bare, plain = _net("edm2-xs", bcm=bcm), _net("edm2-xs", bcm=bcm, ada_norm="plain")
    assert list(bare.state_dict()) == list(plain.state_dict())
    for (k, a), (_, b) in zip(bare.state_dict().items(), plain.state_dict().items()):
        assert torch.equal(a, b), k
    with torch.no_grad():
        assert torch.equal(bare(x, c, **kw), plain(x, c, **kw))
    double = {k: v.shape for k, v in _net("edm2-xs", bcm=bcm, ada_norm="double").state_dict().items()}
    expect = {k: v.shape for k, v in bare.state_dict().items() if not k.endswith(".emb_gain")}
    expect = {k: (s[0] * 2, *s[1:]) if k.endswith(".emb_linear.weight") else s for k, s in expect.items()}
    assert double == expect


def test_edm2_output_ignores_the_scale_of_the_block_embedding():
    """The weight of EDM2's emb_linear is normalized in its forward, so scaling it tests nothing.
    Instead every block gets 3·emb (a forward pre-hook): emb_linear is linear without bias, so s and
    b become 3s and 3b, and only pnorm (pnorm(3v) = pnorm(v)) undoes that. A missing pnorm on s or on
    b changes the output (y·3s + 3b); so does plain EDM2 (y·(1 + 3·g·u)), measured 13 %."""
    x, c, kw = _edm2_inputs()
    outs = {}
    for mode in ("double", "plain"):
        net = _net("edm2-xs", ada_norm=mode)
        with torch.no_grad():
            before = net(x, c, **kw)
            for m in net.modules():
                if isinstance(m, EDM2Block):
                    m.register_forward_pre_hook(lambda _, args: (args[0], 3.0 * args[1]))
            outs[mode] = (before, net(x, c, **kw))
    torch.testing.assert_close(outs["double"][1], outs["double"][0], rtol=1e-4, atol=1e-5)
    before, after = outs["plain"]
    assert (after - before).norm() > 0.05 * before.norm()


def test_edm2_jvp_matches_central_finite_difference():
    """float64 edm2-xs "double", along x and time together and along time alone. MPFourier computes
    in float32 by design, hence h = 3e-3 and a tolerance above float32's resolution (measured:
    3e-5 and 4e-5; a pnorm whose denominator is treated as constant gives 0.2 and 0.3)."""
    x, c, kw = _edm2_inputs(dtype=torch.float64)
    tangent, t_only, fd, fd_c = _jvp_and_central_difference(
        _net("edm2-xs", dtype=torch.float64, ada_norm="double"), x, c, kw
    )
    assert t_only.norm() > 1e-2 * tangent.norm()  # the time path (through pnorm) is exercised
    assert (tangent - fd).norm() <= 5e-4 * fd.norm(), ((tangent - fd).norm() / fd.norm()).item()
    assert (t_only - fd_c).norm() <= 5e-4 * fd_c.norm(), ((t_only - fd_c).norm() / fd_c.norm()).item()


def test_edm2_bfloat16_autocast():
    net = _net("edm2-xs", ada_norm="double")
    x, c, kw = _edm2_inputs()
    with torch.no_grad():
        ref = net(x, c, **kw)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = net(x, c, **kw)
    assert torch.isfinite(y).all()
    assert (y.float() - ref).norm() < 0.05 * ref.norm()


def test_edm2_save_load_keeps_the_option_and_a_bad_value_is_refused(tmp_path):
    net = _net("edm2-xs", ada_norm="double")
    path = cm_nets.save(net, tmp_path / "net.safetensors")
    assert cm_nets.read_config(path)["overrides"]["ada_norm"] == "double"
    back = cm_nets.load(path).eval()
    assert back.ada_norm == "double"
    assert all(m.ada_norm == "double" for m in back.modules() if isinstance(m, EDM2Block))
    x, c, kw = _edm2_inputs()
    with torch.no_grad():
        torch.testing.assert_close(back(x, c, **kw), net(x, c, **kw), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"ada_norm must be one of \('plain', 'double'\), got 'Double'"):
        cm_nets.create("edm2-xs", **SMALL["edm2-xs"][0], ada_norm="Double")
    with pytest.raises(ValueError, match="ada_norm"):
        EDM2Block(32, 32, 16, ada_norm="pnorm")

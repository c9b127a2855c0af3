"""EDM / ECT network snapshots: read as EDM's own training loop pickles them, converted without
running their code, and checked against an independent float64 implementation of EDM's forward.

The reference below (``Ref*``) is written from the description of EDM's ``training/networks.py``
(Karras et al. 2022): SongUNet with its UNetBlock, Conv2d (FIR up/down-sampling, fused or not),
GroupNorm, positional / Fourier noise embeddings with the sin/cos half swap, and EDMPrecond. It
builds its own random weights, pickles them with EDM's byte structure (``cm_nets.testing``),
and never calls cm_nets' modules; only the converted network under test does.
"""

import io
import math
import pickle

import cm_nets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cm_nets.testing import (
    EasyDict,
    EDMRecord,
    RunsEval,
    RunsShellCommand,
    edm_module_dict,
    edm_snapshot_bytes,
)

# ---------------------------------------------------------------- the reference EDM network


class RefBuilder:
    """Random weights for EDM's modules, kept twice: as EDM records (to pickle) and as float64
    tensors with their configuration (for the reference forward). Values are rounded to float32
    first, since EDM stores float32 weights."""

    def __init__(self, seed: int):
        self.gen = torch.Generator().manual_seed(seed)

    def randn(self, *shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=self.gen, dtype=torch.float64) * scale + shift).float().double()

    def linear(self, cin, cout, bias=True):
        w = self.randn(cout, cin, scale=1 / math.sqrt(cin))
        b = self.randn(cout, scale=0.1) if bias else None
        rec = EDMRecord(
            "Linear",
            attrs=dict(in_features=cin, out_features=cout),
            params=dict(weight=w, bias=b),
            init_kwargs=dict(in_features=cin, out_features=cout, bias=bias, init_mode="xavier_uniform"),
        )
        return rec, dict(kind="linear", w=w, b=b)

    def conv(self, cin, cout, kernel, up=False, down=False, filt=(1, 1), fused=False):
        w = self.randn(cout, cin, kernel, kernel, scale=1 / math.sqrt(cin * kernel * kernel)) if kernel else None
        b = self.randn(cout, scale=0.1) if kernel else None
        f1 = torch.tensor(filt, dtype=torch.float64)
        f2 = (torch.outer(f1, f1) / f1.sum() ** 2)[None, None] if (up or down) else None
        rec = EDMRecord(
            "Conv2d",
            attrs=dict(in_channels=cin, out_channels=cout, up=up, down=down, fused_resample=fused),
            params=dict(weight=w, bias=b),
            buffers=dict(resample_filter=f2),
            init_kwargs=dict(in_channels=cin, out_channels=cout, kernel=kernel, up=up, down=down,
                             resample_filter=list(filt), fused_resample=fused),
        )  # fmt: skip
        spec = dict(kind="conv", w=w, b=b, f=None if f2 is None else f2.float().double(), up=up, down=down, fused=fused)
        return rec, spec

    def norm(self, c, eps=1e-6):
        groups = min(32, c // 4)
        w, b = self.randn(c, scale=0.1, shift=1.0), self.randn(c, scale=0.1)
        rec = EDMRecord(
            "GroupNorm",
            attrs=dict(num_groups=groups, eps=eps),
            params=dict(weight=w, bias=b),
            init_kwargs=dict(num_channels=c, eps=eps),
        )
        return rec, dict(kind="norm", w=w, b=b, groups=groups, eps=eps)

    def block(self, cin, cout, emb, *, up=False, down=False, attention=False, filt=(1, 1), dropout=0.1):
        # SongUNet's block options: one head, skip_scale √0.5 (a numpy float64 in EDM), eps 1e-6,
        # resample_proj (1×1 skip when resampling), additive (not adaptive) embedding.
        skip_scale = np.sqrt(0.5)
        recs, spec = {}, dict(kind="block", cin=cin, skip_scale=float(skip_scale), attention=attention)
        parts = [
            ("norm0", self.norm(cin)),
            ("conv0", self.conv(cin, cout, 3, up, down, filt)),
            ("affine", self.linear(emb, cout)),
            ("norm1", self.norm(cout)),
            ("conv1", self.conv(cout, cout, 3)),
        ]
        if cout != cin or up or down:
            parts.append(("skip", self.conv(cin, cout, 1, up, down, filt)))
        if attention:
            parts += [
                ("norm2", self.norm(cout)),
                ("qkv", self.conv(cout, 3 * cout, 1)),
                ("proj", self.conv(cout, cout, 1)),
            ]
        for name, (rec, sub) in parts:
            recs[name], spec[name] = rec, sub
        recs.setdefault("skip", None)  # EDM: self.skip = None, a plain attribute
        rec = EDMRecord(
            "UNetBlock",
            attrs=dict(in_channels=cin, out_channels=cout, emb_channels=emb, num_heads=1 if attention else 0,
                       dropout=dropout, skip_scale=skip_scale, adaptive_scale=False),
            modules=recs,
            init_kwargs=dict(in_channels=cin, out_channels=cout, emb_channels=emb, up=up, down=down,
                             attention=attention, num_heads=1, dropout=dropout, skip_scale=skip_scale, eps=1e-6,
                             resample_filter=list(filt), resample_proj=True, adaptive_scale=False,
                             init=dict(init_mode="xavier_uniform"),
                             init_zero=dict(init_mode="xavier_uniform", init_weight=1e-5),
                             init_attn=dict(init_mode="xavier_uniform", init_weight=np.sqrt(0.2))),
        )  # fmt: skip
        return rec, spec


def ref_songunet(kw: dict, seed: int = 0):
    """(EDM record of a SongUNet built with constructor arguments ``kw``, reference spec)."""
    B = RefBuilder(seed)
    mc, mult, nb = kw["model_channels"], kw["channel_mult"], kw["num_blocks"]
    emb_c, noise_c = mc * kw.get("channel_mult_emb", 4), mc * kw["channel_mult_noise"]
    filt, attn_res, enc_type = tuple(kw["resample_filter"]), kw["attn_resolutions"], kw["encoder_type"]
    dropout = kw["dropout"]
    mods, spec = {}, dict(kw=kw, noise_c=noise_c)
    if kw["embedding_type"] == "fourier":
        freqs = B.randn(noise_c // 2, scale=16.0)
        mods["map_noise"] = EDMRecord(
            "FourierEmbedding", buffers=dict(freqs=freqs), init_kwargs=dict(num_channels=noise_c)
        )
        spec["freqs"] = freqs
    else:
        mods["map_noise"] = EDMRecord(
            "PositionalEmbedding",
            attrs=dict(num_channels=noise_c, max_positions=10000, endpoint=True),
            params={},
            init_kwargs=dict(num_channels=noise_c, endpoint=True),
        )
    for name, cin, present, bias in (
        ("map_label", kw["label_dim"], kw["label_dim"], True),
        ("map_augment", kw["augment_dim"], kw["augment_dim"], False),
    ):
        mods[name], spec[name] = B.linear(cin, noise_c, bias) if present else (None, None)
    mods["map_layer0"], spec["map_layer0"] = B.linear(noise_c, emb_c)
    mods["map_layer1"], spec["map_layer1"] = B.linear(emb_c, emb_c)

    enc, enc_spec = {}, []  # ordered (name, spec)
    res0 = kw["img_resolution"]
    cout = caux = kw["in_channels"]
    widths = []
    for level, m in enumerate(mult):
        res = res0 >> level
        items = []
        if level == 0:
            items.append((f"{res}x{res}_conv", B.conv(cout, mc, 3)))
            cout = mc
        else:
            items.append((f"{res}x{res}_down", B.block(cout, cout, emb_c, down=True, filt=filt, dropout=dropout)))
            if enc_type == "residual":
                items.append((f"{res}x{res}_aux_residual", B.conv(caux, cout, 3, down=True, filt=filt, fused=True)))
                caux = cout
        for i in range(nb):
            items.append((f"{res}x{res}_block{i}", B.block(cout, mc * m, emb_c, attention=res in attn_res,
                                                           filt=filt, dropout=dropout)))  # fmt: skip
            cout = mc * m
        for name, (rec, sub) in items:
            enc[name] = rec
            enc_spec.append((name, sub))
            if "aux" not in name:
                widths.append(rec.attrs["out_channels"])
    dec, dec_spec = {}, []
    for level, m in reversed(list(enumerate(mult))):
        res = res0 >> level
        items = []
        if level == len(mult) - 1:
            items.append((f"{res}x{res}_in0", B.block(cout, cout, emb_c, attention=True, filt=filt, dropout=dropout)))
            items.append((f"{res}x{res}_in1", B.block(cout, cout, emb_c, filt=filt, dropout=dropout)))
        else:
            items.append((f"{res}x{res}_up", B.block(cout, cout, emb_c, up=True, filt=filt, dropout=dropout)))
        for i in range(nb + 1):
            cin = cout + widths.pop()
            items.append((f"{res}x{res}_block{i}", B.block(cin, mc * m, emb_c, filt=filt, dropout=dropout,
                                                           attention=i == nb and res in attn_res)))  # fmt: skip
            cout = mc * m
        if level == 0:
            items.append((f"{res}x{res}_aux_norm", B.norm(cout)))
            items.append((f"{res}x{res}_aux_conv", B.conv(cout, kw["out_channels"], 3)))
        for name, (rec, sub) in items:
            dec[name] = rec
            dec_spec.append((name, sub))
    mods["enc"], mods["dec"] = edm_module_dict(enc), edm_module_dict(dec)
    spec["enc"], spec["dec"] = enc_spec, dec_spec
    rec = EDMRecord("SongUNet", attrs=dict(label_dropout=0), modules=mods, init_kwargs=dict(kw))
    return rec, spec


def ref_module(m, x):
    if m["kind"] == "linear":
        return x @ m["w"].T + (0 if m["b"] is None else m["b"])
    if m["kind"] == "norm":
        return F.group_norm(x, m["groups"], m["w"], m["b"], m["eps"])
    # conv with FIR resampling; the FIR filter runs per channel (groups = channels), ×4 on the way up
    w, f, C = m["w"], m["f"], x.shape[1]
    wp = 0 if w is None else w.shape[-1] // 2
    fp = 0 if f is None else (f.shape[-1] - 1) // 2
    if m["fused"] and m["up"] and w is not None:
        x = F.conv_transpose2d(x, (4 * f).expand(C, 1, -1, -1), stride=2, groups=C, padding=max(fp - wp, 0))
        x = F.conv2d(x, w, padding=max(wp - fp, 0))
    elif m["fused"] and m["down"] and w is not None:
        x = F.conv2d(x, w, padding=wp + fp)
        x = F.conv2d(x, f.expand(x.shape[1], 1, -1, -1), stride=2, groups=x.shape[1])
    else:
        if m["up"]:
            x = F.conv_transpose2d(x, (4 * f).expand(C, 1, -1, -1), stride=2, groups=C, padding=fp)
        if m["down"]:
            x = F.conv2d(x, f.expand(C, 1, -1, -1), stride=2, groups=C, padding=fp)
        if w is not None:
            x = F.conv2d(x, w, padding=wp)
    return x if m["b"] is None else x + m["b"][None, :, None, None]


def ref_block(m, x, emb):
    h = ref_module(m["conv0"], F.silu(ref_module(m["norm0"], x)))
    h = F.silu(ref_module(m["norm1"], h + ref_module(m["affine"], emb)[:, :, None, None]))
    h = ref_module(m["conv1"], h)  # dropout: off at evaluation
    h = (h + (ref_module(m["skip"], x) if "skip" in m else x)) * m["skip_scale"]
    if m["attention"]:  # one head; qkv channels interleaved as (channel, three)
        Bn, C, H, W = h.shape
        qkv = ref_module(m["qkv"], ref_module(m["norm2"], h)).reshape(Bn, C, 3, H * W)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        weights = torch.softmax(torch.einsum("bcq,bck->bqk", q, k) / math.sqrt(C), dim=-1)
        a = torch.einsum("bqk,bck->bcq", weights, v).reshape(Bn, C, H, W)
        h = (ref_module(m["proj"], a) + h) * m["skip_scale"]
    return h


def ref_forward(spec, x, noise_labels, class_labels=None, augment_labels=None):
    """EDM's SongUNet.forward in float64."""
    kw, half = spec["kw"], spec["noise_c"] // 2
    c = noise_labels.double()
    if kw["embedding_type"] == "fourier":
        arg = c[:, None] * (2 * math.pi * spec["freqs"])[None]
    else:  # PositionalEmbedding(endpoint=True): frequencies (1/10000)^(i/(half−1))
        arg = c[:, None] * (1e-4 ** (torch.arange(half, dtype=torch.float64) / (half - 1)))[None]
    emb = torch.cat([arg.sin(), arg.cos()], dim=1)  # [cos, sin] with its halves swapped
    if spec["map_label"] is not None:
        emb = emb + ref_module(spec["map_label"], class_labels.double() * math.sqrt(kw["label_dim"]))
    if spec["map_augment"] is not None and augment_labels is not None:
        emb = emb + ref_module(spec["map_augment"], augment_labels.double())
    emb = F.silu(ref_module(spec["map_layer1"], F.silu(ref_module(spec["map_layer0"], emb))))
    x = x.double()
    skips, aux = [], x
    for name, m in spec["enc"]:
        if "aux_residual" in name:
            x = skips[-1] = aux = (x + ref_module(m, aux)) / math.sqrt(2)
        elif m["kind"] == "block":
            x = ref_block(m, x, emb)
            skips.append(x)
        else:
            x = ref_module(m, x)
            skips.append(x)
    out = tmp = None
    for name, m in spec["dec"]:
        if "aux_norm" in name:
            tmp = ref_module(m, x)
        elif "aux_conv" in name:
            tmp = ref_module(m, F.silu(tmp))
            out = tmp if out is None else out + tmp
        else:
            if x.shape[1] != m["cin"]:
                x = torch.cat([x, skips.pop()], dim=1)
            x = ref_block(m, x, emb)
    return out


def ref_edm_precond(spec, x, sigma, class_labels=None, augment_labels=None, sigma_data=0.5):
    """EDMPrecond: D(x, σ) = c_skip·x + c_out·F(c_in·x, ln(σ)/4)."""
    s = sigma.double().reshape(-1, 1, 1, 1)
    c_skip = sigma_data**2 / (s**2 + sigma_data**2)
    c_out = s * sigma_data / (s**2 + sigma_data**2).sqrt()
    c_in = 1 / (sigma_data**2 + s**2).sqrt()
    F_x = ref_forward(spec, c_in * x.double(), s.log().flatten() / 4, class_labels, augment_labels)
    return c_skip * x.double() + c_out * F_x


# ---------------------------------------------------------------- snapshots as EDM writes them

ARCH = {  # EDM train.py's --arch options, shrunk (16×16, 16 channels, 3 levels, 1 block)
    "ddpmpp": dict(embedding_type="positional", encoder_type="standard", decoder_type="standard",
                   channel_mult_noise=1, resample_filter=[1, 1]),
    "ncsnpp": dict(embedding_type="fourier", encoder_type="residual", decoder_type="standard",
                   channel_mult_noise=2, resample_filter=[1, 3, 3, 1]),
}  # fmt: skip
SMALL = dict(model_channels=16, channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[8], augment_dim=9, dropout=0.13)


def edm_kwargs(arch: str, label_dim: int, resolution: int = 16) -> dict:
    """SongUNet._init_kwargs as EDM records them: EDMPrecond passes img_resolution, in/out
    channels and label_dim, then train.py's network options."""
    return dict(img_resolution=resolution, in_channels=3, out_channels=3, label_dim=label_dim, **ARCH[arch], **SMALL)


def edm_snapshot(kw: dict, precond: str = "EDMPrecond", seed: int = 0, **precond_attrs):
    """(pickle bytes of dict(ema=…, loss_fn=…, augment_pipe=…, dataset_kwargs=…), reference spec)."""
    net, spec = ref_songunet(kw, seed)
    model_kw = {k: v for k, v in kw.items() if k not in ("img_resolution", "in_channels", "out_channels", "label_dim")}
    attrs = dict(img_resolution=kw["img_resolution"], img_channels=kw["in_channels"], label_dim=kw["label_dim"],
                 use_fp16=False, sigma_min=0, sigma_max=float("inf"), sigma_data=0.5)  # fmt: skip
    attrs.update(precond_attrs)
    ema = EDMRecord(
        precond,
        attrs=attrs,
        modules=dict(model=net),
        init_kwargs=dict(img_resolution=kw["img_resolution"], img_channels=kw["in_channels"],
                         label_dim=kw["label_dim"], use_fp16=False, model_type="SongUNet", **model_kw),
    )  # fmt: skip
    augment = dict(p=0.12, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)
    snapshot = dict(
        ema=ema,
        loss_fn=EDMRecord("EDMLoss", attrs=dict(P_mean=-1.2, P_std=1.2, sigma_data=0.5), init_kwargs={}),
        augment_pipe=EDMRecord("AugmentPipe", attrs={k: float(v) for k, v in augment.items()}, init_kwargs=augment),
        dataset_kwargs=EasyDict(class_name="training.dataset.ImageFolderDataset", path="datasets/cifar10-32x32.zip",
                                use_labels=bool(kw["label_dim"]), xflip=False, cache=True,
                                resolution=kw["img_resolution"], max_size=np.int64(50000)),
    )  # fmt: skip
    return edm_snapshot_bytes(snapshot), spec


def inputs(kw, batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, kw["img_resolution"], kw["img_resolution"], generator=g)
    sigma = torch.tensor([0.02, 0.7, 25.0])[:batch]
    labels = F.one_hot(torch.randint(0, 10, (batch,), generator=g), 10).float() if kw["label_dim"] else None
    augment = torch.randn(batch, 9, generator=g) * 0.5  # EDM's augment labels are small real numbers
    return x, sigma, labels, augment


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.double() - ref).abs().max() / ref.abs().max())


# ---------------------------------------------------------------- the conversion, end to end


@pytest.mark.parametrize("label_dim", [0, 10], ids=["uncond", "cond"])
@pytest.mark.parametrize("arch", ["ddpmpp", "ncsnpp"])
def test_converted_snapshot_matches_edm_forward(tmp_path, arch, label_dim):
    kw = edm_kwargs(arch, label_dim)
    data, spec = edm_snapshot(kw)
    path = tmp_path / "network-snapshot-000000.pkl"
    path.write_bytes(data)

    snap = cm_nets.read_edm_snapshot(path)
    assert snap.precond == "EDMPrecond" and snap.model_class == "SongUNet" and snap.sigma_data == 0.5
    assert snap.model_kwargs == kw and snap.kwargs_source == "constructor arguments recorded by EDM"
    assert snap.architecture == {"ddpmpp": "DDPM++", "ncsnpp": "NCSN++"}[arch]
    assert snap.dataset_kwargs["max_size"] == 50000 and snap.dataset_kwargs["use_labels"] == bool(label_dim)

    net = cm_nets.from_edm(path).eval()  # no preset: read from the snapshot
    preset = {"ddpmpp": "ddpmpp-cifar10", "ncsnpp": "ncsnpp-cifar10"}[arch]
    overrides = net.cm_nets_config["overrides"]
    assert net.cm_nets_config["preset"] == preset
    assert overrides["augment_dim"] == 9 and overrides["img_resolution"] == 16
    assert overrides.get("label_dim", 0) == label_dim and "dropout" not in overrides  # 0.13 is the preset's

    x, sigma, labels, augment = inputs(kw)
    cond = dict(augment_labels=augment, **({"class_labels": labels} if label_dim else {}))
    # The raw network F(x_in, c_noise) …
    c_noise = sigma.log() / 4
    with torch.no_grad():
        raw = net(x, c_noise, **cond)
    ref_raw = ref_forward(spec, x, c_noise, labels, augment)
    assert rel_err(raw, ref_raw) < 1e-5, rel_err(raw, ref_raw)
    # … and D(x, σ) through cm_core's EDM preconditioning, in float32 against float64.
    cm_core = pytest.importorskip("cm_core")
    with torch.no_grad():
        D = cm_core.EDMDenoiser(net, 0.5, "edm")(x, sigma, **cond)
    ref_D = ref_edm_precond(spec, x, sigma, labels, augment)
    assert D.dtype == torch.float32 and rel_err(D, ref_D) < 1e-5, rel_err(D, ref_D)
    # Without augment labels EDM skips map_augment; so do we.
    cond.pop("augment_labels")
    with torch.no_grad():
        plain = net(x, c_noise, **cond)
    assert rel_err(plain, ref_forward(spec, x, c_noise, labels, None)) < 1e-5

    # save / load rebuilds it from the recorded overrides.
    back = cm_nets.load(cm_nets.save(net, tmp_path / "net.safetensors")).eval()
    assert back.cm_nets_config == net.cm_nets_config
    with torch.no_grad():
        assert torch.equal(back(x, c_noise, **cond), plain)


def test_the_noise_embedding_halves_are_swapped_for_both_types(tmp_path):
    """EDM swaps [cos, sin] → [sin, cos] after map_noise whatever its type: undoing the swap for
    NCSN++ (the old behaviour) must break the agreement with EDM's forward."""
    kw = edm_kwargs("ncsnpp", 0)
    data, spec = edm_snapshot(kw)
    net = cm_nets.from_edm(io.BytesIO(data)).eval()
    x, sigma, _, augment = inputs(kw)
    c_noise = sigma.log() / 4
    ref = ref_forward(spec, x, c_noise, None, augment)
    with torch.no_grad():
        assert rel_err(net(x, c_noise, augment_labels=augment), ref) < 1e-5
    fourier = net.map_noise.forward

    def pre_swapped(c):  # swapped here and again by SongUNet: the old NCSN++ path, [cos, sin]
        e = fourier(c)
        return e.reshape(e.shape[0], 2, -1).flip(1).reshape(e.shape)

    net.map_noise.forward = pre_swapped
    with torch.no_grad():
        assert rel_err(net(x, c_noise, augment_labels=augment), ref) > 1e-2


def test_full_cifar10_architecture_from_recorded_kwargs():
    """EDM's real CIFAR-10 DDPM++ (train.py --arch=ddpmpp --augment 0.12): the recorded
    arguments map to ddpmpp-cifar10 with only augment_dim overridden; 55,732,739 + 9·128 parameters."""
    kw = dict(img_resolution=32, in_channels=3, out_channels=3, label_dim=0, **ARCH["ddpmpp"],
              model_channels=128, channel_mult=[2, 2, 2], augment_dim=9, dropout=0.13)  # fmt: skip
    snap = cm_nets.EDMSnapshot(
        state_dict={}, model_class="SongUNet", model_kwargs=kw, kwargs_source="", precond="EDMPrecond"
    )
    assert cm_nets.edm_architecture(snap) == ("ddpmpp-cifar10", {"augment_dim": 9})
    ncsn = dict(kw, **ARCH["ncsnpp"], label_dim=10)
    snap = cm_nets.EDMSnapshot(state_dict={}, model_class="SongUNet", model_kwargs=ncsn, kwargs_source="", precond=None)
    assert cm_nets.edm_architecture(snap) == ("ncsnpp-cifar10", {"label_dim": 10, "augment_dim": 9})
    with torch.device("meta"):
        net = cm_nets.create("ddpmpp-cifar10", augment_dim=9)
    assert cm_nets.count_parameters(net) == 55_732_739 + 9 * 128


def test_ect_snapshot_and_shape_inference(tmp_path):
    """ECT's ECMPrecond (boundary σ_min 0.003) converts; a pickle without _init_kwargs falls back
    to the preconditioner's arguments, then to the tensor shapes."""
    kw = dict(edm_kwargs("ddpmpp", 0), augment_dim=0)
    data, spec = edm_snapshot(kw, "ECMPrecond", sigma_min=0.003)
    snap = cm_nets.read_edm_snapshot(io.BytesIO(data))
    assert snap.precond == "ECMPrecond" and snap.sigma_min == 0.003 and "boundary σ_min 0.003" in snap.describe()
    net = cm_nets.from_edm(snap).eval()
    x, sigma, _, _ = inputs(kw)
    with torch.no_grad():
        assert rel_err(net(x, sigma.log() / 4), ref_forward(spec, x, sigma.log() / 4)) < 1e-5

    rec, _ = ref_songunet(edm_kwargs("ncsnpp", 10), seed=3)
    rec.init_kwargs = None  # persistence with _record_init_args = False
    precond = EDMRecord("EDMPrecond", attrs=dict(sigma_data=0.5), modules=dict(model=rec))
    snap = cm_nets.read_edm_snapshot(io.BytesIO(edm_snapshot_bytes({"ema": precond})))
    assert snap.kwargs_source == "architecture inferred from the tensor shapes"
    inferred = {k: v for k, v in edm_kwargs("ncsnpp", 10).items() if k != "dropout"}
    assert snap.model_kwargs == {**inferred, "channel_mult_emb": 4}
    cm_nets.from_edm(snap)  # strict load succeeds


@pytest.mark.parametrize(
    "precond,model,match",
    [
        ("VPPrecond", "SongUNet", "VPPrecond.*baseline"),
        ("VEPrecond", "SongUNet", "VEPrecond"),
        ("EDMPrecond", "DhariwalUNet", "DhariwalUNet.*not convert"),
        ("EDMLoss", None, "EDMLoss, not an EDM network"),
    ],
)
def test_unsupported_networks_say_what_is_supported(precond, model, match):
    inner = {"model": EDMRecord(model, modules={})} if model else {}
    data = edm_snapshot_bytes({"ema": EDMRecord(precond, modules=inner)})
    with pytest.raises(ValueError, match=match) as info:
        cm_nets.read_edm_snapshot(io.BytesIO(data))
    assert "supported: EDMPrecond" in str(info.value)


def test_wrong_preset_and_missing_key_are_clear_errors(tmp_path):
    kw = edm_kwargs("ddpmpp", 0)
    data, _ = edm_snapshot(kw)
    with pytest.raises(ValueError, match="positional embedding.*'ncsnpp-cifar10'.*leave the preset out"):
        cm_nets.from_edm(io.BytesIO(data), "ncsnpp-cifar10")
    with pytest.raises(ValueError, match="not a SongUNet preset"):
        cm_nets.from_edm(io.BytesIO(data), "adm-imagenet64")
    with pytest.raises(ValueError, match="no entry 'net'.*augment_pipe.*dataset_kwargs.*ema"):
        cm_nets.from_edm(io.BytesIO(data), key="net")
    with pytest.raises(ValueError, match="do not fit preset 'ddpmpp-cifar10'.*unexpected: map_augment.weight"):
        cm_nets.from_edm(io.BytesIO(data), augment_dim=0)
    (tmp_path / "junk.pkl").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="junk.pkl is not a readable pickle"):
        cm_nets.from_edm(tmp_path / "junk.pkl")
    # the preset as a check, and overrides that do not touch the tensors
    net = cm_nets.from_edm(io.BytesIO(data), "ddpmpp-cifar10", dropout=0.2, attention_backend="math")
    assert net.cm_nets_config["overrides"]["dropout"] == 0.2


# ---------------------------------------------------------------- the unpickler's allow-list


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_numpy_scalars_dtypes_and_arrays_are_read_as_data(protocol):
    values = {
        "skip_scale": np.sqrt(0.5),
        "f32": np.float32(1.5),
        "i64": np.int64(-3),
        "flag": np.bool_(True),
        "dtype": np.dtype(">i4"),
        "array": np.arange(6, dtype=np.float32).reshape(2, 3),
        "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
        "text": np.array(["ab", "c"]),
        "set": {1, 2},
    }
    got = cm_nets.convert._RestrictedUnpickler(io.BytesIO(pickle.dumps(values, protocol=protocol))).load()
    assert type(got["skip_scale"]) is np.float64 and got["skip_scale"] == np.sqrt(0.5)
    assert type(got["f32"]) is np.float32 and type(got["i64"]) is np.int64
    assert type(got["flag"]) is np.bool_ and bool(got["flag"])
    assert got["dtype"].resolve() == np.dtype(">i4")
    for name in ("array", "fortran", "text"):
        assert isinstance(got[name], np.ndarray) and got[name].dtype == values[name].dtype
        np.testing.assert_array_equal(got[name], values[name])
    assert got["set"] == {1, 2}


@pytest.mark.parametrize(
    "payload,match",
    [
        (RunsShellCommand(), "refusing to load global (os|posix).system"),
        (RunsEval(), r"refusing to load global (__builtin__|builtins)\.eval"),
        (np.array([1, "a"], dtype=object), "refusing numpy dtype 'O8'"),
        (np.float64, "refusing to load global numpy.float64"),
        (np.zeros(2, dtype=[("a", "f4")]), "refusing numpy dtype 'V4'"),
    ],
    ids=["os.system", "eval", "object-array", "numpy-class", "structured"],
)
@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_code_and_object_arrays_are_refused_inside_a_snapshot(payload, match, protocol):
    kw = dict(edm_kwargs("ddpmpp", 0), augment_dim=0)
    net, _ = ref_songunet(kw)
    net.attrs["payload"] = payload  # hidden deep inside the network's state
    data = edm_snapshot_bytes({"ema": EDMRecord("EDMPrecond", modules=dict(model=net))}, protocol=protocol)
    with pytest.raises(cm_nets.UnsafePickleError, match=match):
        cm_nets.read_edm_snapshot(io.BytesIO(data))


class _ObjectScalar:
    # numpy.core.multiarray.scalar(dtype('O'), obj) would hand back whatever object the pickle built.
    def __reduce__(self):
        return (np._core.multiarray.scalar, (np.dtype(object), ["payload"]))


def test_object_dtype_scalar_is_refused():
    data = pickle.dumps({"x": _ObjectScalar()})
    with pytest.raises(cm_nets.UnsafePickleError, match="refusing numpy dtype 'O8'"):
        cm_nets.read_edm_pickle(io.BytesIO(data))


# ---------------------------------------------------------------- Conv2d's resampling paths


@pytest.mark.parametrize("filt", [(1, 1), (1, 3, 3, 1)])
@pytest.mark.parametrize("mode", ["up", "down", "fused-up", "fused-down"])
@pytest.mark.parametrize("kernel", [1, 3])
def test_conv2d_resampling_matches_edm(mode, filt, kernel):
    from cm_nets.song import Conv2d

    up, down, fused = "up" in mode, "down" in mode, "fused" in mode
    ref, spec = RefBuilder(0).conv(4, 6, kernel, up, down, filt, fused)
    ours = Conv2d(4, 6, kernel, up=up, down=down, resample_filter=filt, fused_resample=fused)
    ours.load_state_dict({k: v for k, v in dict(weight=spec["w"], bias=spec["b"], resample_filter=spec["f"]).items()})
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = ref_module(spec, x.double())
    with torch.no_grad():
        got = ours(x)
    assert got.shape == expected.shape == (2, 6, 16 if up else 4, 16 if up else 4)
    assert rel_err(got, expected) < 1e-6

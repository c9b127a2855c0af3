"""EDM's SongUNet (Karras et al. 2022, ``training/networks.py``): the DDPM++ and NCSN++
architectures of Song et al. 2021 as used by EDM, ECT and CDM on CIFAR-10.

Module names follow EDM's (``map_noise``, ``map_layer0``, ``enc['32x32_block0'].conv0``, …) so
the tensors of an EDM snapshot map one to one (see :mod:`cm_nets.convert`). ``bcm=True`` adds a
second time input ``c_noise_end`` (BCM's end time, MeanFlow's t − r), as in ``ADMUNet`` and ``MLPToy``;
``ada_norm="double"`` gives the blocks sCM's adaptive double normalization (Lu & Song 2025).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .backends import attention_qkv, check_backend
from .layers import FourierEmbedding, check_ada_norm, check_c_noise, pixel_norm, sinusoidal_embedding


def weight_init(shape, mode: str, fan_in: int, fan_out: int) -> torch.Tensor:
    if mode == "xavier_uniform":
        return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == "xavier_normal":
        return math.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == "kaiming_uniform":
        return math.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == "kaiming_normal":
        return math.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(
        f"init mode must be one of xavier_uniform, xavier_normal, kaiming_uniform, kaiming_normal; got {mode!r}"
    )


class Linear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        init_mode: str = "kaiming_normal",
        init_weight: float = 1.0,
        init_bias: float = 0.0,
    ):
        super().__init__()
        self.in_features = in_features
        kw = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = nn.Parameter(weight_init([out_features, in_features], **kw) * init_weight)
        self.bias = nn.Parameter(weight_init([out_features], **kw) * init_bias) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class Conv2d(nn.Module):
    """Convolution with optional FIR up/down-sampling (``resample_filter``, separable, normalized)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        bias: bool = True,
        up: bool = False,
        down: bool = False,
        resample_filter: Sequence[int] = (1, 1),
        fused_resample: bool = False,
        init_mode: str = "kaiming_normal",
        init_weight: float = 1.0,
        init_bias: float = 0.0,
    ):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down, self.fused_resample = up, down, fused_resample
        kw = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        self.weight = (
            nn.Parameter(weight_init([out_channels, in_channels, kernel, kernel], **kw) * init_weight)
            if kernel
            else None
        )
        self.bias = nn.Parameter(weight_init([out_channels], **kw) * init_bias) if kernel and bias else None
        f = torch.as_tensor(resample_filter, dtype=torch.float32)
        f = f.outer(f)[None, None] / f.sum().square()
        self.register_buffer("resample_filter", f if up or down else None)

    def forward(self, x):
        w = self.weight.to(x.dtype) if self.weight is not None else None
        b = self.bias.to(x.dtype) if self.bias is not None else None
        f = self.resample_filter.to(x.dtype) if self.resample_filter is not None else None
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        if self.fused_resample and self.up and w is not None:
            # EDM's padding: the transposed FIR pass crops max(f_pad − w_pad, 0), the convolution pads
            # max(w_pad − f_pad, 0), so the output is 2H × 2W (e.g. FIR [1,3,3,1] with a 3×3 kernel: the
            # full 2H+2 up-sampled map, then an unpadded 3×3 convolution).
            x = F.conv_transpose2d(
                x,
                f.mul(4).tile([self.in_channels, 1, 1, 1]),
                groups=self.in_channels,
                stride=2,
                padding=max(f_pad - w_pad, 0),
            )
            x = F.conv2d(x, w, padding=max(w_pad - f_pad, 0))
        elif self.fused_resample and self.down and w is not None:
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = F.conv2d(x, f.tile([self.out_channels, 1, 1, 1]), groups=self.out_channels, stride=2)
        else:
            if self.up:
                x = F.conv_transpose2d(
                    x, f.mul(4).tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2, padding=f_pad
                )
            if self.down:
                x = F.conv2d(x, f.tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2, padding=f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        if b is not None:
            x = x + b.reshape(1, -1, 1, 1)
        return x


class GroupNorm(nn.Module):
    """EDM GroupNorm: min(32, C/4) groups, computed in float32, returned in the input dtype."""

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4, eps: float = 1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x):
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


class UNetBlock(nn.Module):
    """EDM's unified block: GN–SiLU–conv0(up/down), + affine(emb), GN–SiLU–dropout–conv1, + skip,
    ·skip_scale, then optional self-attention (qkv channel order (heads, d, three)).

    ``adaptive_scale=False``: the affine output is added before norm1 (EDM's DDPM++ / NCSN++).
    ``adaptive_scale=True``: it is [s, b] (2C wide) and ``ada_norm`` picks the modulation:
    ``"plain"`` is EDM's ``norm1(x)·(s + 1) + b``, ``"double"`` sCM's adaptive double
    normalization ``norm1(x)·pnorm(s) + pnorm(b)`` (pnorm = :func:`~cm_nets.layers.pixel_norm` over
    the C channels of each sample's s and b; no "+ 1": pnorm(s) already has unit RMS). ``"double"``
    needs ``adaptive_scale=True``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        up=False,
        down=False,
        attention=False,
        num_heads=None,
        channels_per_head=64,
        dropout=0.0,
        skip_scale=1.0,
        eps=1e-5,
        resample_filter=(1, 1),
        resample_proj=False,
        adaptive_scale=True,
        init=None,
        init_zero=None,
        init_attn=None,
        attention_backend="auto",
        ada_norm="plain",
    ):
        super().__init__()
        check_ada_norm(ada_norm)
        if ada_norm == "double" and not adaptive_scale:
            raise ValueError("ada_norm='double' normalizes AdaGN's scale and shift: it needs adaptive_scale=True")
        self.ada_norm = ada_norm
        init = init or {}
        init_zero = init_zero if init_zero is not None else dict(init_weight=0)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.num_heads = (
            0 if not attention else num_heads if num_heads is not None else out_channels // channels_per_head
        )
        self.dropout, self.skip_scale, self.adaptive_scale = dropout, skip_scale, adaptive_scale
        self.attention_backend = attention_backend
        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down, resample_filter=resample_filter, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, 3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(
                in_channels, out_channels, kernel, up=up, down=down, resample_filter=resample_filter, **init
            )
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, 1, **(init_attn if init_attn is not None else init))
            self.proj = Conv2d(out_channels, out_channels, 1, **init_zero)

    def forward(self, x, emb):
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))
        if self.ada_norm == "double":  # pnorm of the affine output before the cast (>= float32 inside)
            s, b = self.affine(emb).chunk(2, dim=1)
            scale, shift = (pixel_norm(v)[:, :, None, None].to(x.dtype) for v in (s, b))
            x = F.silu(torch.addcmul(shift, self.norm1(x), scale))
        elif self.adaptive_scale:
            scale, shift = self.affine(emb)[:, :, None, None].to(x.dtype).chunk(2, dim=1)
            x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = F.silu(self.norm1(x + self.affine(emb)[:, :, None, None].to(x.dtype)))
        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = (x + (self.skip(orig) if self.skip is not None else orig)) * self.skip_scale
        if self.num_heads:
            B, C, H, W = x.shape
            qkv = self.qkv(self.norm2(x)).reshape(B, 3 * C, H * W)
            a = attention_qkv(qkv, self.num_heads, layout="heads_d_three", backend=self.attention_backend)
            x = (self.proj(a.reshape(B, C, H, W)) + x) * self.skip_scale
        return x


class SongUNet(nn.Module):
    """DDPM++ (``embedding_type="positional"``, ``encoder_type="standard"``, filter [1,1]) and
    NCSN++ (``"fourier"``, ``"residual"``, filter [1,3,3,1], ``channel_mult_noise=2``); defaults
    are EDM's. ``forward(x_in, c_noise, class_labels=None, augment_labels=None, *, c_noise_end=None)``.

    ``bcm=True`` adds an end-time mapping network for ``c_noise_end`` (BCM's end time; MeanFlow's
    t − r): the same embedding as ``c_noise`` (positional, or its own random Fourier features
    ``map_noise_end``), then ``map_layer0_end`` → SiLU → ``map_layer1_end``, added to the output of
    ``map_layer1`` before its SiLU. ``map_layer1_end`` is zero-initialized, so at initialization
    the output does not depend on ``c_noise_end`` and equals that of the network without the
    branch (same seed, or the same weights loaded with ``strict=False``). A ``bcm=True`` network
    requires ``c_noise_end``; the default one refuses it.

    ``ada_norm="double"`` (default ``"plain"``: EDM's blocks, unchanged) is sCM's adaptive double
    normalization (Lu & Song 2025, §4.1): every block's ``affine`` becomes 2C wide and modulates
    norm1 as ``norm1(x)·pnorm(s) + pnorm(b)`` instead of adding the embedding (see
    :class:`UNetBlock`). Its affine tensors differ in shape, so EDM snapshots do not load into it."""

    def __init__(
        self,
        img_resolution: int = 32,
        in_channels: int = 3,
        out_channels: int = 3,
        label_dim: int = 0,
        augment_dim: int = 0,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        channel_mult_emb: int = 4,
        num_blocks: int = 4,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.10,
        label_dropout: float = 0.0,
        embedding_type: str = "positional",
        channel_mult_noise: int = 1,
        encoder_type: str = "standard",
        decoder_type: str = "standard",
        resample_filter: Sequence[int] = (1, 1),
        attention_backend: str = "auto",
        bcm: bool = False,
        fourier_scale: float = 16.0,
        ada_norm: str = "plain",
    ):
        if not fourier_scale > 0:
            raise ValueError(f"fourier_scale must be > 0, got {fourier_scale}")
        check_ada_norm(ada_norm)
        for name, value, valid in (
            ("embedding_type", embedding_type, ("fourier", "positional")),
            ("encoder_type", encoder_type, ("standard", "skip", "residual")),
            ("decoder_type", decoder_type, ("standard", "skip")),
        ):
            if value not in valid:
                raise ValueError(f"{name} must be one of {valid}, got {value!r}")
        check_backend(attention_backend)
        super().__init__()
        self.label_dim, self.label_dropout, self.embedding_type = label_dim, label_dropout, embedding_type
        self.ada_norm = ada_norm
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        self.noise_channels = noise_channels
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        init_attn = dict(init_mode="xavier_uniform", init_weight=math.sqrt(0.2))
        block_kwargs = dict(
            emb_channels=emb_channels,
            num_heads=1,
            dropout=dropout,
            skip_scale=math.sqrt(0.5),
            eps=1e-6,
            resample_filter=resample_filter,
            resample_proj=True,
            adaptive_scale=ada_norm == "double",  # sCM: pnorm'd scale and shift instead of an added embedding
            init=init,
            init_zero=init_zero,
            init_attn=init_attn,
            attention_backend=attention_backend,
            ada_norm=ada_norm,
        )

        # fourier_scale: NCSN++'s 16; continuous-time objectives (sCM) differentiate in t and want a
        # low-frequency embedding (the sCM paper uses 0.02 with c_noise = t).
        self.map_noise = FourierEmbedding(noise_channels, fourier_scale) if embedding_type == "fourier" else None
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        self.enc = nn.ModuleDict()
        cout = caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, 3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(
                        caux, caux, 0, down=True, resample_filter=resample_filter
                    )
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(caux, cout, 1, **init)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(
                        caux, cout, 3, down=True, resample_filter=resample_filter, fused_resample=True, **init
                    )
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(
                    cin, cout, attention=res in attn_resolutions, **block_kwargs
                )
        skips = [block.out_channels for name, block in self.enc.items() if "aux" not in name]

        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attn = idx == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **block_kwargs)
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(
                        out_channels, out_channels, 0, up=True, resample_filter=resample_filter
                    )
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, 3, **init_zero)

        # Built last, so that every other tensor draws the same random numbers as with bcm=False
        # (a bcm=True network and a default one from the same seed agree until the branch trains).
        self.bcm = bool(bcm)
        if self.bcm:
            self.map_noise_end = FourierEmbedding(noise_channels, fourier_scale) if embedding_type == "fourier" else None
            self.map_layer0_end = Linear(noise_channels, emb_channels, **init)
            self.map_layer1_end = Linear(emb_channels, emb_channels, init_mode="xavier_uniform", init_weight=0)

    def _embed_noise(self, c_noise: torch.Tensor, fourier: FourierEmbedding | None) -> torch.Tensor:
        B = c_noise.shape[0]
        if fourier is not None:  # NCSN++: random Fourier features [cos, sin]
            emb = fourier(c_noise)
        else:  # DDPM++: EDM's PositionalEmbedding(endpoint=True), [cos, sin]
            emb = sinusoidal_embedding(c_noise, self.noise_channels, endpoint=True)
        # EDM's SongUNet.forward swaps the two halves ([cos, sin] → [sin, cos]) whatever the embedding
        # type; its DDPM++ and NCSN++ weights were trained on the swapped order.
        emb = emb.reshape(B, 2, -1).flip(1).reshape(B, -1)
        return emb.to(self.map_layer0.weight.dtype)

    def forward(
        self,
        x_in: torch.Tensor,
        c_noise: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        augment_labels: torch.Tensor | None = None,
        *,
        c_noise_end: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B = x_in.shape[0]
        if self.bcm and c_noise_end is None:
            raise ValueError(
                "this SongUNet was built with bcm=True and needs c_noise_end (the end time, same convention as c_noise)"
            )
        if not self.bcm and c_noise_end is not None:
            raise ValueError(
                "c_noise_end given but this SongUNet has no end-time embedding "
                "(create it with bcm=True, e.g. cm_nets.create('ddpmpp-cifar10', bcm=True))"
            )
        emb = self._embed_noise(check_c_noise(c_noise, B), self.map_noise)
        if self.map_label is not None:
            if class_labels is None:
                raise ValueError(
                    f"class_labels [B, {self.label_dim}] (one-hot) is required: label_dim={self.label_dim}"
                )
            if not class_labels.is_floating_point():
                class_labels = F.one_hot(class_labels.long(), self.label_dim)
            tmp = class_labels.to(emb.dtype).reshape(B, self.label_dim)
            if self.training and self.label_dropout:
                tmp = tmp * (torch.rand([B, 1], device=x_in.device) >= self.label_dropout).to(tmp.dtype)
            emb = emb + self.map_label(tmp * math.sqrt(self.label_dim))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels.to(emb.dtype))
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.bcm:
            end = self._embed_noise(check_c_noise(c_noise_end, B, "c_noise_end"), self.map_noise_end)
            emb = emb + self.map_layer1_end(F.silu(self.map_layer0_end(end)))
        emb = F.silu(emb)

        x = x_in
        skips = []
        aux = x
        for name, block in self.enc.items():
            if "aux_down" in name:
                aux = block(aux)
            elif "aux_skip" in name:
                x = skips[-1] = x + block(aux)
            elif "aux_residual" in name:
                x = skips[-1] = aux = (x + block(aux)) / math.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)
        aux = tmp = None
        for name, block in self.dec.items():
            if "aux_up" in name:
                aux = block(aux)
            elif "aux_norm" in name:
                tmp = block(x)
            elif "aux_conv" in name:
                tmp = block(F.silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return aux

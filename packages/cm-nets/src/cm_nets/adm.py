"""ADM UNet (Dhariwal & Nichol 2021) as used by openai/consistency_models, iCT and BCM.

Module names and tensor shapes reproduce openai's ``UNetModel`` state_dict exactly
(``time_embed.{0,2}``, ``label_emb``, ``input_blocks.N.M``, ``middle_block.{0,1,2}``,
``output_blocks.N.M``, ``out.{0,2}``), so the published checkpoints load with ``strict=True``.
Options from the BCM seed (Li & He 2024): attention resolutions without 32×32 ("no32"),
normalized ("cosine") q/k/v, per-level high-resolution dropout, and the bidirectional
``t_end`` embedding (``bcm=True``); from sCM (Lu & Song 2025): adaptive double normalization
(``ada_norm="double"``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .backends import NORMALIZE_MODES, attention_qkv, check_backend
from .layers import GroupNorm32, check_ada_norm, check_c_noise, embed_labels, pixel_norm, sinusoidal_embedding


class EmbedSequential(nn.Sequential):
    """nn.Sequential that hands the embedding to the children that take one (openai's
    ``TimestepEmbedSequential``; the name does not appear in state_dict keys)."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class Downsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2, 2)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        if use_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.use_conv = use_conv

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class ResBlock(nn.Module):
    """GN–SiLU–conv, + embedding (added, or FiLM scale/shift on the second GN), GN–SiLU–dropout–
    zero-init conv, + skip; optional nearest-up / avg-pool-down between the first SiLU and conv.

    With ``use_scale_shift_norm`` the embedding's affine output [s, b] (``emb_layers``, 2C wide)
    modulates the second GroupNorm: ``ada_norm="plain"`` is openai's AdaGN
    ``GN(h) · (1 + s) + b``; ``ada_norm="double"`` is sCM's adaptive double normalization
    ``GN(h) · pnorm(s) + pnorm(b)``, pnorm = :func:`~cm_nets.layers.pixel_norm` over the C
    channels of each sample's s and b separately (unit RMS, eps 1e-8). No "1 +": pnorm(s) already
    has unit RMS (the paper writes AdaGN as ``norm(x) ⊙ s(t) + b(t)`` and normalizes s itself).
    GN keeps its own affine weight and bias, as in the plain block. Same tensors either way."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_scale_shift_norm: bool = False,
        up: bool = False,
        down: bool = False,
        ada_norm: str = "plain",
    ):
        super().__init__()
        check_ada_norm(ada_norm)
        if ada_norm == "double" and not use_scale_shift_norm:
            raise ValueError(
                "ada_norm='double' normalizes AdaGN's scale and shift: it needs use_scale_shift_norm=True"
            )
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.ada_norm = ada_norm
        self.in_layers = nn.Sequential(
            GroupNorm32(32, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, out_channels * (2 if use_scale_shift_norm else 1))
        )
        self.out_layers = nn.Sequential(
            GroupNorm32(32, out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        nn.init.zeros_(self.out_layers[3].weight)
        nn.init.zeros_(self.out_layers[3].bias)
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            h = self.in_layers[2](self.h_upd(self.in_layers[1](self.in_layers[0](x))))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        if self.ada_norm == "double":  # pnorm of the affine output before the cast (>= float32 inside)
            s, b = self.emb_layers(emb).chunk(2, dim=1)
            scale, shift = (pixel_norm(v).to(h.dtype)[:, :, None, None] for v in (s, b))
            h = self.out_layers[0](h) * scale + shift
            h = self.out_layers[3](self.out_layers[2](self.out_layers[1](h)))
        elif self.use_scale_shift_norm:
            scale, shift = self.emb_layers(emb).to(h.dtype)[:, :, None, None].chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[3](self.out_layers[2](self.out_layers[1](h)))
        else:
            h = self.out_layers(h + self.emb_layers(emb).to(h.dtype)[:, :, None, None])
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over pixels: GN → 1×1 qkv (openai channel order (three, heads, d)) →
    attention → zero-init 1×1 proj_out, residual. The 1×1 convs are Conv2d ([3C, C, 1, 1]),
    as in openai/consistency_models; guided-diffusion's Conv1d [3C, C, 1] weights are accepted
    on load and reshaped."""

    def __init__(
        self,
        channels: int,
        num_heads: int,
        normalize: str = "none",
        attention_backend: str = "auto",
        layout: str = "three_heads_d",
    ):
        super().__init__()
        self.num_heads = num_heads
        self.normalize = normalize
        self.attention_backend = attention_backend
        self.layout = layout
        self.norm = GroupNorm32(32, channels)
        self.qkv = nn.Conv2d(channels, channels * 3, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)
        self._register_load_state_dict_pre_hook(_conv1d_to_conv2d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3 * C, H * W)
        h = attention_qkv(
            qkv, self.num_heads, layout=self.layout, backend=self.attention_backend, normalize=self.normalize
        )
        return x + self.proj_out(h.reshape(B, C, H, W))


def _conv1d_to_conv2d(state_dict, prefix, *args, **kwargs):
    for name in ("qkv.weight", "proj_out.weight"):
        w = state_dict.get(prefix + name)
        if w is not None and w.dim() == 3:
            state_dict[prefix + name] = w[..., None]


class ADMUNet(nn.Module):
    """openai ``UNetModel`` (ADM) with the CM / iCT / BCM options.

    Args mirror openai's (``model_channels``, ``num_res_blocks``, ``channel_mult``, …) except
    ``attention_resolutions``, given in pixels (32, 16, 8) as in the training scripts' flags.
    ``dropout_highres`` (BCM/iCT: 0.2) replaces ``dropout`` at the levels with index ≥ 2 and in
    the middle block. ``bcm=True`` adds ``time_embed_end`` (initialized as a copy of
    ``time_embed``) and ``time_embed_align`` (Linear 2E→E, no bias, initialized [I | 0]), so at
    initialization the output does not depend on ``c_noise_end``.

    ``ada_norm``: ``"plain"`` (default, openai's AdaGN ``GN(h)·(1 + s) + b``) or ``"double"``
    (sCM's adaptive double normalization ``GN(h)·pnorm(s) + pnorm(b)``, Lu & Song 2025 §4.1; see
    :class:`ResBlock`). ``"double"`` needs ``use_scale_shift_norm=True`` and has the same tensors,
    so openai checkpoints load into it (as a different function)."""

    def __init__(
        self,
        image_size: int = 64,
        in_channels: int = 3,
        model_channels: int = 192,
        out_channels: int = 3,
        num_res_blocks: int = 3,
        attention_resolutions: Sequence[int] = (32, 16, 8),
        dropout: float = 0.0,
        dropout_highres: float | None = None,
        channel_mult: Sequence[int] = (1, 2, 3, 4),
        conv_resample: bool = True,
        num_classes: int | None = None,
        num_heads: int = 1,
        num_head_channels: int = 64,
        use_scale_shift_norm: bool = True,
        resblock_updown: bool = True,
        attention_normalize: str = "none",
        attention_backend: str = "auto",
        bcm: bool = False,
        ada_norm: str = "plain",
    ):
        super().__init__()
        check_ada_norm(ada_norm)
        if ada_norm == "double" and not use_scale_shift_norm:
            raise ValueError(
                "ada_norm='double' (sCM's adaptive double normalization) normalizes AdaGN's scale and "
                "shift: it needs use_scale_shift_norm=True (this network has none)"
            )
        if attention_normalize not in NORMALIZE_MODES:
            raise ValueError(f"attention_normalize must be one of {NORMALIZE_MODES}, got {attention_normalize!r}")
        check_backend(attention_backend)
        levels = [image_size >> i for i in range(len(channel_mult))]
        bad = [r for r in attention_resolutions if r not in levels]
        if bad:
            raise ValueError(
                f"attention_resolutions {list(bad)} are not UNet levels; for image_size={image_size} "
                f"and {len(channel_mult)} levels the valid resolutions are {levels}"
            )
        if model_channels % 32 or any((model_channels * m) % 32 for m in channel_mult):
            raise ValueError(
                f"model_channels·channel_mult must be multiples of 32 (GroupNorm(32)); "
                f"got model_channels={model_channels}, channel_mult={tuple(channel_mult)}"
            )
        self.image_size, self.in_channels, self.out_channels = image_size, in_channels, out_channels
        self.model_channels, self.num_classes, self.bcm = model_channels, num_classes, bcm
        self.ada_norm = ada_norm
        emb_dim = model_channels * 4

        def heads(ch: int) -> int:
            if num_head_channels == -1:
                return num_heads
            if ch % num_head_channels:
                raise ValueError(f"channels {ch} not divisible by num_head_channels={num_head_channels}")
            return ch // num_head_channels

        def attn(ch: int) -> AttentionBlock:
            return AttentionBlock(ch, heads(ch), attention_normalize, attention_backend)

        def drop(level: int) -> float:
            return dropout_highres if (dropout_highres is not None and level >= 2) else dropout

        res_kw = dict(emb_channels=emb_dim, use_scale_shift_norm=use_scale_shift_norm, ada_norm=ada_norm)
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if bcm:
            self.time_embed_end = nn.Sequential(
                nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
            )
            self.time_embed_end.load_state_dict(self.time_embed.state_dict())
            self.time_embed_align = nn.Linear(2 * emb_dim, emb_dim, bias=False)
            with torch.no_grad():
                self.time_embed_align.weight.zero_()
                self.time_embed_align.weight[:, :emb_dim].copy_(torch.eye(emb_dim))
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, emb_dim)

        ch = input_ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([EmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        skip_chans = [ch]
        res = image_size
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [
                    ResBlock(ch, dropout=drop(level), out_channels=int(mult * model_channels), **res_kw)
                ]
                ch = int(mult * model_channels)
                if res in attention_resolutions:
                    layers.append(attn(ch))
                self.input_blocks.append(EmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(channel_mult) - 1:
                down = (
                    ResBlock(ch, dropout=drop(level), down=True, **res_kw)
                    if resblock_updown
                    else Downsample(ch, conv_resample)
                )
                self.input_blocks.append(EmbedSequential(down))
                skip_chans.append(ch)
                res //= 2

        mid_drop = dropout_highres if dropout_highres is not None else dropout
        self.middle_block = EmbedSequential(
            ResBlock(ch, dropout=mid_drop, **res_kw), attn(ch), ResBlock(ch, dropout=mid_drop, **res_kw)
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [
                    ResBlock(
                        ch + skip_chans.pop(), dropout=drop(level), out_channels=int(model_channels * mult), **res_kw
                    )
                ]
                ch = int(model_channels * mult)
                if res in attention_resolutions:
                    layers.append(attn(ch))
                if level and i == num_res_blocks:
                    layers.append(
                        ResBlock(ch, dropout=drop(level), up=True, **res_kw)
                        if resblock_updown
                        else Upsample(ch, conv_resample)
                    )
                    res *= 2
                self.output_blocks.append(EmbedSequential(*layers))

        self.out = nn.Sequential(GroupNorm32(32, ch), nn.SiLU(), nn.Conv2d(input_ch, out_channels, 3, padding=1))
        nn.init.zeros_(self.out[2].weight)
        nn.init.zeros_(self.out[2].bias)

    def embedding(self, c_noise: torch.Tensor, class_labels=None, c_noise_end=None, batch: int | None = None):
        batch = c_noise.shape[0] if batch is None else batch
        c_noise = check_c_noise(c_noise, batch)
        emb = self.time_embed(sinusoidal_embedding(c_noise, self.model_channels).to(self.time_embed[0].weight.dtype))
        if self.bcm:
            if c_noise_end is None:
                raise ValueError("this BCM network needs c_noise_end (the embedded target time), like c_noise")
            c_noise_end = check_c_noise(c_noise_end, batch, "c_noise_end")
            emb_end = self.time_embed_end(sinusoidal_embedding(c_noise_end, self.model_channels).to(emb.dtype))
            emb = self.time_embed_align(torch.cat([emb, emb_end], dim=-1))
        elif c_noise_end is not None:
            raise ValueError("c_noise_end given but this network has no t_end embedding (create it with bcm=True)")
        if self.num_classes is not None:
            emb = emb + embed_labels(self.label_emb.weight, class_labels, batch, self.num_classes)
        return emb

    def forward(
        self,
        x_in: torch.Tensor,
        c_noise: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        *,
        c_noise_end: torch.Tensor | None = None,
    ) -> torch.Tensor:
        emb = self.embedding(c_noise, class_labels, c_noise_end, batch=x_in.shape[0])
        skips = []
        h = x_in
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)

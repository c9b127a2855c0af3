"""EDM2's magnitude-preserving UNet (Karras et al. 2024, "Analyzing and Improving the Training
Dynamics of Diffusion Models", Figure 21; NVlabs/edm2 ``training/networks_edm2.py``).

Every layer keeps unit expected magnitude: weights are normalized (forced weight normalization,
eq. 66), sums and concatenations are magnitude preserving (eqs. 88, 103), SiLU is rescaled
(eq. 81), attention uses per-head normalized q, k, v. Module names follow EDM2's. ``bcm=True``
adds a second time input ``c_noise_end`` (BCM's end time, MeanFlow's t − r), as in ``ADMUNet``;
``ada_norm="double"`` gives the blocks sCM's adaptive double normalization (Lu & Song 2025, §4.1;
see :class:`Block`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from cm_kernels.reference import vector_norm_fp32
from torch import nn

from .backends import attention_qkv, check_backend
from .layers import check_ada_norm, check_c_noise, pixel_norm


def normalize(x: torch.Tensor, dim=None, eps: float = 1e-4) -> torch.Tensor:
    """x / (eps + ‖x‖·√(numel(norm)/numel(x))) over ``dim`` (default all but the first)."""
    if dim is None:
        dim = list(range(1, x.ndim))
    norm = vector_norm_fp32(x, dim=dim)
    norm = torch.add(eps, norm, alpha=math.sqrt(norm.numel() / x.numel()))
    return x / norm.to(x.dtype)


def resample(x: torch.Tensor, f: Sequence[int] = (1, 1), mode: str = "keep") -> torch.Tensor:
    if mode == "keep":
        return x
    f = torch.as_tensor(f, dtype=torch.float32)
    pad = (len(f) - 1) // 2
    f = f / f.sum()
    f = f.outer(f)[None, None].to(x.dtype).to(x.device)
    c = x.shape[1]
    if mode == "down":
        return F.conv2d(x, f.tile([c, 1, 1, 1]), groups=c, stride=2, padding=(pad,))
    return F.conv_transpose2d(x, (f * 4).tile([c, 1, 1, 1]), groups=c, stride=2, padding=(pad,))


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """Magnitude-preserving SiLU (eq. 81): E[silu(z)²] = 0.596² for z ~ N(0, 1)."""
    return F.silu(x) / 0.596


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """Magnitude-preserving weighted sum (eq. 88)."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t**2)


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """Magnitude-preserving concatenation (eq. 103)."""
    Na, Nb = a.shape[dim], b.shape[dim]
    C = math.sqrt((Na + Nb) / ((1 - t) ** 2 + t**2))
    return torch.cat([C / math.sqrt(Na) * (1 - t) * a, C / math.sqrt(Nb) * t * b], dim=dim)


class MPFourier(nn.Module):
    """Magnitude-preserving Fourier features √2·cos(2π(f·c + φ)) (eq. 75)."""

    def __init__(self, num_channels: int, bandwidth: float = 1.0):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float().outer(self.freqs.float()) + self.phases.float()
        return (y.cos() * math.sqrt(2)).to(x.dtype)


class MPConv(nn.Module):
    """Magnitude-preserving conv / linear (eq. 47) with forced weight normalization (eq. 66):
    in training the stored weight is re-normalized in place before each use."""

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int]):
        super().__init__()
        self.out_channels = out_channels
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def forward(self, x: torch.Tensor, gain=1) -> torch.Tensor:
        w = self.weight.float()
        if self.training:
            with torch.no_grad():
                self.weight.copy_(normalize(w))
        w = normalize(w) * (gain / math.sqrt(w[0].numel()))
        w = w.to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=(w.shape[-1] // 2,))


class Block(nn.Module):
    """EDM2's encoder / decoder block (Figure 21). The embedding modulates the output ``y`` of
    ``conv_res0`` (before ``mp_silu``); ``ada_norm`` picks how:

    - ``"plain"`` (default): EDM2's scale only, ``y · (1 + emb_linear(emb, gain=emb_gain))``, with
      ``emb_linear`` C wide and the learned scalar ``emb_gain`` starting at 0.
    - ``"double"``: sCM's adaptive double normalization (Lu & Song 2025, §4.1) read for EDM2's block:
      ``emb_linear`` (still EDM2's weight-normalized ``MPConv``) is 2C wide, its output split as
      ``[s, b]`` (first C channels s, last C b), and ``y · pnorm(s) + pnorm(b)``, pnorm =
      :func:`~cm_nets.layers.pixel_norm` over the C channels of each sample (unit RMS, eps 1e-8
      inside the root, statistics in at least float32). No "1 +" (as in ``ADMUNet`` / ``SongUNet``:
      pnorm(s) already has unit RMS) and no ``emb_gain``: pnorm(g·v) = sign(g)·pnorm(v) makes a
      scalar gain redundant, and at EDM2's zero initialization it would give s = b = 0, so
      ``y · 0 + 0``: a dead residual branch with a 1/√eps (1e4) gradient on the gain.

    The paper writes the layer for AdaGN, ``norm(x) ⊙ pnorm(s(t)) + pnorm(b(t))``, says that the
    EDM2-based ImageNet networks use it (Tables 2–4) and does not show EDM2's block, which has no
    GroupNorm. Open there, and decided here: the modulated tensor is EDM2's ``y`` as is (EDM2 keeps it
    at unit magnitude by construction), not re-normalized; one public reimplementation also
    pixel-normalizes ``y`` first, another does not. The scalar gain: one reimplementation keeps
    ``emb_gain`` (zero-initialized, see above), one drops it, as here. The pnorm eps: both use EDM2's
    ``normalize`` (eps 1e-4 added to the RMS); here ProGAN's pixel norm, the same as the ADM / SongUNet
    variants. ``y · pnorm(s) + pnorm(b)`` is not magnitude preserving (RMS about √2 for a unit,
    zero-mean ``y``): as in both reimplementations, nothing rescales it (``mp_silu`` and the
    weight-normalized ``conv_res1`` follow)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        flavor: str = "enc",
        resample_mode: str = "keep",
        resample_filter: Sequence[int] = (1, 1),
        attention: bool = False,
        channels_per_head: int = 64,
        dropout: float = 0.0,
        res_balance: float = 0.3,
        attn_balance: float = 0.3,
        clip_act: float | None = 256,
        attention_backend: str = "auto",
        ada_norm: str = "plain",
    ):
        super().__init__()
        self.ada_norm = check_ada_norm(ada_norm)
        self.out_channels, self.flavor = out_channels, flavor
        self.resample_filter, self.resample_mode = tuple(resample_filter), resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout, self.res_balance, self.attn_balance, self.clip_act = dropout, res_balance, attn_balance, clip_act
        self.attention_backend = attention_backend
        if ada_norm == "plain":
            self.emb_gain = nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, kernel=[3, 3])
        self.emb_linear = MPConv(emb_channels, out_channels * (2 if ada_norm == "double" else 1), kernel=[])
        self.conv_res1 = MPConv(out_channels, out_channels, kernel=[3, 3])
        self.conv_skip = MPConv(in_channels, out_channels, kernel=[1, 1]) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, kernel=[1, 1]) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, kernel=[1, 1]) if self.num_heads else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = resample(x, f=self.resample_filter, mode=self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm
        y = self.conv_res0(mp_silu(x))
        if self.ada_norm == "double":  # pnorm of the linear output before the cast (>= float32 inside)
            s, b = self.emb_linear(emb).chunk(2, dim=1)
            scale, shift = (pixel_norm(v)[:, :, None, None].to(y.dtype) for v in (s, b))
            y = mp_silu(y * scale + shift)
        else:
            c = self.emb_linear(emb, gain=self.emb_gain) + 1
            y = mp_silu(y * c[:, :, None, None].to(y.dtype))
        if self.training and self.dropout:
            y = F.dropout(y, p=self.dropout)
        y = self.conv_res1(y)
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)
        if self.num_heads:
            B, C, H, W = x.shape
            qkv = self.attn_qkv(x).reshape(B, 3 * C, H * W)
            y = attention_qkv(
                qkv, self.num_heads, layout="heads_d_three", backend=self.attention_backend, normalize="qkv"
            )
            x = mp_sum(x, self.attn_proj(y.reshape(B, C, H, W)), t=self.attn_balance)
        if self.clip_act is not None:
            x = x.clip(-self.clip_act, self.clip_act)
        return x


class EDM2UNet(nn.Module):
    """EDM2 UNet; defaults are EDM2's (``model_channels=192`` is the S/M/L/XL family's base;
    the presets override it). ``forward(x_in, c_noise, class_labels=None, *, c_noise_end=None)``;
    class labels are integer [B] or one-hot [B, label_dim].

    ``bcm=True`` adds an end-time embedding for ``c_noise_end`` (BCM's end time; MeanFlow's
    t − r): its own ``emb_fourier_end`` → ``emb_noise_end``, mixed into the noise embedding with a
    learned gain ``emb_end_gain`` that starts at 0, so at initialization the output does not depend
    on ``c_noise_end`` and equals that of the network without the branch (same seed, or the same
    weights loaded with ``strict=False``). A ``bcm=True`` network requires ``c_noise_end``; the
    default one refuses it.

    ``ada_norm``: ``"plain"`` (default, EDM2's blocks, unchanged) or ``"double"`` (sCM's adaptive
    double normalization, Lu & Song 2025 §4.1: each block's ``emb_linear`` is 2C wide, [s, b], and
    modulates ``conv_res0``'s output as ``y · pnorm(s) + pnorm(b)`` in place of ``y · (1 + s)``,
    without ``emb_gain``; see :class:`Block`). A ``"double"`` network has other tensors than EDM2's:
    EDM2 checkpoints do not load into it."""

    def __init__(
        self,
        img_resolution: int = 64,
        img_channels: int = 4,
        label_dim: int = 0,
        model_channels: int = 192,
        channel_mult: Sequence[int] = (1, 2, 3, 4),
        channel_mult_noise: int | None = None,
        channel_mult_emb: int | None = None,
        num_blocks: int = 3,
        attn_resolutions: Sequence[int] = (16, 8),
        label_balance: float = 0.5,
        concat_balance: float = 0.5,
        dropout: float = 0.0,
        channels_per_head: int = 64,
        attention_backend: str = "auto",
        bcm: bool = False,
        fourier_bandwidth: float = 1.0,
        ada_norm: str = "plain",
    ):
        if not fourier_bandwidth > 0:
            raise ValueError(f"fourier_bandwidth must be > 0, got {fourier_bandwidth}")
        check_ada_norm(ada_norm)
        check_backend(attention_backend)
        super().__init__()
        cblock = [model_channels * m for m in channel_mult]
        cnoise = model_channels * channel_mult_noise if channel_mult_noise is not None else cblock[0]
        cemb = model_channels * channel_mult_emb if channel_mult_emb is not None else max(cblock)
        self.label_dim, self.label_balance, self.concat_balance = label_dim, label_balance, concat_balance
        self.ada_norm = ada_norm
        self.out_gain = nn.Parameter(torch.zeros([]))
        # fourier_bandwidth: EDM2's 1; below 1 a lower-frequency embedding for objectives that
        # differentiate in time (sCM, MeanFlow).
        self.emb_fourier = MPFourier(cnoise, fourier_bandwidth)
        self.emb_noise = MPConv(cnoise, cemb, kernel=[])
        self.emb_label = MPConv(label_dim, cemb, kernel=[]) if label_dim else None
        kw = dict(
            dropout=dropout, channels_per_head=channels_per_head, attention_backend=attention_backend, ada_norm=ada_norm
        )

        self.enc = nn.ModuleDict()
        cout = img_channels + 1
        for level, channels in enumerate(cblock):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_conv"] = MPConv(cin, cout, kernel=[3, 3])
            else:
                self.enc[f"{res}x{res}_down"] = Block(cout, cout, cemb, flavor="enc", resample_mode="down", **kw)
            for idx in range(num_blocks):
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_block{idx}"] = Block(
                    cin, cout, cemb, flavor="enc", attention=res in attn_resolutions, **kw
                )
        self.dec = nn.ModuleDict()
        skips = [block.out_channels for block in self.enc.values()]
        for level, channels in reversed(list(enumerate(cblock))):
            res = img_resolution >> level
            if level == len(cblock) - 1:
                self.dec[f"{res}x{res}_in0"] = Block(cout, cout, cemb, flavor="dec", attention=True, **kw)
                self.dec[f"{res}x{res}_in1"] = Block(cout, cout, cemb, flavor="dec", **kw)
            else:
                self.dec[f"{res}x{res}_up"] = Block(cout, cout, cemb, flavor="dec", resample_mode="up", **kw)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), channels
                self.dec[f"{res}x{res}_block{idx}"] = Block(
                    cin, cout, cemb, flavor="dec", attention=res in attn_resolutions, **kw
                )
        self.out_conv = MPConv(cout, img_channels, kernel=[3, 3])

        # Built last, so that every other tensor draws the same random numbers as with bcm=False.
        # Why a gain and not a zero-initialized layer: forced weight normalization (eq. 66) cannot
        # hold a zero weight (normalize(0) has gradient 1/eps), and a plain mp_sum with a fixed
        # balance would make the initial output depend on c_noise_end. EDM2's own zero-init device
        # is a learned scalar gain (emb_gain, out_gain); with u the unit-magnitude end embedding
        # and g = emb_end_gain, the noise embedding a becomes (a + g·u)/√(1 + g²): exactly a at
        # g = 0, magnitude preserving for every g (eq. 88 for independent a, u; it is
        # mp_sum(a, u, t) with t = g/(1 + g) for g > −1), with a non-zero gradient for g from the start.
        self.bcm = bool(bcm)
        if self.bcm:
            self.emb_fourier_end = MPFourier(cnoise, fourier_bandwidth)
            self.emb_noise_end = MPConv(cnoise, cemb, kernel=[])
            self.emb_end_gain = nn.Parameter(torch.zeros([]))

    def forward(
        self,
        x_in: torch.Tensor,
        c_noise: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        *,
        c_noise_end: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B = x_in.shape[0]
        if self.bcm and c_noise_end is None:
            raise ValueError(
                "this EDM2UNet was built with bcm=True and needs c_noise_end (the end time, same convention as c_noise)"
            )
        if not self.bcm and c_noise_end is not None:
            raise ValueError(
                "c_noise_end given but this EDM2UNet has no end-time embedding "
                "(create it with bcm=True, e.g. cm_nets.create('edm2-xs', bcm=True))"
            )
        emb = self.emb_noise(self.emb_fourier(check_c_noise(c_noise, B)))
        if self.bcm:
            g = self.emb_end_gain
            end = self.emb_noise_end(self.emb_fourier_end(check_c_noise(c_noise_end, B, "c_noise_end")), gain=g)
            emb = (emb + end.to(emb.dtype)) * (1 + g.square()).rsqrt().to(emb.dtype)
        if self.emb_label is not None:
            if class_labels is None:
                raise ValueError(
                    f"class_labels is required: label_dim={self.label_dim} "
                    f"(integer [B] or one-hot [B, {self.label_dim}])"
                )
            if not class_labels.is_floating_point():
                class_labels = F.one_hot(class_labels.long(), self.label_dim)
            class_labels = class_labels.to(emb.dtype).reshape(B, self.label_dim)
            emb = mp_sum(emb, self.emb_label(class_labels * math.sqrt(self.label_dim)), t=self.label_balance)
        emb = mp_silu(emb)
        x = torch.cat([x_in, torch.ones_like(x_in[:, :1])], dim=1)
        skips = []
        for name, block in self.enc.items():
            x = block(x) if "conv" in name else block(x, emb)
            skips.append(x)
        for name, block in self.dec.items():
            if "block" in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = block(x, emb)
        return self.out_conv(x, gain=self.out_gain)

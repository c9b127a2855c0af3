"""Small networks for vectors (Gaussian-mixture and other toy data on [B, d]) and tiny images."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import check_c_noise, embed_labels, sinusoidal_embedding


class MLPToy(nn.Module):
    """Residual SiLU MLP on [B, dim] with a sinusoidal noise embedding added in every block.

    The embedding uses EDM's positional frequencies (max period ``max_period``, endpoint) scaled
    by ``noise_scale`` so both conventions (EDM ln σ/4 ∈ ~[−1.6, 1.1], openai 250·ln σ) reach the
    informative frequencies; the default 1000 suits EDM's c_noise. The output layer is
    zero-initialized, so a fresh consistency function starts as c_skip·x.

    ``bcm=True`` adds a second embedding for BCM's end time ``c_noise_end`` (its last layer
    zero-initialized, so at init the output does not depend on it); ``dropout`` acts inside
    every block, as in the image networks (iCT/ECT use it).

    ``image_shape=(C, H, W)`` makes it an image network: it takes and returns [B, C, H, W] and
    flattens internally (``dim`` must equal C·H·W). On 8×8 digits this trains ~10× faster per
    step than the smallest UNet on a CPU, which is what the minutes-long demo needs."""

    def __init__(
        self,
        dim: int = 2,
        hidden: int = 256,
        depth: int = 4,
        emb_dim: int = 64,
        noise_scale: float = 1000.0,
        max_period: float = 10000.0,
        num_classes: int | None = None,
        out_dim: int | None = None,
        dropout: float = 0.0,
        bcm: bool = False,
        image_shape: tuple[int, int, int] | None = None,
    ):
        super().__init__()
        if image_shape is not None:
            image_shape = tuple(int(v) for v in image_shape)
            if len(image_shape) != 3 or image_shape[0] * image_shape[1] * image_shape[2] != dim:
                raise ValueError(f"image_shape must be (C, H, W) with C·H·W = dim = {dim}, got {image_shape}")
        self.image_shape = image_shape
        if dim < 1 or hidden < 1 or depth < 1 or emb_dim < 2:
            raise ValueError(
                f"dim, hidden, depth must be >= 1 and emb_dim >= 2; got {dim}, {hidden}, {depth}, {emb_dim}"
            )
        self.dim, self.emb_dim, self.noise_scale, self.max_period = dim, emb_dim, noise_scale, max_period
        self.num_classes = num_classes
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        self.map_noise = nn.Sequential(nn.Linear(emb_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.bcm = bool(bcm)
        if self.bcm:
            self.map_noise_end = nn.Sequential(nn.Linear(emb_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
            nn.init.zeros_(self.map_noise_end[2].weight)
            nn.init.zeros_(self.map_noise_end[2].bias)
        self.drop = nn.Dropout(dropout)
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, hidden)
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                dict(emb=nn.Linear(hidden, hidden), fc0=nn.Linear(hidden, hidden), fc1=nn.Linear(hidden, hidden))
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, out_dim or dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def _sinusoid(self, scaled_noise: torch.Tensor) -> torch.Tensor:
        return sinusoidal_embedding(scaled_noise, self.emb_dim, self.max_period, endpoint=True).to(
            self.inp.weight.dtype
        )

    def forward(
        self,
        x_in: torch.Tensor,
        c_noise: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        c_noise_end: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.image_shape is not None:
            if tuple(x_in.shape[1:]) != self.image_shape:
                raise ValueError(
                    f"x_in must have shape [B, {', '.join(map(str, self.image_shape))}], got {tuple(x_in.shape)}"
                )
            return self._forward(x_in.flatten(1), c_noise, class_labels, c_noise_end).view(x_in.shape)
        if x_in.dim() != 2 or x_in.shape[1] != self.dim:
            raise ValueError(f"x_in must have shape [B, {self.dim}], got {tuple(x_in.shape)}")
        return self._forward(x_in, c_noise, class_labels, c_noise_end)

    def _forward(self, x_in, c_noise, class_labels, c_noise_end):
        B = x_in.shape[0]
        c_noise = check_c_noise(c_noise, B) * self.noise_scale
        emb = self._sinusoid(c_noise)
        emb = self.map_noise(emb)
        if c_noise_end is not None:
            if not self.bcm:
                raise ValueError("c_noise_end given to an MLPToy built without bcm=True (create('mlp-toy', bcm=True))")
            end = check_c_noise(c_noise_end, B) * self.noise_scale
            emb = emb + self.map_noise_end(self._sinusoid(end))
        if self.num_classes is not None:
            emb = emb + embed_labels(self.label_emb.weight, class_labels, B, self.num_classes)
        emb = F.silu(emb)
        h = self.inp(x_in)
        for blk in self.blocks:
            h = h + blk["fc1"](self.drop(F.silu(blk["fc0"](F.silu(h + blk["emb"](emb))))))
        return self.out(F.silu(self.norm(h)))

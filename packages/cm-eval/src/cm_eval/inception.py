"""The Inception-v3 of FID (TF 2015-12-05 graph as ported by pytorch-fid), written here.

It differs from torchvision's ImageNet Inception-v3 in three ways that change FID (Heusel et
al.'s TF graph; pytorch-fid ``FIDInceptionA/C/E_1/E_2``):
- the average-pool branches of the A, C and first E blocks exclude padding from the average
  (TF semantics, ``count_include_pad=False``);
- the pool branch of the last E block (``Mixed_7c``) uses a 3×3 *max* pool;
- the classifier has 1008 outputs (TF's label map), not 1000.

Weights: pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (a plain state dict, 95.6 MB)
loads as is; module and key names follow it (``Conv2d_1a_3x3.conv.weight``, ``…bn.running_var``,
``Mixed_5b.branch1x1.conv.weight``, …, ``fc.weight`` [1008, 2048]).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FIDInceptionV3", "inception_fid"]


class _Conv(nn.Module):
    """Conv (no bias) → BatchNorm (ε = 1e-3, TF's default) → ReLU; keys ``conv.*``, ``bn.*``."""

    def __init__(self, c_in: int, c_out: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x):
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class _BlockA(nn.Module):  # Mixed_5b/5c/5d (35×35)
    def __init__(self, c_in: int, pool_features: int):
        super().__init__()
        self.branch1x1 = _Conv(c_in, 64, 1)
        self.branch5x5_1 = _Conv(c_in, 48, 1)
        self.branch5x5_2 = _Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _Conv(c_in, 64, 1)
        self.branch3x3dbl_2 = _Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, 3, padding=1)
        self.branch_pool = _Conv(c_in, pool_features, 1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_tf_avg_pool(x))], 1)


class _BlockB(nn.Module):  # Mixed_6a: 35×35 → 17×17
    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3 = _Conv(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = _Conv(c_in, 64, 1)
        self.branch3x3dbl_2 = _Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class _BlockC(nn.Module):  # Mixed_6b..6e (17×17), factorized 7×7
    def __init__(self, c_in: int, c7: int):
        super().__init__()
        self.branch1x1 = _Conv(c_in, 192, 1)
        self.branch7x7_1 = _Conv(c_in, c7, 1)
        self.branch7x7_2 = _Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = _Conv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _Conv(c_in, c7, 1)
        self.branch7x7dbl_2 = _Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _Conv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = _Conv(c_in, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for layer in (
            self.branch7x7dbl_1,
            self.branch7x7dbl_2,
            self.branch7x7dbl_3,
            self.branch7x7dbl_4,
            self.branch7x7dbl_5,
        ):
            bd = layer(bd)
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(_tf_avg_pool(x))], 1)


class _BlockD(nn.Module):  # Mixed_7a: 17×17 → 8×8
    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3_1 = _Conv(c_in, 192, 1)
        self.branch3x3_2 = _Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _Conv(c_in, 192, 1)
        self.branch7x7x3_2 = _Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _Conv(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class _BlockE(nn.Module):  # Mixed_7b (avg pool, TF semantics) and Mixed_7c (max pool) at 8×8
    def __init__(self, c_in: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = _Conv(c_in, 320, 1)
        self.branch3x3_1 = _Conv(c_in, 384, 1)
        self.branch3x3_2a = _Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _Conv(c_in, 448, 1)
        self.branch3x3dbl_2 = _Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _Conv(c_in, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pooled = _tf_avg_pool(x) if self.pool == "avg" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """Input float [B, 3, H, W] in [0, 1] → ``{"pool": [B, 2048], "logits": [B, 1008]}``.

    The input is resized to 299×299 bilinearly (align_corners=False, no antialiasing, as
    pytorch-fid) and mapped to [−1, 1]. ``pool`` is the global average pool after Mixed_7c
    (the FID feature, TF's ``pool_3``); ``logits`` the 1008-way classifier (Inception Score
    uses their softmax). Always build it in eval mode (BatchNorm uses running statistics).
    """

    def __init__(self, resize: bool = True):
        super().__init__()
        self.resize = resize
        self.Conv2d_1a_3x3 = _Conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = _Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = _Conv(80, 192, 3)
        self.Mixed_5b = _BlockA(192, 32)
        self.Mixed_5c = _BlockA(256, 64)
        self.Mixed_5d = _BlockA(288, 64)
        self.Mixed_6a = _BlockB(288)
        self.Mixed_6b = _BlockC(768, 128)
        self.Mixed_6c = _BlockC(768, 160)
        self.Mixed_6d = _BlockC(768, 160)
        self.Mixed_6e = _BlockC(768, 192)
        self.Mixed_7a = _BlockD(768)
        self.Mixed_7b = _BlockE(1280, pool="avg")
        self.Mixed_7c = _BlockE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if not torch.is_tensor(x) or not x.is_floating_point() or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(
                f"FIDInceptionV3 expects float images [B, 3, H, W] in [0, 1], got "
                f"{tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}"
            )
        x = x.to(self.fc.weight.dtype)
        if self.resize and x.shape[-2:] != (299, 299):
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (
            self.Mixed_5b,
            self.Mixed_5c,
            self.Mixed_5d,
            self.Mixed_6a,
            self.Mixed_6b,
            self.Mixed_6c,
            self.Mixed_6d,
            self.Mixed_6e,
            self.Mixed_7a,
            self.Mixed_7b,
            self.Mixed_7c,
        ):
            x = block(x)
        pool = x.mean((2, 3))
        return {"pool": pool, "logits": self.fc(pool)}


def _is_optional(key: str) -> bool:
    # BatchNorm's step counter is not part of the ported TF weights; older files lack it.
    return key.endswith("num_batches_tracked")


def inception_fid(weights_path) -> FIDInceptionV3:
    """The FID Inception-v3 in eval mode, with pytorch-fid's weight file loaded as is.

    ``weights_path=None`` (explicitly) gives random weights, for shape tests only (FIDs from it are
    meaningless). Nothing is downloaded; see the README for where the file comes from.
    """
    net = FIDInceptionV3()
    if weights_path is not None:
        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"Inception weights not found at {path}; pass the path of pytorch-fid's "
                "pt_inception-2015-12-05-6726825d.pth (see the cm-eval README)"
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"could not read {path} as a PyTorch state dict with weights_only=True: {e}") from e
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict of the FID Inception-v3")
        expected = net.state_dict()
        missing = sorted(k for k in expected if k not in state and not _is_optional(k))
        unexpected = sorted(k for k in state if k not in expected)
        wrong = sorted(
            f"{k}: file {tuple(state[k].shape)} vs expected {tuple(expected[k].shape)}"
            for k in expected
            if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
        )
        if missing or unexpected or wrong:
            raise ValueError(
                f"{path} is not pytorch-fid's FID Inception-v3 weight file "
                f"(expected {len(expected)} keys such as {list(expected)[:3]} and 'fc.weight' [1008, 2048]). "
                f"Missing keys: {missing[:10]}{' …' if len(missing) > 10 else ''}; "
                f"unexpected keys: {unexpected[:10]}{' …' if len(unexpected) > 10 else ''}; "
                f"wrong shapes: {wrong[:10]}"
            )
        net.load_state_dict(state, strict=False)
    return net.eval().requires_grad_(False)

"""Per-sample distances and loss weightings.

Every distance returns one value per sample [B] (reduced over all non-batch dimensions); the
trainer averages. Pseudo-Huber goes through the fused ``cm_kernels`` op (which itself falls back
to its pure-PyTorch reference, saying why once, when its extension is not built);
``CM_CORE_NO_KERNELS=1`` picks that reference, :func:`pseudo_huber_reference`, directly.
"""

from __future__ import annotations

import math
import os

import cm_kernels
import torch
import torch.nn.functional as F
from cm_kernels import reference as kernel_reference
from torch import nn

from . import _validate as check

__all__ = [
    "squared_l2",
    "l2_norm",
    "l1",
    "pseudo_huber",
    "pseudo_huber_reference",
    "default_huber_c",
    "LPIPS",
    "DISTANCES",
    "distance",
    "weighting",
    "WEIGHTINGS",
    "edm_weight",
]


def _pair(pred: torch.Tensor, target: torch.Tensor) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    if pred.ndim < 1 or pred.shape[0] == 0:
        raise ValueError("pred must have shape [B, ...] with B >= 1")


def squared_l2(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample (openai's ``l2``: mean over the non-batch dims)."""
    _pair(pred, target)
    return (pred - target).square().flatten(1).mean(1)


def l2_norm(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """‖pred − target‖₂ per sample (ECT's CIFAR-10 loss with c = 0)."""
    _pair(pred, target)
    return (pred - target).flatten(1).norm(dim=1)


def l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error per sample."""
    _pair(pred, target)
    return (pred - target).abs().flatten(1).mean(1)


def default_huber_c(numel_per_sample: int) -> float:
    """iCT's c = 0.00054·√d (Song & Dhariwal 2023, Sec. 3.3); ≈ 0.06 for 3×64×64."""
    return 0.00054 * math.sqrt(numel_per_sample)


def pseudo_huber_reference(pred: torch.Tensor, target: torch.Tensor, c: float) -> torch.Tensor:
    """√(‖pred − target‖² + c²) − c per sample, accumulated in at least fp32, without cancellation
    when ‖pred − target‖ ≪ c: ``cm_kernels.reference.pseudo_huber_loss`` (the kernel's spec)."""
    _pair(pred, target)
    return kernel_reference.pseudo_huber_loss(pred, target, c, reduction="none")


_KERNEL = None
_KERNEL_REASON = None


def _kernel():
    """cm_kernels.pseudo_huber_loss, or None with the reason when CM_CORE_NO_KERNELS=1 disables it."""
    global _KERNEL, _KERNEL_REASON
    if _KERNEL is None and _KERNEL_REASON is None:
        if os.environ.get("CM_CORE_NO_KERNELS") == "1":
            _KERNEL_REASON = "disabled by CM_CORE_NO_KERNELS=1"
        else:
            _KERNEL = cm_kernels.pseudo_huber_loss
    return _KERNEL


def pseudo_huber(
    pred: torch.Tensor, target: torch.Tensor, c: float | None = None, *, divide_by_sqrt_d: bool = False
) -> torch.Tensor:
    """Pseudo-Huber distance per sample, c = 0.00054·√d by default.

    ``divide_by_sqrt_d`` reproduces the BCM/iCT-torch code, which also divides by √d.
    """
    _pair(pred, target)
    d = pred[0].numel()
    c = default_huber_c(d) if c is None else check.positive("c", c)
    kernel = _kernel()
    if kernel is not None:
        loss = kernel(pred, target, c, reduction="none")
    else:
        loss = pseudo_huber_reference(pred, target, c)
    return loss / math.sqrt(d) if divide_by_sqrt_d else loss


class LPIPS(nn.Module):
    """LPIPS (Zhang et al. 2018) with a VGG-16 backbone, built here so no download ever happens.

    ``backbone_weights``: a torchvision ``vgg16`` state dict file (keys ``features.N.weight``),
    read with ``weights_only=True``; ``None`` keeps random weights (tests only: the distance is
    then not perceptual). ``head_weights``: the LPIPS linear heads (``lin0..lin4``), a path, or
    ``"lpips"`` to read ``weights/v0.1/vgg.pth`` from the installed ``lpips`` package; ``None``
    uses uniform heads. Inputs are images in [−1, 1]; openai upsamples to 224 first (``resize``).

    This is the ``lpips`` package's network (max pooling, inputs in [−1, 1]). openai's CD
    checkpoints were trained with ``piq.LPIPS(replace_pooling=True)`` (average pooling, inputs
    in [0, 1]); its numbers differ slightly, so CD runs reproduce that code only approximately.
    """

    _VGG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
    _TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in torchvision's indexing
    _CHANNELS = (64, 128, 256, 512, 512)

    def __init__(self, backbone_weights=None, head_weights=None, resize: int | None = 224):
        super().__init__()
        layers, c_in = [], 3
        for v in self._VGG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c_in, v, 3, padding=1), nn.ReLU(inplace=False)]
                c_in = v
        self.features = nn.Sequential(*layers)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in self._CHANNELS)
        for lin in self.lins:
            nn.init.constant_(lin.weight, 1.0 / lin.weight.shape[1])
        # Input normalization of LPIPS's ScalingLayer (ImageNet statistics in [-1, 1] units).
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.resize = resize
        if backbone_weights is not None:
            self._load_backbone(backbone_weights)
        if head_weights is not None:
            self._load_heads(head_weights)
        self.requires_grad_(False)
        self.eval()

    def _load_backbone(self, path):
        state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
        feats = {k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")}
        wanted = set(self.features.state_dict())
        missing = wanted - set(feats)
        if missing:
            raise ValueError(
                f"{path} is not a torchvision vgg16 state dict: missing {sorted(missing)[:4]}…; "
                "expected keys features.0.weight … features.28.bias"
            )
        self.features.load_state_dict({k: feats[k] for k in wanted})

    def _load_heads(self, source):
        if source == "lpips":
            try:
                import lpips  # only to find its weight file; its torchvision import is not needed
            except ImportError as exc:
                raise ImportError("head_weights='lpips' needs `pip install lpips`") from exc
            source = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "vgg.pth")
        state = torch.load(os.fspath(source), map_location="cpu", weights_only=True)
        for i, lin in enumerate(self.lins):
            key = f"lin{i}.model.1.weight"
            if key not in state:
                raise ValueError(f"{source} has no {key}: not an LPIPS v0.1 VGG head file")
            lin.weight.data.copy_(state[key])

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _pair(pred, target)
        if pred.ndim != 4 or pred.shape[1] != 3:
            raise ValueError(f"LPIPS needs RGB images [B, 3, H, W], got {tuple(pred.shape)}")
        if self.resize is not None and pred.shape[-1] != self.resize:
            pred = F.interpolate(pred, size=self.resize, mode="bilinear", align_corners=False)
            target = F.interpolate(target, size=self.resize, mode="bilinear", align_corners=False)
        x = (torch.cat([pred, target]) - self.shift) / self.scale
        total = 0
        tap = 0
        for i, layer in enumerate(self.features):
            x = layer(x)
            if tap < len(self._TAPS) and i == self._TAPS[tap]:
                a, b = x.chunk(2)
                a = a / (a.square().sum(1, keepdim=True).sqrt() + 1e-10)
                b = b / (b.square().sum(1, keepdim=True).sqrt() + 1e-10)
                total = total + self.lins[tap]((a - b).square()).mean((1, 2, 3))
                tap += 1
                if tap == len(self._TAPS):
                    break
        return total


DISTANCES = {"l2": squared_l2, "l2-norm": l2_norm, "l1": l1, "pseudo-huber": pseudo_huber}


def distance(name: str):
    try:
        return DISTANCES[name]
    except KeyError:
        raise ValueError(f"distance must be one of {sorted(DISTANCES)} (or an LPIPS module), got {name!r}") from None


def _uniform(sigma, sigma_next=None, sigma_data=0.5):
    return torch.ones_like(sigma)


def _ict(sigma, sigma_next=None, sigma_data=0.5):
    if sigma_next is None:
        raise ValueError("the 'ict' weighting needs the neighbouring σ (λ = 1/(σ_{i+1} − σ_i))")
    return 1 / (sigma - sigma_next).abs()


def _snr(sigma, sigma_next=None, sigma_data=0.5):
    return sigma**-2


def edm_weight(sigma, sigma_data: float = 0.5):
    """EDM's loss weight λ(σ) = (σ² + σ_d²)/(σ·σ_d)² (Karras et al. 2022, Table 1), which is
    1/σ² + 1/σ_d² (ECT's ImageNet weighting). EDM's and CDM's objectives and the "edm"/"snr+1"
    weightings all use this one expression."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def _snr_plus_one(sigma, sigma_next=None, sigma_data=0.5):
    return edm_weight(sigma, sigma_data)


def _truncated_snr(sigma, sigma_next=None, sigma_data=0.5):
    return torch.clamp(sigma**-2, min=1.0)


WEIGHTINGS = {
    "uniform": _uniform,
    "ict": _ict,
    "snr": _snr,
    "snr+1": _snr_plus_one,
    "edm": _snr_plus_one,
    "truncated-snr": _truncated_snr,
}


def weighting(name, sigma, sigma_next=None, sigma_data: float = 0.5) -> torch.Tensor:
    """λ(σ) per sample; ``name`` is a key of ``WEIGHTINGS`` or a callable (σ, σ_next, σ_d) → λ.

    ``"ict"``: 1/|σ − σ_next| (also ECT's 1/(t − r)); ``"snr"``: 1/σ²; ``"snr+1"``/``"edm"``:
    1/σ² + 1/σ_d²; ``"truncated-snr"``: max(1/σ², 1); ``"uniform"``: 1.
    """
    if callable(name):
        fn = name
    else:
        try:
            fn = WEIGHTINGS[name]
        except KeyError:
            raise ValueError(f"weighting must be one of {sorted(WEIGHTINGS)}, got {name!r}") from None
    sigma = check.sigma_tensor("sigma", sigma)
    return fn(sigma, sigma_next, sigma_data)

"""DINOv2 ViT features for FD-DINOv2 (Stein et al. 2023, "Exposing flaws of generative model
evaluation metrics"; EDM2 reports it), with the architecture from ``timm`` (optional:
``pip install 'cm-eval[dino]'``) and weights from a file the user gives.

Preprocessing as dgm-eval / EDM2: images in [0, 1] resized to 224×224 (bicubic), normalized
with the ImageNet mean/std; the feature is the final CLS token (1024-d for ViT-L/14).
Weight files accepted: Meta's ``dinov2_vitl14_pretrain.pth`` (torch hub layout) or a timm
state dict for ``vit_large_patch14_dinov2.lvd142m`` (timm's checkpoint filter maps the former
and resamples the 37×37 position embedding to 16×16).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DINOv2Features", "dinov2"]

_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


class DINOv2Features(nn.Module):
    """Input float [B, 3, H, W] in [0, 1] → ``{"features": [B, D]}`` (the CLS token)."""

    def __init__(self, vit: nn.Module, resolution: int = 224):
        super().__init__()
        self.vit = vit
        self.resolution = resolution
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if not torch.is_tensor(x) or not x.is_floating_point() or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError("DINOv2Features expects float images [B, 3, H, W] in [0, 1]")
        x = x.to(self.mean.dtype)
        if x.shape[-2:] != (self.resolution, self.resolution):
            x = F.interpolate(x, size=(self.resolution,) * 2, mode="bicubic", align_corners=False).clamp(0, 1)
        return {"features": self.vit((x - self.mean) / self.std)}


# DINOv2 sizes by embedding width (Oquab et al. 2023, Table 17): ViT-S/B/L/g with patch 14.
_SIZES = {384: "small", 768: "base", 1024: "large", 1536: "giant"}


def dinov2_model_name(state: dict[str, torch.Tensor]) -> str:
    """timm's model name for a DINOv2 state dict (Meta's or timm's layout): the size from the
    width of ``cls_token``, the ``_reg4`` variant when it carries register tokens."""
    cls = state.get("cls_token")
    if cls is None or cls.ndim != 3 or cls.shape[-1] not in _SIZES:
        raise ValueError(
            "not a DINOv2 ViT state dict: no cls_token of width 384/768/1024/1536 "
            "(expected Meta's dinov2_vit*14_pretrain.pth or a timm vit_*_patch14_dinov2 state dict)"
        )
    reg = "_reg4" if "register_tokens" in state or "reg_token" in state else ""
    return f"vit_{_SIZES[cls.shape[-1]]}_patch14{reg}_dinov2"


def dinov2(weights_path, *, model_name: str | None = None, resolution: int = 224) -> DINOv2Features:
    """The DINOv2 feature extractor in eval mode; ``weights_path=None`` gives random weights (tests).

    ``model_name``: timm's architecture; by default read from the weights (ViT-S/B/L/g, with or
    without registers), and ViT-L/14 — the one FD-DINOv2 is reported with — for random weights."""
    try:
        import timm
        from timm.models.vision_transformer import checkpoint_filter_fn
    except ImportError as e:
        raise ImportError("DINOv2 features need timm: pip install 'cm-eval[dino]'") from e
    state = None
    if weights_path is not None:
        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"DINOv2 weights not found at {path}; pass Meta's dinov2_vitl14_pretrain.pth or a timm "
                "vit_large_patch14_dinov2.lvd142m state dict (see the cm-eval README)"
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        if model_name is None:
            try:
                model_name = dinov2_model_name(state)
            except ValueError as e:
                raise ValueError(f"{path}: {e}") from None
    vit = timm.create_model(model_name or "vit_large_patch14_dinov2", pretrained=False, num_classes=0, img_size=resolution)
    if state is not None:
        state = checkpoint_filter_fn(state, vit)
        missing, unexpected = vit.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{path} does not fit timm's {model_name}: missing {sorted(missing)[:10]}, "
                f"unexpected {sorted(unexpected)[:10]}"
            )
    return DINOv2Features(vit, resolution).eval().requires_grad_(False)

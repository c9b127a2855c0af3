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


def dinov2(weights_path, *, model_name: str = "vit_large_patch14_dinov2", resolution: int = 224) -> DINOv2Features:
    """The DINOv2 feature extractor in eval mode; ``weights_path=None`` gives random weights (tests)."""
    try:
        import timm
        from timm.models.vision_transformer import checkpoint_filter_fn
    except ImportError as e:
        raise ImportError("DINOv2 features need timm: pip install 'cm-eval[dino]'") from e
    vit = timm.create_model(model_name, pretrained=False, num_classes=0, img_size=resolution)
    if weights_path is not None:
        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"DINOv2 weights not found at {path}; pass Meta's dinov2_vitl14_pretrain.pth or a timm "
                "vit_large_patch14_dinov2.lvd142m state dict (see the cm-eval README)"
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = checkpoint_filter_fn(state, vit)
        missing, unexpected = vit.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{path} does not fit timm's {model_name}: missing {sorted(missing)[:10]}, "
                f"unexpected {sorted(unexpected)[:10]}"
            )
    return DINOv2Features(vit, resolution).eval().requires_grad_(False)

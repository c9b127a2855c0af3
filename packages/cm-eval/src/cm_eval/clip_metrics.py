"""CLIP score and the LAION aesthetic score, for text-to-image models (Direct CM's SDXL evaluation).

The CLIP models come from ``open_clip`` (optional: ``pip install 'cm-eval[clip]'``), their weights
from a file the user gives (an open_clip state dict: ``open_clip_pytorch_model.bin`` or
``open_clip_model.safetensors``); nothing is downloaded. OpenAI's CLIP weights use QuickGELU: load
them with the ``-quickgelu`` architecture (``ViT-L-14-quickgelu`` for OpenAI's ViT-L/14), as
open_clip's own ``pretrained="openai"`` tag does; with the plain ``ViT-L-14`` they load without an
error but give wrong embeddings.

Images are float [B, 3, H, W] in [0, 1] (tensors, any size). Preprocessing follows open_clip's eval
transform on tensors: bicubic resize (antialiased) of the shorter side to the model's image size,
a center crop, normalization with the model's mean/std. open_clip resizes PIL images, whose bicubic
filter differs from torch's antialiased one by a few 1e-3 per pixel, so scores match a PIL pipeline
to about that, not bit for bit.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ClipModel", "load_clip", "clip_score", "AestheticPredictor", "load_aesthetic", "aesthetic_score"]

_INSTALL = "CLIP metrics need open_clip: pip install 'cm-eval[clip]'"
# open_clip's default (OpenAI's) normalization, for open_clip versions that do not record one on the model.
_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300] or type(e).__name__


def _read_state_dict(path: Path, what: str) -> dict:
    """A state dict from ``.safetensors`` or a ``torch.save`` file read with weights_only=True."""
    unreadable = f"{path}: not a {what} state dict readable without running pickled code"
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as e:
            raise ImportError(f"reading {path} needs safetensors: pip install 'cm-eval[clip]'") from e
        try:
            state = load_file(str(path), device="cpu")
        except Exception as e:  # safetensors' own SafetensorError derives from Exception only
            raise ValueError(f"{unreadable} (.safetensors): {_one_line(e)}") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
            raise ValueError(f"{unreadable} (torch.load weights_only=True): {_one_line(e)}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise ValueError(f"{path}: not a {what} state dict (expected a dict of name → tensor)")
    if state and all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


@contextlib.contextmanager
def _quiet_random_init():
    """open_clip logs "No pretrained weights loaded … initialized randomly" on the root logger when
    it builds a model without a tag; load_clip loads the weights right after, so that line would mislead."""
    root, drop = logging.getLogger(), _DropRandomInitWarning()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


# --- CLIP ----------------------------------------------------------------------------------------


class ClipModel:
    """An open_clip model with its tokenizer and a tensor version of its eval preprocessing.

    ``tokenizer``: list of prompts → LongTensor [B, context_length] (open_clip's tokenizers).
    ``image_size``: (H, W) the image tower takes; ``mean``/``std``: its normalization."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Callable[[list[str]], torch.Tensor],
        *,
        image_size: int | tuple[int, int],
        mean: Sequence[float] = _OPENAI_MEAN,
        std: Sequence[float] = _OPENAI_STD,
        arch: str = "",
        device: str | torch.device = "cpu",
    ):
        self.device = torch.device(device)
        self.model = model.eval().requires_grad_(False).to(self.device)
        self.tokenizer = tokenizer
        self.arch = arch
        h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(int(s) for s in image_size)
        self.image_size = (h, w)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Float [B, 3, H, W] in [0, 1] → the image tower's input [B, 3, *image_size] (float32)."""
        if not torch.is_tensor(images) or not images.is_floating_point() or images.ndim != 4 or images.shape[1] != 3:
            got = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise ValueError(f"CLIP expects float images [B, 3, H, W] in [0, 1], got {got}")
        x = images.to(self.device, torch.float32)
        lo, hi = x.aminmax() if x.numel() else (0.0, 1.0)
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(
                f"CLIP expects images in [0, 1] but they span [{lo:.3g}, {hi:.3g}]; "
                "map [-1, 1] images with (x + 1) / 2 first"
            )
        th, tw = self.image_size
        h, w = x.shape[-2:]
        if th == tw:  # torchvision's Resize(int): the shorter side to th, the longer in proportion (truncated)
            size = (th, int(th * w / h)) if h <= w else (int(th * h / w), th)
        else:  # a non-square tower: the smallest scaling that covers it
            scale = max(th / h, tw / w)
            size = (max(th, round(h * scale)), max(tw, round(w * scale)))
        if size != (h, w):
            # PIL resizes 8-bit images, which clips the bicubic overshoot to [0, 255]; clamp likewise.
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        top, left = int(round((size[0] - th) / 2.0)), int(round((size[1] - tw) / 2.0))  # torchvision's center crop
        x = x[..., top : top + th, left : left + tw]
        return (x - self.mean) / self.std

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalized image embeddings [B, D] (float32, on the model's device)."""
        return F.normalize(self.model.encode_image(self.preprocess(images)).float(), dim=-1)

    @torch.no_grad()
    def encode_texts(self, prompts: Sequence[str]) -> torch.Tensor:
        """L2-normalized text embeddings [B, D]; prompts longer than the context are truncated
        (open_clip's tokenizer keeps the end-of-text token)."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a list of strings")
        tokens = self.tokenizer(list(prompts)).to(self.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)


def load_clip(
    arch: str,
    weights: str | Path,
    device: str | torch.device = "cpu",
    *,
    tokenizer: Callable[[list[str]], torch.Tensor] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> ClipModel:
    """open_clip architecture ``arch`` (a name of ``open_clip.list_models()``, e.g. ``ViT-L-14``
    or ``ViT-L-14-quickgelu`` for OpenAI's weights) with the state dict at ``weights``.

    ``tokenizer``: by default open_clip's own for ``arch`` when it is the bundled BPE tokenizer;
    architectures whose tokenizer lives on the Hugging Face hub (SigLIP, ``hf_tokenizer_name``)
    need one passed, since nothing is downloaded. ``mean``/``std``: the normalization the weights
    were trained with, when it is not OpenAI's (open_clip's default for weights given as a file)."""
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(
            f"open_clip {arch} weights not found at {path}; pass its open_clip state dict "
            "(open_clip_pytorch_model.bin or open_clip_model.safetensors; for OpenAI's CLIP use the "
            "-quickgelu architecture, e.g. ViT-L-14-quickgelu)"
        )
    try:
        import open_clip
    except ImportError as e:
        raise ImportError(_INSTALL) from e
    if ":" in arch:  # hf-hub:… / local-dir:… would fetch a config (and weights) themselves
        raise ValueError(f"give an open_clip architecture name such as ViT-L-14, not {arch!r}, and the weights file")
    config = open_clip.get_model_config(arch)
    if config is None:
        raise ValueError(
            f"unknown open_clip architecture {arch!r}; use a name of open_clip.list_models() (e.g. ViT-L-14) "
            "or register a config with open_clip.add_model_config"
        )
    text_cfg = config.get("text_cfg", {})
    if "hf_model_name" in text_cfg:
        raise ValueError(
            f"open_clip {arch} builds its text tower from the Hugging Face hub ({text_cfg['hf_model_name']}), "
            "which needs a download; use an architecture with open_clip's own text transformer"
        )
    if tokenizer is None:
        if "hf_tokenizer_name" in text_cfg or "siglip" in arch.lower():
            raise ValueError(
                f"open_clip {arch}'s tokenizer comes from the Hugging Face hub, which needs a download; "
                "pass tokenizer= (prompts → LongTensor [B, context_length]) built from local files"
            )
        tokenizer = open_clip.get_tokenizer(arch)
    with _quiet_random_init():
        model = open_clip.create_model(arch, pretrained=None, device="cpu")
    state = _read_state_dict(path, f"open_clip {arch}")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"{path} does not fit open_clip {arch}: {_one_line(e)}") from None
    if missing or unexpected:
        raise ValueError(
            f"{path} does not fit open_clip {arch}: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}; check the architecture name"
        )
    visual = model.visual
    return ClipModel(
        model,
        tokenizer,
        image_size=visual.image_size,
        mean=mean if mean is not None else (getattr(visual, "image_mean", None) or _OPENAI_MEAN),
        std=std if std is not None else (getattr(visual, "image_std", None) or _OPENAI_STD),
        arch=arch,
        device=device,
    )


def _check_batch(images, what: str, batch_size: int) -> None:
    if not torch.is_tensor(images) or images.ndim != 4:
        raise ValueError(f"{what}: images must be a float tensor [B, 3, H, W] in [0, 1]")
    if batch_size < 1:
        raise ValueError(f"{what}: batch_size must be >= 1, got {batch_size}")


def clip_score(model: ClipModel, images: torch.Tensor, prompts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
    """CLIP score of each (image, prompt) pair, [B] float32 on the CPU:

        100 · max(cos(E_I(image), E_T(prompt)), 0)

    the convention of torchmetrics' ``CLIPScore`` (Hessel et al. 2021's CLIP-S with weight 100
    instead of 2.5), which text-to-image papers report (averaged over the prompts)."""
    if isinstance(prompts, str):
        raise ValueError("prompts must be a list of strings, one per image")
    prompts = list(prompts)
    _check_batch(images, "clip_score", batch_size)
    if len(images) != len(prompts):
        raise ValueError(f"clip_score: {len(images)} images but {len(prompts)} prompts; give one prompt per image")
    scores = []
    for i in range(0, len(prompts), batch_size):
        img = model.encode_images(images[i : i + batch_size])
        txt = model.encode_texts(prompts[i : i + batch_size])
        scores.append((100 * (img * txt).sum(-1)).clamp(min=0).cpu())
    return torch.cat(scores) if scores else torch.zeros(0)


# --- LAION aesthetic predictor -------------------------------------------------------------------


class AestheticPredictor(nn.Module):
    """The LAION "improved aesthetic predictor" (christophschuhmann/improved-aesthetic-predictor,
    ``sac+logos+ava1-l14-linearMSE.pth``): a purely linear MLP (no activations; the dropouts are
    inactive in eval) on L2-normalized CLIP ViT-L/14 image embeddings, predicting the mean rating
    on a 1–10 scale. Layer indices match the published state dict (``layers.0`` … ``layers.7``)."""

    def __init__(self, embed_dim: int = 768):
        super().__init__()
        self.embed_dim = embed_dim
        self.layers = nn.Sequential(
            nn.Linear(embed_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """L2-normalized embeddings [B, embed_dim] → scores [B]."""
        return self.layers(embeddings).squeeze(-1)


def load_aesthetic(path: str | Path, device: str | torch.device = "cpu") -> AestheticPredictor:
    """The aesthetic predictor from its published ``.pth`` (read with weights_only=True) or a
    ``.safetensors`` holding the same keys; eval mode, no gradients."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"aesthetic predictor weights not found at {path}; pass LAION's sac+logos+ava1-l14-linearMSE.pth "
            "(github.com/christophschuhmann/improved-aesthetic-predictor)"
        )
    state = _read_state_dict(path, "LAION aesthetic predictor")
    net = AestheticPredictor()
    want = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    missing, unexpected = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    if missing or unexpected:
        raise ValueError(
            f"{path}: not the LAION aesthetic predictor MLP (sac+logos+ava1-l14-linearMSE.pth): "
            f"missing keys {missing[:5]}, unexpected keys {unexpected[:5]}"
        )
    for key, shape in want.items():
        if tuple(state[key].shape) != shape or not state[key].is_floating_point():
            raise ValueError(
                f"{path}: {key} is {state[key].dtype} {list(state[key].shape)}, expected floating point "
                f"{list(shape)} (the ViT-L/14 aesthetic predictor, 768-d input)"
            )
    net.load_state_dict({k: v.float() for k, v in state.items()})
    return net.eval().requires_grad_(False).to(device)


@torch.no_grad()
def aesthetic_score(
    clip_model: ClipModel, predictor: AestheticPredictor, images: torch.Tensor, batch_size: int = 32
) -> torch.Tensor:
    """Predicted aesthetic rating of each image, [B] float32 on the CPU (LAION's predictor on the
    L2-normalized embedding of ``clip_model``, which must be OpenAI's CLIP ViT-L/14 for the
    published predictor: ``load_clip("ViT-L-14-quickgelu", …)``)."""
    _check_batch(images, "aesthetic_score", batch_size)
    device = next(predictor.parameters()).device
    scores = []
    for i in range(0, len(images), batch_size):
        emb = clip_model.encode_images(images[i : i + batch_size])
        if emb.shape[-1] != predictor.embed_dim:
            raise ValueError(
                f"the aesthetic predictor takes {predictor.embed_dim}-d CLIP embeddings (ViT-L/14) but "
                f"CLIP {clip_model.arch or 'model'} gives {emb.shape[-1]}-d; "
                "load ViT-L-14-quickgelu with OpenAI's weights"
            )
        scores.append(predictor(emb.to(device)).float().cpu())
    return torch.cat(scores) if scores else torch.zeros(0)

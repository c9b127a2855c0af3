"""A local diffusers Stable Diffusion pipeline folder (SD 1.5 or SDXL layout) behind cm's network
interface, for latent text-to-image consistency distillation with LoRA (cm_core's "lcm" and
"latent-direct-cm" objectives).

:class:`DiffusersNet` holds the pipeline's UNet (optionally with peft LoRA adapters, the only
trainable weights), its VAE, text encoder(s) and tokenizer(s), and its noise schedule
(``alphas_cumprod``, ``prediction_type`` from the folder's scheduler config: what
``cm_core.DiscreteVP`` takes). It is called as ``net(x_t, t, encoder_hidden_states=…, text_embeds=…,
time_ids=…)`` and returns the UNet's raw output; :meth:`encode_text` builds those embeddings exactly
as the diffusers pipelines' ``encode_prompt`` (SDXL: both encoders' penultimate hidden states
concatenated, the second encoder's pooled projection, and the added time ids (original size, crop
top-left, target size)); :meth:`null_text` is the unconditional branch of guidance as the pipelines
form it ("" for SD 1.5; zeros for SDXL, whose ``force_zeros_for_empty_prompt`` is set).

Its ``state_dict`` holds only the LoRA tensors (what a checkpoint stores); :meth:`save_lora` writes
them in diffusers' format, so ``pipeline.load_lora_weights(folder)`` loads them unchanged.

Needs the optional extra ``cm-nets[diffusers]`` (diffusers, transformers, peft). Nothing is
downloaded: folders are opened with ``local_files_only=True``.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch import nn

__all__ = ["DiffusersNet", "load_pipeline_folder", "LORA_TARGETS", "pipeline_kind"]

# The modules LCM-LoRA adapts (diffusers' train_lcm_distill_lora_sdxl.py).
LORA_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
    "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
)  # fmt: skip

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
           "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}  # fmt: skip


def _needs():
    try:
        import diffusers  # noqa: F401
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            f"a diffusers pipeline needs diffusers, transformers and peft ({exc.name} is missing): "
            "pip install 'cm-nets[diffusers]' (or: pip install diffusers transformers peft)"
        ) from None


def pipeline_kind(path: str | Path) -> str:
    """"sd" or "sdxl" from a pipeline folder's model_index.json; a clear error for anything else."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model folder {path} does not exist: give the local diffusers pipeline folder")
    index = path / "model_index.json"
    if not path.is_dir() or not index.is_file():
        raise ValueError(
            f"{path} is not a diffusers pipeline folder (no model_index.json): give the folder that "
            "StableDiffusionPipeline/StableDiffusionXLPipeline.save_pretrained wrote (or a downloaded snapshot)"
        )
    try:
        meta = json.loads(index.read_text())
    except ValueError as exc:
        raise ValueError(f"{index} is not valid JSON ({exc})") from None
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if part not in meta or not (path / part).is_dir():
            raise ValueError(f"{path}: the pipeline has no {part}/ folder; a Stable Diffusion pipeline folder needs "
                             "unet, vae, text_encoder, tokenizer and scheduler")  # fmt: skip
    return "sdxl" if "text_encoder_2" in meta and (path / "text_encoder_2").is_dir() else "sd"


def load_pipeline_folder(path: str | Path, dtype: torch.dtype = torch.float32) -> dict:
    """The components of a local SD 1.5 / SDXL pipeline folder: {"kind", "unet", "vae", "text_encoders",
    "tokenizers", "scheduler", "force_zeros_for_empty_prompt"} (weights in ``dtype``, VAE in float32)."""
    _needs()
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    path = Path(path).expanduser()
    kind = pipeline_kind(path)
    opts = dict(local_files_only=True)
    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype, **opts)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=torch.float32, **opts)
        encoders = [CLIPTextModel.from_pretrained(path, subfolder="text_encoder", torch_dtype=dtype, **opts)]
        tokenizers = [CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **opts)]
        if kind == "sdxl":
            encoders.append(
                CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", torch_dtype=dtype, **opts)
            )
            tokenizers.append(CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", **opts))
        scheduler = DDIMScheduler.from_pretrained(path, subfolder="scheduler", **opts)
    except (OSError, ValueError, EnvironmentError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"cannot load the diffusers pipeline in {path}: {first}") from None
    meta = json.loads((path / "model_index.json").read_text())
    return {
        "kind": kind,
        "unet": unet,
        "vae": vae,
        "text_encoders": encoders,
        "tokenizers": tokenizers,
        "scheduler": scheduler,
        "force_zeros_for_empty_prompt": bool(meta.get("force_zeros_for_empty_prompt", kind == "sdxl")),
    }


class DiffusersNet(nn.Module):
    """A Stable Diffusion pipeline's UNet (with optional LoRA), VAE and text encoders as one network.

    Build with :meth:`load`. Only the LoRA parameters require gradients; the base weights, VAE and
    text encoders are frozen (and are not in :meth:`state_dict`).
    """

    def __init__(self, parts: dict, path: str = "", dtype: torch.dtype = torch.float32):
        super().__init__()
        self.kind = parts["kind"]
        self.path = str(path)
        self.unet = parts["unet"].requires_grad_(False)
        self.vae = parts["vae"].requires_grad_(False).eval()
        self.text_encoders = nn.ModuleList(parts["text_encoders"]).requires_grad_(False).eval()
        self.tokenizers = list(parts["tokenizers"])
        sched = parts["scheduler"]
        self.scheduler_config = dict(sched.config)
        # The noise schedule as cm_core.DiscreteVP takes it (LatentConsistencyFunction builds one):
        # ᾱ_t of the scheduler, its prediction type, and ᾱ one step past the end (LCM's solver: ᾱ_0).
        self.alphas_cumprod = sched.alphas_cumprod.detach().to(torch.float64).clone()
        self.prediction_type = str(sched.config.prediction_type)
        self.final_alpha_cumprod = float(sched.alphas_cumprod[0])
        self.force_zeros = parts["force_zeros_for_empty_prompt"]
        self.base_dtype = dtype
        self.lora: dict | None = None
        self._empty: tuple[torch.device, dict] | None = None  # the "" prompt's embedding (frozen encoders)
        self.cm_nets_config = {"preset": "diffusers", "kwargs": {"path": self.path}}

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, *, dtype: str | torch.dtype = torch.float32, lora: dict | None = None):
        """Open a pipeline folder; ``dtype`` of the frozen UNet/text encoders ("fp32", "fp16", "bf16");
        ``lora``: {"rank", "alpha" (default rank), "targets" (default :data:`LORA_TARGETS`), "dropout"}."""
        if isinstance(dtype, str):
            if dtype not in _DTYPES:
                raise ValueError(f"dtype must be one of fp32, fp16, bf16, got {dtype!r}")
            dtype = _DTYPES[dtype]
        net = cls(load_pipeline_folder(path, dtype), str(Path(path).expanduser()), dtype)
        if lora:
            net.add_lora(**lora)
        return net

    def add_lora(self, rank: int, alpha: float | None = None, targets=None, dropout: float = 0.0) -> None:
        """peft LoRA adapters on the UNet (LCM-LoRA's init: Gaussian A, zero B, so the student starts as
        the teacher); the adapter weights are float32 whatever the base dtype."""
        from peft import LoraConfig

        if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
            raise ValueError(f"lora rank must be a positive integer, got {rank!r}")
        alpha = float(rank if alpha is None else alpha)
        if alpha <= 0:
            raise ValueError(f"lora alpha must be > 0, got {alpha}")
        if not 0 <= float(dropout) < 1:
            raise ValueError(f"lora dropout must be in [0, 1), got {dropout}")
        targets = list(LORA_TARGETS if targets is None else targets)
        present = {name.split(".")[-1] for name, _ in self.unet.named_modules()}
        names = {name for name, _ in self.unet.named_modules()}
        missing = [t for t in targets if t not in present and not any(n.endswith("." + t) for n in names)]
        if len(missing) == len(targets):
            raise ValueError(f"lora targets {targets} match no module of the UNet in {self.path}")
        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=float(dropout), init_lora_weights="gaussian",
                            target_modules=targets)  # fmt: skip
        self.unet.add_adapter(config)
        for name, p in self.unet.named_parameters():
            if "lora_" in name:
                p.data = p.data.float()
                p.requires_grad_(True)
        self.lora = {"rank": rank, "alpha": alpha, "targets": targets, "dropout": float(dropout)}
        self.cm_nets_config = {"preset": "diffusers", "kwargs": {"path": self.path, "lora": self.lora}}

    # ---- what the consistency function calls ------------------------------------------------
    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        """The pixel size the UNet was trained at (its sample_size × the VAE's downsampling)."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        s = int(self.unet.config.sample_size)
        return (self.latent_channels, s, s)

    def forward(self, x_t, t, encoder_hidden_states, text_embeds=None, time_ids=None) -> torch.Tensor:
        added = None
        if text_embeds is not None:
            added = {"text_embeds": text_embeds, "time_ids": time_ids}
        dtype = self.base_dtype if not torch.is_autocast_enabled(x_t.device.type) else x_t.dtype
        out = self.unet(
            x_t.to(dtype), t, encoder_hidden_states=encoder_hidden_states.to(dtype),
            added_cond_kwargs=None if added is None else {k: v.to(dtype) for k, v in added.items()},
        ).sample  # fmt: skip
        return out.to(x_t.dtype)

    @contextlib.contextmanager
    def adapters_disabled(self):
        """The base model (the teacher): LoRA adapters off inside the block."""
        if self.lora is None:
            yield
            return
        self.unet.disable_adapters()
        try:
            yield
        finally:
            self.unet.enable_adapters()

    def _device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def _tokens(self, tokenizer, prompts: list[str]) -> torch.Tensor:
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids  # fmt: skip
        return ids.to(self._device())

    @torch.no_grad()
    def encode_text(self, prompts: list[str], original_size=None, crop_top_left=None, target_size=None) -> dict:
        """The UNet's conditioning for ``prompts`` as the pipelines' ``encode_prompt`` computes it.
        SDXL: ``original_size``/``crop_top_left`` [B, 2] (default: the model's resolution and (0, 0))."""
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a non-empty list of strings")
        if self.kind == "sd":
            enc, tok = self.text_encoders[0], self.tokenizers[0]
            mask = None
            if getattr(enc.config, "use_attention_mask", False):
                mask = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                           return_tensors="pt").attention_mask.to(self._device())  # fmt: skip
            return {"encoder_hidden_states": enc(self._tokens(tok, prompts), attention_mask=mask)[0]}
        hidden, pooled = [], None
        for tok, enc in zip(self.tokenizers, self.text_encoders):
            out = enc(self._tokens(tok, prompts), output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        b = len(prompts)
        res = self.resolution
        size = _pairs(original_size, b, (res, res))
        crop = _pairs(crop_top_left, b, (0, 0))
        target = _pairs(target_size, b, (res, res))
        time_ids = torch.cat([size, crop, target], dim=1).to(self._device(), hidden[0].dtype)
        return {"encoder_hidden_states": torch.cat(hidden, dim=-1), "text_embeds": pooled, "time_ids": time_ids}

    @torch.no_grad()
    def null_text(self, embeddings: dict) -> dict:
        """The unconditional embeddings matching ``embeddings`` (the pipelines' negative prompt when none is given)."""
        b = embeddings["encoder_hidden_states"].shape[0]
        if self.kind == "sdxl" and self.force_zeros:
            return {
                "encoder_hidden_states": torch.zeros_like(embeddings["encoder_hidden_states"]),
                "text_embeds": torch.zeros_like(embeddings["text_embeds"]),
                "time_ids": embeddings["time_ids"],
            }
        device = self._device()
        if self._empty is None or self._empty[0] != device:  # constant: encoded once, not per teacher call
            self._empty = (device, self.encode_text([""]))
        null = {k: v.expand(b, *v.shape[1:]) for k, v in self._empty[1].items()}
        if "time_ids" in embeddings:
            null["time_ids"] = embeddings["time_ids"]
        return null

    @torch.no_grad()
    def encode_images(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Pixels in [−1, 1] → latents × the VAE's scaling factor (the latent distribution's mean, or a
        sample with ``generator``). The VAE runs in float32."""
        dist = self.vae.encode(x.float().to(self._device())).latent_dist
        z = dist.sample(generator) if generator is not None else dist.mean
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return ((z - shift) * self.vae.config.scaling_factor).to(x.dtype)

    @torch.no_grad()
    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (scaled) → pixels in [−1, 1] (float32 VAE)."""
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        x = self.vae.decode(z.float().to(self._device()) / self.vae.config.scaling_factor + shift).sample
        return x.clamp(-1, 1)

    # ---- weights -----------------------------------------------------------------------------
    def state_dict(self, *args, **kwargs):
        """Only the LoRA tensors (the rest is the pipeline folder, unchanged)."""
        full = super().state_dict(*args, **kwargs)
        return type(full)((k, v) for k, v in full.items() if "lora_" in k)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        own = self.state_dict()
        missing = sorted(set(own) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(own))
        wrong = [k for k in set(own) & set(state_dict) if tuple(own[k].shape) != tuple(state_dict[k].shape)]
        if wrong:
            k = sorted(wrong)[0]
            raise RuntimeError(
                f"LoRA weights do not fit this model: {len(wrong)} tensors have another shape (e.g. {k}: "
                f"{tuple(state_dict[k].shape)} in the file, {tuple(own[k].shape)} here); was it trained with "
                "another lora rank?"
            )
        if strict and (missing or unexpected):
            raise RuntimeError(
                f"LoRA weights do not fit this model: {len(missing)} missing (e.g. {missing[:2]}), "
                f"{len(unexpected)} unexpected (e.g. {unexpected[:2]}); was it trained with the same lora rank/targets?"
            )
        return super().load_state_dict(state_dict, strict=False, assign=assign)

    def lora_diffusers_state_dict(self) -> dict[str, torch.Tensor]:
        """The LoRA weights under peft's names without the adapter name (what diffusers'
        ``save_lora_weights`` stores, prefixed with ``unet.``, and ``load_lora_weights`` reads back)."""
        from peft.utils import get_peft_model_state_dict

        if self.lora is None:
            raise ValueError("this model has no LoRA adapters to save")
        return get_peft_model_state_dict(self.unet)

    def save_lora(self, folder: str | Path) -> Path:
        """Write ``pytorch_lora_weights.safetensors`` (diffusers' format, with the adapter's rank and
        alpha in its metadata) into ``folder`` atomically; ``pipeline.load_lora_weights(folder)`` loads it."""
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        from .files import atomic_dir

        pipe_cls = StableDiffusionXLPipeline if self.kind == "sdxl" else StableDiffusionPipeline
        layers = {k: v.detach().float().cpu().contiguous() for k, v in self.lora_diffusers_state_dict().items()}
        meta = self.unet.peft_config["default"].to_dict()
        meta = {k: (sorted(v) if isinstance(v, set) else v) for k, v in meta.items()}
        folder = Path(folder)
        with atomic_dir(folder) as tmp:
            pipe_cls.save_lora_weights(tmp, unet_lora_layers=layers, unet_lora_adapter_metadata=meta)
        return folder


def _pairs(value, batch: int, default: tuple[int, int]) -> torch.Tensor:
    if value is None:
        return torch.tensor([default] * batch, dtype=torch.float64)
    v = torch.as_tensor(value, dtype=torch.float64).cpu()
    if v.ndim == 1:
        v = v.expand(batch, 2)
    if v.shape != (batch, 2):
        raise ValueError(f"size/crop conditioning must be [B, 2] for B={batch}, got {tuple(v.shape)}")
    return v

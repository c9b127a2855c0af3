"""Tiny random Stable-Diffusion-shaped pipelines for tests: SD 1.5 layout (one CLIP text encoder)
and SDXL layout (two text encoders, pooled embeddings, added time ids), built from configs and
saved with ``save_pretrained`` to a folder — nothing is downloaded. A tokenizer is written by hand
(a character-level CLIP BPE vocabulary), so the folder loads with ``from_pretrained(path)`` exactly
as a real pipeline folder does.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

__all__ = ["write_tokenizer", "tiny_sd_pipeline", "TINY_RESOLUTION"]

TINY_RESOLUTION = 32  # pixels; the VAE halves it once: 16×16 latents with 4 channels
_NEEDS = "tiny diffusers pipelines need diffusers and transformers: pip install 'cm-nets[diffusers]'"


def write_tokenizer(folder: str | Path, max_length: int = 16) -> Path:
    """A CLIP tokenizer whose vocabulary is single characters (every lowercase string tokenizes)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(string.ascii_lowercase + string.digits + ".,!?'-")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "model_max_length": max_length,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "tokenizer_class": "CLIPTokenizer",
            }
        )
    )
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                    "pad_token": "<|endoftext|>"})  # fmt: skip
    )
    return folder


def _text_config(hidden: int, projection: int, vocab: int, max_length: int):
    try:
        from transformers import CLIPTextConfig
    except ImportError:
        raise ImportError(_NEEDS) from None

    return CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_attention_heads=2,
        num_hidden_layers=2,
        vocab_size=vocab,
        max_position_embeddings=max_length,
        projection_dim=projection,
        hidden_act="gelu",
    )


def tiny_sd_pipeline(folder: str | Path, *, xl: bool = False, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """Write a random SD 1.5-shaped (or, ``xl=True``, SDXL-shaped) pipeline folder; returns it.

    UNet: 2 levels (32, 64 channels), cross-attention on the inner one; VAE: 1 downsampling;
    text encoders: 2 layers of width 32. ``prediction_type``: "epsilon", "v_prediction" or "sample".
    """
    try:
        from diffusers import (
            AutoencoderKL,
            DDIMScheduler,
            StableDiffusionPipeline,
            StableDiffusionXLPipeline,
            UNet2DConditionModel,
        )
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
    except ImportError:
        raise ImportError(_NEEDS) from None

    import tempfile

    folder = Path(folder)
    torch.manual_seed(seed)
    max_length = 16
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(str(write_tokenizer(tmp, max_length)))
    vocab = len(tokenizer)
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
        timestep_spacing="leading",
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=TINY_RESOLUTION,
        scaling_factor=0.13025 if xl else 0.18215,
    )
    common = dict(
        sample_size=TINY_RESOLUTION // 2,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )
    if not xl:
        text_encoder = CLIPTextModel(_text_config(32, 32, vocab, max_length))
        unet = UNet2DConditionModel(**common, cross_attention_dim=32, attention_head_dim=8)
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )  # fmt: skip
    else:
        text_encoder = CLIPTextModel(_text_config(32, 32, vocab, max_length))
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(32, 32, vocab, max_length))
        unet = UNet2DConditionModel(
            **common,
            cross_attention_dim=64,  # 32 + 32: both encoders' penultimate states, concatenated
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=6 * 8 + 32,  # 6 time ids × 8 + the pooled projection
        )
        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
            tokenizer_2=tokenizer, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
        )  # fmt: skip
    pipe.save_pretrained(str(folder))
    return folder

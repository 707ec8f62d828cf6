"""Tiny real Stable Diffusion 1.x and SDXL pipelines built from configs and saved in diffusers format.

Tests and benchmarks use them as a user's local model: the same ``from_pretrained`` code
path as ``runwayml/stable-diffusion-v1-5`` or ``stabilityai/stable-diffusion-xl-base-1.0``, with a few
thousand parameters per part. Nothing here downloads: the tokenizer is CLIP's, derived offline.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..clip_tokenizer import write_clip_tokenizer
from ..finetune.models import assemble_pipeline


def _clip_text_config(vocab_size: int, hidden: int, layers: int, projection_dim: int | None = None):
    from transformers import CLIPTextConfig

    kw = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 8),
        max_position_embeddings=77,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        hidden_act="quick_gelu",
    )
    if projection_dim is not None:
        kw["projection_dim"] = projection_dim
    return CLIPTextConfig(**kw)


def tiny_vae(
    channels: tuple[int, ...] = (8, 8, 16, 16),
    latent_channels: int = 4,
    scaling_factor: float = 0.18215,
    groups: int = 2,
):
    """An AutoencoderKL with SD's layout: 4 blocks, so images are 8x the latent size, as in the real VAE."""
    from diffusers import AutoencoderKL

    n = len(channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=list(channels),
        layers_per_block=1,
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        latent_channels=latent_channels,
        norm_num_groups=groups,
        sample_size=8 * 8,
        scaling_factor=scaling_factor,
    )


def tiny_unet(
    cross_attention_dim: int,
    channels: tuple[int, ...] = (16, 32),
    sample_size: int = 8,
    sdxl: bool = False,
    addition_time_embed_dim: int = 8,
    pooled_dim: int = 32,
    groups: int = 2,
):
    """A UNet2DConditionModel with one down/up block of each kind (SDXL: text_time added conditioning)."""
    from diffusers import UNet2DConditionModel

    kw = dict(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=tuple(channels),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=(2, 4),
        norm_num_groups=groups,
    )
    if sdxl:
        kw.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=addition_time_embed_dim,
            projection_class_embeddings_input_dim=6 * addition_time_embed_dim + pooled_dim,
            use_linear_projection=True,
            transformer_layers_per_block=(1, 2),
        )
    return UNet2DConditionModel(**kw)


def tiny_scheduler(prediction_type: str = "epsilon", sdxl: bool = False):
    """DDIM with SD's training betas; SDXL's base uses ``timestep_spacing='leading'`` and ``steps_offset=1``."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
        timestep_spacing="leading",
    )


def build_tiny_pipeline(
    family: str = "sd",
    seed: int = 0,
    words: list[str] | None = None,
    tokenizer_dir: Path | None = None,
    prediction_type: str = "epsilon",
    sample_size: int = 8,
    text_hidden: int = 32,
    text_layers: int = 2,
    unet_channels: tuple[int, ...] = (16, 32),
    vae_channels: tuple[int, ...] = (8, 8, 16, 16),
    unet_groups: int = 2,
    vae_groups: int = 2,
):
    """A tiny random ``StableDiffusionPipeline`` (``family='sd'``) or ``StableDiffusionXLPipeline`` (``'sdxl'``).

    ``sample_size`` is the UNet's native latent size (images are 8x larger); ``words`` gives the
    tokenizer a small vocabulary (see ``rewardtune.clip_tokenizer.write_clip_tokenizer``).
    """
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if family not in ("sd", "sdxl"):
        raise ValueError(f"family must be 'sd' or 'sdxl', got {family!r}")
    if tokenizer_dir is None:
        raise ValueError("tokenizer_dir is required (the tokenizer is written there first)")
    vocab_size = write_clip_tokenizer(tokenizer_dir, words)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    vae = tiny_vae(vae_channels, groups=vae_groups)
    scheduler = tiny_scheduler(prediction_type, sdxl=family == "sdxl")
    text_encoder = CLIPTextModel(_clip_text_config(vocab_size, text_hidden, text_layers))
    if family == "sd":
        unet = tiny_unet(text_hidden, unet_channels, sample_size, groups=unet_groups)
        return assemble_pipeline(
            "sd", dict(vae=vae, text_encoder=text_encoder, unet=unet, scheduler=scheduler), tokenizer
        )
    text_encoder_2 = CLIPTextModelWithProjection(
        _clip_text_config(vocab_size, text_hidden, text_layers, projection_dim=text_hidden)
    )
    unet = tiny_unet(
        2 * text_hidden, unet_channels, sample_size, sdxl=True, pooled_dim=text_hidden, groups=unet_groups
    )
    parts = dict(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, unet=unet, scheduler=scheduler)
    return assemble_pipeline("sdxl", parts, tokenizer)


def save_tiny_pipeline(directory: str | Path, family: str = "sd", seed: int = 0, **sizes) -> Path:
    """Build a tiny pipeline (see ``build_tiny_pipeline`` for ``sizes``) and ``save_pretrained`` it to ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pipe = build_tiny_pipeline(family, seed, tokenizer_dir=directory / "tokenizer", **sizes)
    pipe.save_pretrained(directory, safe_serialization=True)
    return directory

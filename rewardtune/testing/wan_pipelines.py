"""A tiny real Wan pipeline (``WanPipeline``) built from configs and saved in diffusers format.

Tests use it as a user's local copy of ``Wan-AI/Wan2.1-T2V-1.3B-Diffusers``: the real part classes and layout -- a
``WanTransformer3DModel`` (1x2x2 patches over (frames, height, width) latents), the causal 3-D ``AutoencoderKLWan``
(4x in time, 8x in space, 16 latent channels with per-channel statistics), a ``UMT5EncoderModel`` with a T5-style
tokenizer built offline, and the hub's scheduler kind (``UniPCMultistepScheduler`` with flow sigmas and a
``flow_shift``) -- with a few thousand parameters per part. ``pair=True`` builds a Wan2.2-A14B-style pipeline: a
second transformer (``transformer_2``, the low-noise expert) and a ``boundary_ratio``; ``expand_timesteps=True`` a
TI2V-5B-style one (a timestep per latent token). Nothing here downloads.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .flow_pipelines import prompt_words, t5_tokenizer, tiny_t5_encoder

FLOW_SHIFT = 3.0  # Wan-AI/Wan2.1-T2V-1.3B-Diffusers' scheduler: UniPC, flow sigmas, flow_shift 3.0
# UniPCMultistepScheduler settings of the Wan-AI/*-Diffusers scheduler configs
SCHEDULER = dict(
    prediction_type="flow_prediction",
    use_flow_sigmas=True,
    flow_shift=FLOW_SHIFT,
    num_train_timesteps=1000,
)
BOUNDARY_RATIO = 0.875  # Wan2.2-T2V-A14B's model_index.json


def tiny_wan_transformer(seed: int, text_dim: int = 32, num_layers: int = 2):
    """A ``WanTransformer3DModel`` with Wan's latent layout (16 channels in and out, 1x2x2 patches) and
    ``num_layers`` blocks of two 8-wide heads."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=16,
        out_channels=16,
        text_dim=text_dim,
        freq_dim=32,
        ffn_dim=32,
        num_layers=num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )


def tiny_wan_vae(base_dim: int = 4):
    """An ``AutoencoderKLWan`` laid out like Wan 2.1's: 16 latent channels, three spatial downsamplings (8x), two
    temporal ones (4x: ``num_frames`` = 4k + 1 frames make k + 1 latent frames), causal in time."""
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(
        base_dim=base_dim, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )


def tiny_umt5(vocab_size: int, d_model: int = 32):
    return tiny_t5_encoder(vocab_size, d_model, umt5=True).eval()


def build_tiny_wan_pipeline(
    seed: int = 0, pair: bool = False, expand_timesteps: bool = False, euler: bool = False, num_layers: int = 2
):
    """A tiny random ``WanPipeline`` (see the module docstring); ``euler``: with the scheduler class WanPipeline's
    signature names, ``FlowMatchEulerDiscreteScheduler`` at the same shift, instead of the hub's UniPC;
    ``num_layers``: blocks per transformer."""
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler, WanPipeline

    tok = t5_tokenizer(prompt_words())
    torch.manual_seed(seed)
    vae, text_encoder = tiny_wan_vae(), tiny_umt5(len(tok))
    return WanPipeline(
        tokenizer=tok,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=FLOW_SHIFT) if euler else UniPCMultistepScheduler(**SCHEDULER),
        transformer=tiny_wan_transformer(seed + 1, num_layers=num_layers),
        transformer_2=tiny_wan_transformer(seed + 2, num_layers=num_layers) if pair else None,
        boundary_ratio=BOUNDARY_RATIO if pair else None,
        expand_timesteps=expand_timesteps,
    )


def save_tiny_wan_pipeline(directory: str | Path, seed: int = 0, **kw):
    """Build a tiny Wan pipeline (``build_tiny_wan_pipeline(seed, **kw)``) and ``save_pretrained`` it to
    ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    build_tiny_wan_pipeline(seed, **kw).save_pretrained(directory, safe_serialization=True)
    return directory

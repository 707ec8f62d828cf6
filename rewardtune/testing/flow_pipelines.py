"""Tiny real SD3/SD3.5 and FLUX.1 pipelines built from configs and saved in diffusers format.

Tests use them as a user's local model: the same ``from_pretrained`` path as
``stabilityai/stable-diffusion-3.5-medium`` or ``black-forest-labs/FLUX.1-dev``, with the real part
layout (16-channel VAE with the family's scaling and shift factors, CLIP text encoders with the real
CLIP tokenizer, a T5 encoder with a T5 tokenizer, the hub's scheduler configs) and a few thousand
parameters per part. Nothing here downloads: the CLIP tokenizer is derived from open_clip's shipped BPE
merges and the T5 tokenizer is a small unigram vocabulary built in memory.

Variants: ``sd3`` (SD3.5-Medium-like: one dual-attention block, RMS q/k norm), ``sd3``/``turbo`` (the same
files: SD3.5-Large and its Turbo share them; only the sampling defaults differ), ``flux`` (FLUX.1-dev-like:
guidance embedding, dynamic shift) and ``flux``/``schnell`` (no guidance embedding, no shift).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..clip_tokenizer import write_clip_tokenizer
from ..finetune.prompts import BUILTIN_DIR

# The hub's scheduler configs (FlowMatchEulerDiscreteScheduler) of the real models.
SCHEDULERS = {
    "sd3": dict(num_train_timesteps=1000, shift=3.0),
    "flux": dict(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    ),
    "flux-schnell": dict(
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=False,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    ),
}
# The real VAEs' latent scaling and shift.
VAE_FACTORS = {"sd3": (1.5305, 0.0609), "flux": (0.3611, 0.1159)}
T5_SPECIAL = ["<pad>", "</s>", "<unk>"]


def prompt_words(extra: list[str] | None = None) -> list[str]:
    """The lower-case words of the bundled prompt sets (and ``extra``): the tiny tokenizers' vocabulary."""

    text = " ".join(p.read_text() for p in sorted(BUILTIN_DIR.glob("*.txt")))
    text += " " + " ".join(extra or [])
    return sorted(set(re.findall(r"[a-z]+", text.lower())))


def t5_tokenizer(words: list[str]):
    """A T5 tokenizer (unigram, like the real sentencepiece one) over ``words``, built without sentencepiece:
    whole words as '▁word' pieces, single characters as the fallback, ids 0/1/2 = pad/eos/unk as in T5."""
    from transformers import T5Tokenizer

    chars = sorted(set("".join(words)) | set("0123456789.,;:!?'\"-()"))
    vocab = [(t, 0.0) for t in T5_SPECIAL] + [("▁" + w, -5.0 - 0.001 * i) for i, w in enumerate(words)]
    vocab += [("▁", -12.0)] + [(c, -15.0) for c in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def tiny_t5_encoder(vocab_size: int, d_model: int = 32, umt5: bool = False):
    """A two-layer T5 encoder (SD3's and FLUX's text_encoder_3/2), or with ``umt5`` the same sizes as UMT5 (Wan's)."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config, model = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    return model(
        config(
            vocab_size=vocab_size,
            d_model=d_model,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )


def _clip_text(vocab_size: int, hidden: int, projection_dim: int | None):
    """A CLIP text tower; with ``projection_dim`` the SD3-style model with a text projection."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        hidden_act="gelu",
        projection_dim=projection_dim or hidden,
    )
    return CLIPTextModelWithProjection(config) if projection_dim else CLIPTextModel(config)


def tiny_flow_vae(family: str, channels: tuple[int, ...] = (8, 8, 16, 16)):
    """A 16-channel AutoencoderKL laid out like SD3's and FLUX's (no quant convs, scaling and shift factors);
    4 blocks, so images are 8x the latent size."""
    from diffusers import AutoencoderKL

    scaling, shift = VAE_FACTORS[family]
    n = len(channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=list(channels),
        layers_per_block=1,
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        latent_channels=16,
        norm_num_groups=2,
        sample_size=32,
        scaling_factor=scaling,
        shift_factor=shift,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def build_tiny_flow_pipeline(
    family: str = "sd3",
    variant: str = "",
    seed: int = 0,
    tokenizer_dir: Path | None = None,
    words: list[str] | None = None,
):
    """A tiny random ``StableDiffusion3Pipeline`` (``family='sd3'``) or ``FluxPipeline`` (``'flux'``).

    ``variant``: '' (SD3.5-Medium-like / FLUX.1-dev-like), 'turbo' (sd3: the same files) or 'schnell' (flux: no
    guidance embedding, no shift). ``tokenizer_dir``: where the CLIP tokenizer files are written first.
    The native size is 32 px (SD3: sample_size 4 latents; FLUX: pass height/width)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTokenizer

    if family not in ("sd3", "flux") or variant not in ("", {"sd3": "turbo", "flux": "schnell"}[family]):
        raise ValueError(
            f"unknown tiny flow model {family!r}/{variant!r}; families: sd3 ('' or 'turbo'), flux ('' or 'schnell')"
        )
    if tokenizer_dir is None:
        raise ValueError("tokenizer_dir is required (the CLIP tokenizer is written there first)")
    words = prompt_words(words)
    vocab_size = write_clip_tokenizer(tokenizer_dir, words)
    clip_tok = CLIPTokenizer.from_pretrained(tokenizer_dir)
    t5_tok = t5_tokenizer(words)
    torch.manual_seed(seed)
    vae = tiny_flow_vae(family)
    if family == "sd3":
        from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

        # CLIP-L and CLIP-G (16 + 16 penultimate features, padded to T5's 32) and pooled 16 + 16, as 768 + 1280 -> 4096.
        te, te2, te3 = _clip_text(vocab_size, 16, 16), _clip_text(vocab_size, 16, 16), tiny_t5_encoder(len(t5_tok), 32)
        transformer = SD3Transformer2DModel(
            sample_size=4,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=32,
            caption_projection_dim=16,
            pooled_projection_dim=32,
            pos_embed_max_size=8,
            dual_attention_layers=(0,),
            qk_norm="rms_norm",
        )
        scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULERS["sd3"])
        return StableDiffusion3Pipeline(
            transformer=transformer,
            scheduler=scheduler,
            vae=vae,
            text_encoder=te,
            tokenizer=clip_tok,
            text_encoder_2=te2,
            tokenizer_2=clip_tok,
            text_encoder_3=te3,
            tokenizer_3=t5_tok,
        )
    from diffusers import FluxPipeline, FluxTransformer2DModel

    schnell = variant == "schnell"
    te, te2 = _clip_text(vocab_size, 16, None), tiny_t5_encoder(len(t5_tok), 32)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=16,
        guidance_embeds=not schnell,
        axes_dims_rope=(4, 6, 6),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULERS["flux-schnell" if schnell else "flux"])
    return FluxPipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=te,
        tokenizer=clip_tok,
        text_encoder_2=te2,
        tokenizer_2=t5_tok,
    )


def save_tiny_flow_pipeline(directory: str | Path, family: str = "sd3", variant: str = "", seed: int = 0) -> Path:
    """Build a tiny flow pipeline (see ``build_tiny_flow_pipeline``) and ``save_pretrained`` it to ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pipe = build_tiny_flow_pipeline(family, variant, seed, tokenizer_dir=directory / "tokenizer")
    pipe.save_pretrained(directory, safe_serialization=True)
    return directory

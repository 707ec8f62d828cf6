"""A tiny real Qwen-Image pipeline (``QwenImagePipeline``) built from configs and saved in diffusers format.

Tests use it as a user's local copy of ``Qwen/Qwen-Image``: the real part classes and layout -- a
``QwenImageTransformer2DModel`` (packed 2x2 latent patches, 3-axis rotary positions), a 3-D
``AutoencoderKLQwenImage`` with Qwen-Image's 16 latent channels and their per-channel ``latents_mean`` /
``latents_std``, a ``Qwen2_5_VLForConditionalGeneration`` text encoder and a ``Qwen2Tokenizer``, and the hub's
scheduler config (dynamic exponential shift with ``shift_terminal``) -- with a few thousand parameters per part.

The tokenizer is a byte-level BPE (the real one's kind) whose merges make whole tokens of the words of the
bundled prompt sets and of the pipeline's system prompt, so that the template's first 34 tokens -- the ones
``QwenImagePipeline`` drops -- are its system part, as with the real tokenizer; nothing here downloads.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..clip_tokenizer import bpe, bytes_to_unicode
from .flow_pipelines import prompt_words

# Qwen/Qwen-Image scheduler/scheduler_config.json (see rewardtune/plan/configs/qwenimage_scheduler.json).
SCHEDULER = dict(
    base_image_seq_len=256,
    base_shift=0.5,
    invert_sigmas=False,
    max_image_seq_len=8192,
    max_shift=0.9,
    num_train_timesteps=1000,
    shift=1.0,
    shift_terminal=0.02,
    stochastic_sampling=False,
    time_shift_type="exponential",
    use_beta_sigmas=False,
    use_dynamic_shifting=True,
    use_exponential_sigmas=False,
    use_karras_sigmas=False,
)
# Qwen/Qwen-Image vae/config.json: the per-channel statistics of its 16 latent channels.
LATENTS_MEAN = [
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
]  # fmt: skip
LATENTS_STD = [
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
]  # fmt: skip
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # Qwen2's end of text and chat markers
ROLES = ["system", "user", "assistant"]


def write_qwen_tokenizer(directory: str | Path, words: list[str]) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` of a byte-level BPE in which each of ``words`` is one token, alone
    and after a space ('Ġword'), as Qwen2's tokenizer has them; any other text falls back to smaller pieces."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    alphabet = bytes_to_unicode()
    space = alphabet[[ord(c) for c in alphabet].index(288)]  # the byte-level character of ' ' ('Ġ')
    rank: dict[tuple[str, str], int] = {}
    for word in words:
        for form in (word, space + word):
            # what the merges so far make of it, then new merges (ranked after all others) joining those parts
            parts = bpe(list(form), rank)
            while len(parts) > 1:
                rank.setdefault((parts[0], parts[1]), len(rank))
                parts = [parts[0] + parts[1], *parts[2:]]
    merges = sorted(rank, key=rank.get)
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(alphabet + ["".join(m) for m in merges]))}
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return directory


def pipeline_template() -> tuple[str, int]:
    """(prompt template, tokens dropped) of the installed ``QwenImagePipeline`` (set in its constructor)."""
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=None)
    return pipe.prompt_template_encode, pipe.prompt_template_encode_start_idx


def qwen_tokenizer(directory: str | Path, words: list[str] | None = None):
    """A ``Qwen2Tokenizer`` whose files are written to ``directory``: whole-word tokens for the bundled prompt
    words, ``words`` and the words of the pipeline's template, Qwen's chat markers as special tokens."""
    from transformers import Qwen2Tokenizer

    template, _ = pipeline_template()
    vocab_words = sorted(set(prompt_words(words)) | set(re.findall(r"[A-Za-z]+", template.replace("{}", " "))))
    write_qwen_tokenizer(directory, vocab_words)
    tok = Qwen2Tokenizer.from_pretrained(str(directory))
    tok.add_special_tokens({"additional_special_tokens": SPECIAL[1:]})
    return tok


def tiny_qwen_text_encoder(vocab_size: int, hidden: int = 32):
    """A ``Qwen2_5_VLForConditionalGeneration`` (the class of Qwen-Image's Qwen2.5-VL-7B encoder) with two text
    layers of width ``hidden`` and a one-block vision tower that text prompts never reach."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    heads = 2
    half = hidden // heads // 2  # rotary frequencies per head, split over the (time, height, width) sections
    text = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=1024,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 1e6,
            "mrope_section": [half - 2 * (half // 3), half // 3, half // 3],
        },
        bos_token_id=None,
        eos_token_id=vocab_size - 1,
        pad_token_id=None,
    )
    vision = dict(
        depth=1,
        hidden_size=16,
        intermediate_size=16,
        num_heads=2,
        out_hidden_size=hidden,
        fullatt_block_indexes=[0],
        patch_size=4,
        window_size=8,
    )
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision)).eval()


def tiny_qwen_vae(base_dim: int = 8):
    """An ``AutoencoderKLQwenImage`` laid out like Qwen-Image's (16 latent channels with its per-channel
    statistics; three downsamplings, so images are 8x the latent size), ``base_dim`` channels wide."""
    from diffusers import AutoencoderKLQwenImage

    return AutoencoderKLQwenImage(
        base_dim=base_dim,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=LATENTS_MEAN,
        latents_std=LATENTS_STD,
    )


def tiny_qwen_transformer(text_dim: int = 32):
    """A ``QwenImageTransformer2DModel`` with Qwen-Image's latent layout (64 packed input channels: 2x2 patches of
    16, 16 out) and two dual-stream blocks of two 8-wide heads."""
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=64,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=text_dim,
        axes_dims_rope=(2, 2, 4),
    )


def build_tiny_qwenimage_pipeline(tokenizer_dir: str | Path, seed: int = 0, words: list[str] | None = None):
    """A tiny random ``QwenImagePipeline``; its tokenizer files are written to ``tokenizer_dir`` first. Native
    size: pass height/width (the pipeline's default, 128 latents = 1024 px, is the real model's)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    tok = qwen_tokenizer(tokenizer_dir, words)
    torch.manual_seed(seed)
    return QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER),
        vae=tiny_qwen_vae(),
        text_encoder=tiny_qwen_text_encoder(len(tok)),
        tokenizer=tok,
        transformer=tiny_qwen_transformer(),
    )


def save_tiny_qwenimage_pipeline(directory: str | Path, seed: int = 0) -> Path:
    """Build a tiny Qwen-Image pipeline (``build_tiny_qwenimage_pipeline``) and ``save_pretrained`` it to ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pipe = build_tiny_qwenimage_pipeline(directory / "tokenizer", seed)
    pipe.save_pretrained(directory, safe_serialization=True)
    return directory

"""A tiny real Z-Image pipeline (``ZImagePipeline``) built from configs and saved in diffusers format.

Tests use it as a user's local model, the same ``from_pretrained`` path as ``Tongyi-MAI/Z-Image-Turbo``, with the
real part layout: a ``ZImageTransformer2DModel`` (noise and context refiners, main layers, 2x2 patches, 3-axis
RoPE), the 16-channel VAE with Z-Image's scaling and shift factors (FLUX.1's VAE), a ``Qwen3Model`` text encoder and
a ``Qwen2Tokenizer`` (byte-level BPE) whose chat template renders prompts as Qwen3's does, ``enable_thinking``
switch included, and the hub's scheduler config. Nothing here downloads: the tokenizer's vocabulary is the byte
alphabet plus the words of the bundled prompt sets, built in memory.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..clip_tokenizer import bytes_to_unicode
from .flow_pipelines import prompt_words, tiny_flow_vae

# Tongyi-MAI/Z-Image-Turbo scheduler/scheduler_config.json (Tongyi-MAI/Z-Image: shift 6.0): a static shift, so the
# pipeline's mu (it passes one from the image-token count) does nothing unless a config turns dynamic shifting on.
SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
# Qwen3's special tokens (tokenizer_config.json): <|endoftext|> pads, <|im_end|> ends a turn.
PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
THINK = ("<think>", "</think>")
# Our own template for the chat format of Qwen3's: each message as <|im_start|>role\ncontent<|im_end|>\n, then the
# assistant's turn; with enable_thinking=False (and only then) an empty think block is prefilled.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)


def qwen_tokenizer(words: list[str]):
    """A ``Qwen2Tokenizer`` over the 256-symbol byte alphabet, with BPE merges that build each of ``words`` (with
    and without the leading-space symbol 'Ġ') left to right, Qwen3's special tokens and the chat template. Words after a
    space become one token each; a word at the start of a line may split where another word's merges rank first."""
    from transformers import Qwen2Tokenizer

    alphabet = bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(alphabet)}
    merges: list[tuple[str, str]] = []
    words = [*words, "user", "assistant", "system"]
    for piece in ["Ġ" + w for w in words] + words:  # words after a space first: those chains never collide
        left = piece[0]
        for ch in piece[1:]:
            if left + ch not in vocab:
                merges.append((left, ch))
                vocab[left + ch] = len(vocab)
            left += ch
    for token in (PAD, IM_START, IM_END, *THINK):
        vocab[token] = len(vocab)
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token=IM_END,
        pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END],
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _text_encoder(vocab_size: int, hidden: int, layers: int = 2):
    """A Qwen3 decoder without its LM head (the pipeline reads its hidden states), grouped-query attention as Qwen3-4B."""
    from transformers import Qwen3Config, Qwen3Model

    return Qwen3Model(
        Qwen3Config(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            max_position_embeddings=1024,
            rms_norm_eps=1e-6,
            rope_theta=1_000_000.0,
            tie_word_embeddings=True,
        )
    )


def build_tiny_zimage_pipeline(seed: int = 0, words: list[str] | None = None, scheduler: dict | None = None):
    """A tiny random ``ZImagePipeline``: 2x2 patches of 16 latent channels, one noise and one context refiner block,
    two main blocks of width 32 (two heads of 16 = RoPE axes 8 + 4 + 4), a two-layer Qwen3 of width 32 (the
    caption features), the 8x VAE. ``scheduler``: the scheduler config (default: Z-Image-Turbo's)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    tok = qwen_tokenizer(prompt_words(words))
    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=16,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        qk_norm=True,
        cap_feat_dim=32,
        rope_theta=256.0,
        t_scale=1000.0,
        axes_dims=[8, 4, 4],
        axes_lens=[640, 64, 64],  # caption positions up to 512 tokens + the image's; 64 patches a side (2048 px)
    )
    return ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**(scheduler or SCHEDULER)),
        vae=tiny_flow_vae("flux"),
        text_encoder=_text_encoder(len(tok), 32),
        tokenizer=tok,
        transformer=transformer,
    )


def save_tiny_zimage_pipeline(directory: str | Path, seed: int = 0, scheduler: dict | None = None) -> Path:
    """Build a tiny Z-Image pipeline (see ``build_tiny_zimage_pipeline``) and ``save_pretrained`` it to ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    build_tiny_zimage_pipeline(seed, scheduler=scheduler).save_pretrained(directory, safe_serialization=True)
    return directory

"""A tiny HPSv3 release on disk: ``HPSv3/HPSv3.safetensors`` (as ``MizzenAI/HPSv3`` holds it) and the Qwen2-VL base
``Qwen2-VL-7B-Instruct/`` (config.json in the hub's flat layout, tokenizer, chat template), with random weights.

The checkpoint is written as the release's training saved it under transformers 4.45: the language model as
``model.*``, the vision tower as ``visual.*``, an ``lm_head`` and the ``rm_head``, the embeddings resized to the
tokenizer with ``<|Reward|>`` added. The tokenizer is a byte-level BPE (Qwen2's kind) whose whole-word tokens are
the instruction's words and the given prompts' words, with Qwen2-VL's special tokens. Nothing here downloads.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..rewards.hpsv3 import INSTRUCTION, REWARD_TOKEN, reward_head
from .qwenimage_pipelines import write_qwen_tokenizer

# Qwen2-VL's special tokens, in the order of their ids (151643...151656 in the real tokenizer).
SPECIAL = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
]  # fmt: skip
# Qwen/Qwen2-VL-7B-Instruct chat_template.json
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)
WORDS = sorted(
    set(re.findall(r"[A-Za-z]+", INSTRUCTION))
    | {"Please", "provide", "the", "overall", "ratings", "END", "system", "user", "assistant", "helpful"}
)


def tiny_base_config(vocab_size: int) -> dict:
    """A Qwen2-VL config.json in the hub's flat layout: 2 text layers of width 32, a 2-block vision tower of width 16."""
    ids = {name: vocab_size - len(SPECIAL) + i for i, name in enumerate(SPECIAL)}
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "model_type": "qwen2_vl",
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "hidden_act": "silu",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 2,
        "num_hidden_layers": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_sliding_window": False,
        "vocab_size": vocab_size,
        "vision_config": {
            "depth": 2,
            "embed_dim": 16,
            "mlp_ratio": 2,
            "num_heads": 2,
            "in_chans": 3,
            "hidden_size": 32,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },  # fmt: skip
    }


def save_tiny_base(directory: str | Path, words: list[str] = ()) -> Path:
    """Write the tiny Qwen2-VL base (config, tokenizer, chat template; no weights) to ``directory``."""
    from transformers import Qwen2Tokenizer

    directory = Path(directory)
    write_qwen_tokenizer(directory, sorted(set(WORDS) | {w for p in words for w in re.findall(r"[A-Za-z]+", p)}))
    tok = Qwen2Tokenizer.from_pretrained(str(directory), unk_token=None, bos_token=None, eos_token="<|im_end|>",
                                         pad_token="<|endoftext|>")  # fmt: skip
    tok.add_special_tokens({"additional_special_tokens": SPECIAL[1:]})
    tok.add_special_tokens({"pad_token": "<|endoftext|>"})
    tok.save_pretrained(str(directory))
    (directory / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2))
    (directory / "config.json").write_text(json.dumps(tiny_base_config(len(tok)), indent=2))
    return directory


def tiny_release_state(base_dir: str | Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random fp32 weights of the tiny release in transformers 4.45's key names (see the module docstring)."""
    from transformers import AutoTokenizer, Qwen2VLConfig, Qwen2VLForConditionalGeneration

    base_dir = Path(base_dir)
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    tok.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
    config = Qwen2VLConfig(**json.loads((base_dir / "config.json").read_text()))
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).float()
    model.resize_token_embeddings(len(tok), mean_resizing=False)  # train.py create_model_and_processor
    head = reward_head(config.text_config.hidden_size)
    state = {}
    for key, value in model.state_dict().items():
        # transformers 5 names -> 4.45's (the release's Qwen2VLRewardModelBT under transformers==4.45.2)
        key = key.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
        state[key] = (value + 0.02 * torch.randn_like(value)).contiguous()  # norms off 1, biases off 0
    state.update({f"rm_head.{k}": v for k, v in head.state_dict().items()})
    return state


def save_tiny_hpsv3(directory: str | Path, seed: int = 0, words: list[str] = ()) -> tuple[Path, Path]:
    """Write ``directory/HPSv3/HPSv3.safetensors`` and ``directory/Qwen2-VL-7B-Instruct/``; returns both dirs."""
    directory = Path(directory)
    base = save_tiny_base(directory / "Qwen2-VL-7B-Instruct", words)
    ckpt = directory / "HPSv3"
    ckpt.mkdir(parents=True, exist_ok=True)
    save_file(tiny_release_state(base, seed), str(ckpt / "HPSv3.safetensors"))
    return ckpt, base

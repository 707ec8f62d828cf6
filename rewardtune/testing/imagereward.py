"""A tiny random ImageReward in the hub's layout (``THUDM/ImageReward``): ``ImageReward.pt`` with the release's
tensor names, ``med_config.json``, and a BERT WordPiece tokenizer (``vocab.txt``) of a few words."""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

from ..rewards.imagereward import IMAGE_SIZE, build_towers, release_name, text_config, vision_config

# A ViT 128 wide (two 64-dim heads, as BLIP's ViTs have) of 7 x 7 patches at the release's 224 px, and a BERT 64
# wide with cross-attention: the release's shapes, small.
TINY_VISION = dict(width=128, layers=2, patch=32, image_size=IMAGE_SIZE, intermediate=256)
TINY_MED = {
    "architectures": ["BertModel"],
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 64,
    "initializer_range": 0.02,
    "intermediate_size": 128,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 40,
    "model_type": "bert",
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "pad_token_id": 0,
    "type_vocab_size": 2,
    "encoder_width": 768,  # as in the release's file; BLIP sets it to the ViT's width when it builds the model
    "add_cross_attention": True,
}
PROJECTION_DIM = 256  # BLIP's vision_proj / text_proj, unused by the score but present in the released file


def write_bert_vocab(directory: str | Path, words: list[str] | None = None) -> int:
    """A lower-case WordPiece ``vocab.txt`` laid out like BERT's (``[PAD]`` first, then the specials): ``words``,
    every letter and digit alone and as a ``##`` continuation, so any prompt tokenizes without ``[UNK]``, and
    ASCII punctuation. Returns the vocabulary size."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    chars = string.ascii_lowercase + string.digits
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.punctuation]
    vocab += [c for x in chars for c in (x, "##" + x)]
    vocab += [w for w in dict.fromkeys(w.lower() for w in words or []) if w not in vocab]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return len(vocab)


def _randomise(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Weights far from any init value, so that every part of the model moves the score."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if p.ndim == 1:
                p.copy_(1 + 0.1 * noise if "norm" in name.lower() and name.endswith("weight") else 0.05 * noise)
            elif name.endswith(("class_embedding", "position_embedding", "embeddings.weight")):
                p.copy_(0.5 * noise)
            else:
                p.copy_(noise / (p[0].numel() ** 0.5))


def save_tiny_imagereward(
    directory: str | Path, seed: int = 0, tokenizer_dir: str | Path | None = None, words: list[str] | None = None
) -> Path:
    """Write a tiny random ImageReward to ``directory`` as the hub lays it out; the tokenizer goes to
    ``tokenizer_dir`` when given (the hub's release has none), else into ``directory``. Returns ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab_size = write_bert_vocab(tokenizer_dir or directory, words) + 2  # BLIP adds [DEC] and [ENC]
    med = dict(TINY_MED, vocab_size=vocab_size)
    (directory / "med_config.json").write_text(json.dumps(med, indent=2) + "\n")
    generator = torch.Generator().manual_seed(seed)
    vision, text, head = build_towers(vision_config(**TINY_VISION), text_config(med, TINY_VISION["width"]))
    state = {}
    for prefix, module in (("vision.", vision), ("text.", text), ("head.", head)):
        _randomise(module, generator)
        state.update({release_name(prefix + k): v for k, v in module.state_dict().items()})
    for name, width in (("vision_proj", TINY_VISION["width"]), ("text_proj", med["hidden_size"])):
        state[f"blip.{name}.weight"] = torch.randn(PROJECTION_DIM, width, generator=generator) / width**0.5
        state[f"blip.{name}.bias"] = torch.zeros(PROJECTION_DIM)
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(med["max_position_embeddings"])[None]
    torch.save(state, directory / "ImageReward.pt")
    return directory

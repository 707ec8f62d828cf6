"""Tiny real models built offline: the CLIP tokenizer from open_clip's shipped BPE merges, and small
CLIP models saved the way users' files look (HF directories, the released ICT/HP layouts).

Used by the tests, the demo world's bundled models and the benchmarks; nothing here downloads.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch

N_MERGES = 49152 - 256 - 2  # the merges CLIP uses out of open_clip's file
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP byte alphabet: printable bytes map to themselves, the rest to code points >= 256."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    order = keep + [b for b in range(256) if b not in keep]
    return [chars[b] for b in order]


def clip_merges() -> list[tuple[str, str]]:
    """The 48,894 BPE merges of CLIP, read from the file open_clip ships."""
    from open_clip.tokenizer import default_bpe

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    return [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]


def _merges_used(words: list[str], merges: list[tuple[str, str]]) -> set[tuple[str, str]]:
    """The merges BPE applies when tokenising ``words`` (so a reduced vocabulary tokenises them alike)."""
    rank = {m: i for i, m in enumerate(merges)}
    used = set()
    for word in words:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = [(parts[i], parts[i + 1]) for i in range(len(parts) - 1)]
            best = min(pairs, key=lambda p: rank.get(p, 1 << 30))
            if best not in rank:
                break
            used.add(best)
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
    return used


def write_clip_tokenizer(directory: str | Path, words: list[str] | None = None) -> int:
    """Write ``vocab.json``, ``merges.txt`` and tokenizer configs for ``transformers.CLIPTokenizer``.

    With ``words``, keep only the merges those (lower-case) words need: a small vocabulary that
    tokenises them exactly as full CLIP does, for tiny models. Returns the vocabulary size.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    merges = clip_merges()
    if words is not None:
        used = _merges_used(sorted({w.lower() for w in words if w}), merges)
        merges = [m for m in merges if m in used]
    alphabet = _bytes_to_unicode()
    vocab_list = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "do_lower_case": True,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (directory / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}, indent=2)
    )
    return len(vocab_list)


def tiny_clip_config(vocab_size: int, projection_dim: int = 1024, image_size: int = 224, patch_size: int = 32,
                     hidden: int = 32, layers: int = 2, heads: int = 4):
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                         bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1),
        vision_config=dict(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                           num_attention_heads=heads, image_size=image_size, patch_size=patch_size),
        projection_dim=projection_dim,
    )


def write_clip_processor(directory: str | Path, image_size: int) -> None:
    """The image preprocessor config CLIP checkpoints ship (shortest edge resize, centre crop, CLIP mean/std)."""
    from transformers import CLIPImageProcessor

    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}).save_pretrained(directory)


def save_tiny_clip(directory: str | Path, seed: int = 0, words: list[str] | None = None, **config_kw):
    """Build a tiny random CLIPModel with the real tokenizer and save it as an HF directory."""
    from transformers import CLIPModel

    directory = Path(directory)
    vocab_size = write_clip_tokenizer(directory, words)
    config = tiny_clip_config(vocab_size, **config_kw)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    model.save_pretrained(directory)
    write_clip_processor(directory, config.vision_config.image_size)
    return model


def perturbed_state_dict(model: torch.nn.Module, seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    """A copy of ``model``'s weights with small random changes: a stand-in for a fine-tuned checkpoint."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            v = v + scale * torch.randn(v.shape, generator=g, dtype=v.dtype) * (v.std() if v.numel() > 1 else 1.0)
        out[k] = v.clone()
    return out


def write_tiny_reward_world(out: str | Path) -> Path:
    """A self-contained offline playground: a tiny backbone, ICT and HP in the released layouts, and
    a few images. ``python -m rewardtune.tiny OUT`` writes it; ``rewardtune score`` can then run on it."""
    import numpy as np
    from PIL import Image

    from .rewards.icthp import HPHead

    out = Path(out)
    backbone = save_tiny_clip(out / "backbone", seed=0, projection_dim=1024)
    (out / "ict").mkdir(parents=True, exist_ok=True)
    torch.save(perturbed_state_dict(backbone, seed=1), out / "ict" / "pytorch_model.bin")
    for sub in ("hp_backbone", "hp_scorer"):
        (out / "hp" / sub).mkdir(parents=True, exist_ok=True)
    torch.save(perturbed_state_dict(backbone, seed=2), out / "hp" / "hp_backbone" / "pytorch_model.bin")
    torch.manual_seed(3)
    head = HPHead(1024)
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.05)
    torch.save(head.state_dict(), out / "hp" / "hp_scorer" / "mlp_pytorch_model.bin")
    rng = np.random.default_rng(0)
    for i, colour in enumerate([(220, 40, 40), (40, 60, 220), (240, 240, 240)]):
        img = np.full((224, 224, 3), colour, dtype=np.uint8)
        img[56:168, 56:168] = (rng.random((112, 112, 3)) * 255).astype(np.uint8)
        Image.fromarray(img).save(out / f"image{i}.png")
    return out


if __name__ == "__main__":
    import sys

    print(write_tiny_reward_world(sys.argv[1] if len(sys.argv) > 1 else "tiny-world"))

"""Tiny random CLIP models saved the way users' files look: HF directories with the real tokenizer, and ICT/HP
in their released layouts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..clip_tokenizer import write_clip_tokenizer
from ..rewards.icthp import HPHead

# A tiny CLIP at 32 px (4 x 4 patches of 8 px), 32 wide, 2 layers, 4 heads, 32-d projections: the tests' reward
# towers over small images (Pick-High-like sets, the demo world), spelled once for every test that saves one.
SMALL_IMAGE_CLIP = dict(projection_dim=32, image_size=32, patch_size=8, hidden=32, layers=2, heads=4)


def tiny_clip_config(
    vocab_size: int,
    projection_dim: int = 1024,
    image_size: int = 224,
    patch_size: int = 32,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
):
    """A ``CLIPConfig`` of the given sizes whose special token ids are the last two of ``vocab_size``, as the
    tokenizer written by ``write_clip_tokenizer`` numbers them."""
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=hidden * 2,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=77,
            bos_token_id=vocab_size - 2,
            eos_token_id=vocab_size - 1,
            pad_token_id=vocab_size - 1,
        ),
        vision_config=dict(
            hidden_size=hidden,
            intermediate_size=hidden * 2,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            image_size=image_size,
            patch_size=patch_size,
        ),
        projection_dim=projection_dim,
    )


def write_clip_processor(directory: str | Path, image_size: int) -> None:
    """The image preprocessor config CLIP checkpoints ship (shortest edge resize, centre crop, CLIP mean/std)."""
    from transformers import CLIPImageProcessor

    CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    ).save_pretrained(directory)


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
    a few images. ``python -m rewardtune.testing OUT`` writes it; ``rewardtune score`` can then run on it."""
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

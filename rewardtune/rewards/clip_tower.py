"""An HF CLIP model with its tokenizer and torch preprocessing: text and image embeddings."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from ..sources import find_file
from .base import ClipPreprocess, Reward, embedding


class ClipTower(nn.Module):
    """Wraps ``transformers.CLIPModel``: ``encode_text(prompts)``, ``encode_image(images in [0,1])``."""

    def __init__(self, model, tokenizer, mean=None, std=None):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        size = model.config.vision_config.image_size
        kw = {}
        if mean is not None:
            kw = {"mean": mean, "std": std}
        self.preprocess = ClipPreprocess(size, **kw)

    @classmethod
    def from_dir(cls, directory: Path, what: str, dtype: torch.dtype | None = None) -> "ClipTower":
        from transformers import CLIPModel, CLIPTokenizer

        directory = Path(directory)
        find_file(directory, ["config.json"], what)
        find_file(directory, ["model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                              "pytorch_model.bin.index.json"], what)
        find_file(directory, ["vocab.json", "tokenizer.json"], f"{what} tokenizer")
        try:
            model = CLIPModel.from_pretrained(str(directory), dtype=dtype or torch.float32)
        except Exception as exc:
            raise UserError(f"{what}: could not load a CLIP model from '{directory}' ({type(exc).__name__}: {str(exc)[:200]})") from None
        try:
            tokenizer = CLIPTokenizer.from_pretrained(str(directory))
        except Exception as exc:
            raise UserError(f"{what}: could not load the CLIP tokenizer from '{directory}' ({type(exc).__name__})") from None
        mean = std = None
        pre = directory / "preprocessor_config.json"
        if pre.is_file():
            import json

            cfg = json.loads(pre.read_text())
            mean, std = cfg.get("image_mean"), cfg.get("image_std")
        return cls(model.eval(), tokenizer, mean, std)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        max_len = min(int(getattr(self.tokenizer, "model_max_length", 77) or 77),
                      self.model.config.text_config.max_position_embeddings)
        tok = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
        return {"input_ids": tok["input_ids"].to(self.device), "attention_mask": tok["attention_mask"].to(self.device)}

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        return embedding(self.model.get_text_features(**self.tokenize(prompts))).float()

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        pixels = self.preprocess(images.to(self.device)).to(self.dtype)
        return embedding(self.model.get_image_features(pixel_values=pixels)).float()


def normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class CosineReward(Reward):
    """Cosine of the L2-normalised text and image embeddings of one CLIP tower, in [-1, 1]."""

    def __init__(self, tower: ClipTower):
        super().__init__()
        self.tower = tower

    def cosines(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return (normalize(self.tower.encode_text(prompts)) * normalize(self.tower.encode_image(images))).sum(-1)

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        self.check_inputs(images, prompts)
        return self.cosines(images, prompts)

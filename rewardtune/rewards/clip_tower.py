"""An HF CLIP model with its tokenizer and torch preprocessing: text and image embeddings.

The preprocessing is CLIP's, written in torch so that rewards stay differentiable in the pixels: no PIL
round trip, no ``no_grad``, no clamp.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..prompt_checks import hf_token_counts
from ..sources import find_file
from .base import Reward

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
WEIGHT_FILES = [
    "model.safetensors",
    "pytorch_model.bin",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
]
TOKENIZER_FILES = ["vocab.json", "tokenizer.json"]


MAX_ASPECT = 4  # images longer than this many times their width (or wider) are cropped first (see forward)


class ClipPreprocess(nn.Module):
    """CLIP's image preprocessing in torch: resize the shortest edge (bicubic, antialiased), centre crop,
    normalise with the given mean/std. The resize is skipped when the size already matches, so on
    ``size``x``size`` inputs this is exactly CLIPImageProcessor's arithmetic on float pixels."""

    def __init__(self, size: int, mean=CLIP_MEAN, std=CLIP_STD):
        super().__init__()
        self.size = int(size)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        s = self.size
        if max(h, w) > MAX_ASPECT * min(h, w):  # only the centre square is kept: crop to 4:1 before resizing, or a
            # 100000 x 1 image would be resized to 22400000 x 224 (60 GB) on the way
            long = MAX_ASPECT * min(h, w)
            images = (
                images[..., (h - long) // 2 : (h + long) // 2, :]
                if h > w
                else images[..., (w - long) // 2 : (w + long) // 2]
            )
            h, w = images.shape[-2:]
        if min(h, w) != s:
            scale = s / min(h, w)
            nh, nw = max(s, round(h * scale)), max(s, round(w * scale))
            images = F.interpolate(images.float(), size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
            h, w = nh, nw
        top, left = (h - s) // 2, (w - s) // 2
        images = images[..., top : top + s, left : left + s]
        return (images - self.mean.to(images)) / self.std.to(images)


def embedding(output) -> torch.Tensor:
    """The embedding from ``get_text_features``/``get_image_features``: a tensor in transformers 4,
    an output object whose ``pooler_output`` holds it in transformers 5."""
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if pooled is None:
        raise TypeError(f"cannot find an embedding in {type(output).__name__}")
    return pooled


def _image_stats(*directories: Path):
    """``image_mean``/``image_std`` from the first ``preprocessor_config.json`` found (None: CLIP's)."""
    for d in directories:
        pre = d / "preprocessor_config.json"
        if pre.is_file():
            cfg = json.loads(pre.read_text())
            return cfg.get("image_mean"), cfg.get("image_std")
    return None, None


class ClipTower(nn.Module):
    """Wraps ``transformers.CLIPModel``: ``encode_text(prompts)``, ``encode_image(images in [0,1])``.
    Prompts longer than ``max_tokens`` are cut there; ``count_truncated`` says how many would be."""

    label = "CLIP text encoder"

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
    def from_dir(
        cls,
        directory: Path,
        what: str,
        dtype: torch.dtype | None = None,
        tokenizer_dir: Path | None = None,
        tokenizer_what: str | None = None,
    ) -> ClipTower:
        """An HF CLIP directory; the tokenizer (and, if the model has none, the preprocessor config) may come
        from ``tokenizer_dir`` instead, for models released without them (PickScore). ``what`` and
        ``tokenizer_what`` name the two in error messages."""
        from transformers import CLIPModel, CLIPTokenizer

        directory = Path(directory)
        tok_dir = directory if tokenizer_dir is None else Path(tokenizer_dir)
        tok_what = tokenizer_what or f"{what} tokenizer"
        find_file(directory, ["config.json"], what)
        find_file(directory, WEIGHT_FILES, what)
        find_file(tok_dir, TOKENIZER_FILES, tok_what)
        try:
            model = CLIPModel.from_pretrained(str(directory), dtype=dtype or torch.float32)
        except Exception as exc:
            raise UserError(
                f"{what}: could not load a CLIP model from '{directory}' ({type(exc).__name__}: {str(exc)[:200]})"
            ) from None
        try:
            tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))
        except Exception as exc:
            raise UserError(
                f"{tok_what}: could not load the CLIP tokenizer from '{tok_dir}' ({type(exc).__name__})"
            ) from None
        mean, std = _image_stats(directory, tok_dir)
        return cls(model.eval(), tokenizer, mean, std)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def max_tokens(self) -> int:
        """Tokens the text encoder reads (special tokens included): the tokenizer's and the model's limit."""
        return min(
            int(getattr(self.tokenizer, "model_max_length", 77) or 77),
            self.model.config.text_config.max_position_embeddings,
        )

    def count_truncated(self, prompts: list[str]) -> int:
        """How many of ``prompts`` ``tokenize`` cuts."""
        limit = self.max_tokens
        return sum(n > limit for n in hf_token_counts(self.tokenizer, list(prompts)))

    def tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        tok = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=self.max_tokens, return_tensors="pt"
        )
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

    def text_limits(self) -> list:
        return [self.tower]

    def cosines(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return (normalize(self.tower.encode_text(prompts)) * normalize(self.tower.encode_image(images))).sum(-1)

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        self.check_inputs(images, prompts)
        return self.cosines(images, prompts)

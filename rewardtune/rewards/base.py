"""The one reward interface and its torch-side preprocessing.

A reward is an ``nn.Module``: ``reward(images, prompts) -> (B,)`` for float images ``(B,3,H,W)`` in
[0,1] of any size. Everything here is differentiable in the pixels: no PIL round trip, no ``no_grad``,
no clamp.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class Reward(nn.Module):
    """Base class: subclasses implement ``forward(images, prompts) -> (B,)``."""

    name: str = "reward"
    needs_prompts: bool = True

    def check_inputs(self, images: torch.Tensor, prompts: list[str] | None) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise UserError(f"{self.name}: images must be (B,3,H,W), got shape {tuple(images.shape)}")
        if self.needs_prompts and (prompts is None or len(prompts) != images.shape[0]):
            n = 0 if prompts is None else len(prompts)
            raise UserError(f"{self.name}: got {images.shape[0]} images but {n} prompts; give one prompt per image")


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

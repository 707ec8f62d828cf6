"""The one reward interface.

A reward is an ``nn.Module``: ``reward(images, prompts) -> (B,)`` for float images ``(B,3,H,W)`` in
[0,1] of any size, differentiable in the pixels.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UserError


class Reward(nn.Module):
    """Base class: subclasses implement ``forward(images, prompts) -> (B,)``."""

    name: str = "reward"
    needs_prompts: bool = True

    def provenance(self) -> dict:
        """Which released weights this reward loaded, for the run's records: ``{name: {"version": ..., "weights":
        path}}`` where a reward has versions (HPS v2.0 / v2.1); empty otherwise."""
        return {}

    def text_limits(self) -> list:
        """The text encoders this reward reads prompts with, as ``prompt_checks`` limits (none by default)."""
        return []

    def check_inputs(self, images: torch.Tensor, prompts: list[str] | None) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise UserError(f"{self.name}: images must be (B,3,H,W), got shape {tuple(images.shape)}")
        if self.needs_prompts and (prompts is None or len(prompts) != images.shape[0]):
            n = 0 if prompts is None else len(prompts)
            raise UserError(f"{self.name}: got {images.shape[0]} images but {n} prompts; give one prompt per image")

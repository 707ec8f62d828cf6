"""A scalar reward from an MLP head on one CLIP tower's image embedding: HP and the LAION aesthetic predictor
share this shape (and the head's layout), differing only in the embedding's normalisation and the output's
activation."""

from __future__ import annotations

import torch
from torch import nn

from ..sources import apply_state_dict
from .base import Reward
from .clip_tower import ClipTower, normalize


class HPHead(nn.Module):
    """The released HP scorer: Linear d→1024, Dropout .2, →128, Dropout .2, →64, Dropout .1, →16, →1.
    Parameter names (``layers.0`` … ``layers.7``) match ``mlp_pytorch_model.bin``; the LAION aesthetic
    predictor's MLP is the same module with the same names."""

    def __init__(self, input_dim: int = 1024, hidden_dim: int = 1024):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_dim, hidden_dim),
            nn.Dropout(0.2),
            nn.Linear(hidden_dim, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )
        for name, p in self.layers.named_parameters():
            if name.endswith("weight"):
                nn.init.normal_(p, std=1.0 / (input_dim + 1))
            else:
                nn.init.zeros_(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class TowerHeadReward(Reward):
    """``activation(head(image embedding))`` on one CLIP tower; prompts are not used. Subclasses set
    ``normalize_embedding`` (L2-normalise the embedding before the head) and ``activation``."""

    needs_prompts = False
    normalize_embedding = False

    def __init__(self, tower: ClipTower, head: HPHead):
        super().__init__()
        self.tower = tower
        self.head = head

    @classmethod
    def from_head_state(cls, tower: ClipTower, state: dict[str, torch.Tensor], what: str) -> TowerHeadReward:
        """This reward over ``tower`` with a head sized to its projection and loaded from ``state``."""
        head = HPHead(input_dim=tower.model.config.projection_dim)
        apply_state_dict(head, state, what)
        return cls(tower, head.eval())

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Raw head output (before the activation); for HP, what the paper's margin losses rank."""
        features = self.tower.encode_image(images)
        if self.normalize_embedding:
            features = normalize(features)
        return self.head(features).squeeze(-1)

    def activation(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def forward(self, images: torch.Tensor, prompts: list[str] | None = None) -> torch.Tensor:
        self.check_inputs(images, prompts)
        return self.activation(self.logits(images))

"""Weighted mixes of rewards: ``ict:1.0,hp:0.5``."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import UserError
from .base import Reward


def parse_spec(spec: str) -> list[tuple[str, float | None]]:
    """``"icthp"`` -> [("icthp", None)]; ``"ict:1.0,hp:0.5"`` -> [("ict", 1.0), ("hp", 0.5)]."""
    parts = [p.strip() for p in str(spec).split(",") if p.strip()]
    if not parts:
        raise UserError("reward: empty reward spec; give a name like 'icthp' or a mix like 'ict:1.0,hp:0.5'")
    out = []
    for part in parts:
        if ":" in part:
            name, w = part.split(":", 1)
            try:
                weight = float(w)
            except ValueError:
                raise UserError(f"reward: weight '{w}' of '{name}' is not a number; write e.g. '{name}:0.5'") from None
            if not math.isfinite(weight):
                raise UserError(
                    f"reward: weight '{w.strip()}' of '{name.strip()}' is not a finite number; "
                    f"write e.g. '{name.strip()}:0.5'"
                )
            out.append((name.strip().lower(), weight))
        else:
            out.append((part.lower(), None))
    return out


class WeightedSum(Reward):
    """sum_i w_i * reward_i(images, prompts)."""

    name = "mix"

    def __init__(self, rewards: dict[str, Reward], weights: dict[str, float]):
        super().__init__()
        # a module name cannot hold a dot ("hpsv2.1"): the modules are kept under "hpsv2_1", the names as given
        self.rewards = nn.ModuleDict({k.replace(".", "_"): r for k, r in rewards.items()})
        self.keys = {k: k.replace(".", "_") for k in rewards}
        self.weights = dict(weights)
        self.name = ",".join(f"{k}:{w:g}" for k, w in self.weights.items())

    def provenance(self) -> dict:
        return {k: v for key, module in self.keys.items() for k, v in self.rewards[module].provenance().items()}

    def text_limits(self) -> list:
        return [limit for reward in self.rewards.values() for limit in reward.text_limits()]

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        total = 0
        for key, module in self.keys.items():
            total = total + self.weights[key] * self.rewards[module](images, prompts)
        return total

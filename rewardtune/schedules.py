"""Learning-rate schedules shared by reward training and fine-tuning, as a multiplier of the peak lr.

A pure function of the step, so a resumed run needs no scheduler state: the step counter is enough."""

from __future__ import annotations

import math
from collections.abc import Callable

LR_SCHEDULES = ("linear", "cosine", "constant")


def lr_factor(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    """Multiplier of the peak lr at (0-based) ``step``: linear warmup over ``warmup`` steps, then linear or
    cosine decay to 0 at ``total``, or constant."""
    if kind not in LR_SCHEDULES:
        raise ValueError(f"unknown lr schedule '{kind}'; valid: {', '.join(LR_SCHEDULES)}")

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant" or total <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / (total - warmup))
        return 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor

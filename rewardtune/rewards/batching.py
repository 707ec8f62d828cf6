"""Scoring a list of images of mixed sizes: rewards take any size, but one batch needs one size."""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from tqdm import tqdm


def score_by_size(
    fn: Callable[[torch.Tensor, list[str]], torch.Tensor],
    images: list[torch.Tensor],
    prompts: list[str],
    batch_size: int | None = None,
    device=None,
    desc: str | None = None,
) -> torch.Tensor:
    """``fn(batch, batch_prompts)`` over (3,H,W) ``images``, batched by size (at most ``batch_size`` a batch,
    sizes in order of first appearance); float results on the CPU, in input order, shaped ``(N, *fn's
    per-image shape)``. ``desc`` shows a progress bar on stderr when there are two batches or more."""
    groups: dict[tuple, list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(tuple(im.shape), []).append(i)
    step = batch_size or len(images)
    batches = [idx[s : s + step] for idx in groups.values() for s in range(0, len(idx), step)]
    out = None
    for idx in tqdm(batches, desc=desc, unit="batch", file=sys.stderr, disable=desc is None or len(batches) < 2):
        x = torch.stack([images[i] for i in idx])
        scores = fn(x if device is None else x.to(device), [prompts[i] for i in idx]).float().cpu()
        if out is None:
            out = scores.new_empty((len(images), *scores.shape[1:]))
        out[idx] = scores
    return out if out is not None else torch.empty(0)

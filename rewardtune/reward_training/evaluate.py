"""Triplet accuracy, the paper's comparison table: how often a reward ranks I2 > I1, I3 > I2 and I3 > I1.

Ties count as wrong. Every reward ranks with its own scalar score against the easy prompt, except
``icthp``, which ranks as the paper does: ICT cosines times the HP scores softmaxed over the triplet.
"""

from __future__ import annotations

import sys

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..data import TripletDataset, collate, load_triplets
from ..losses import icthp_scores
from ..prompt_checks import report_long_prompts, reward_limits
from ..rewards.base import Reward
from ..rewards.batching import score_by_size
from ..rewards.icthp import ICTHPReward

PAIRS = {"I2>I1": (1, 0), "I3>I2": (2, 1), "I3>I1": (2, 0)}


def triplet_accuracy(scores: torch.Tensor) -> dict:
    """``scores`` (N, 3) for (I1, I2, I3) -> accuracy of each pair, their mean ``avg``, and ``n``."""
    scores = scores.float()
    n = scores.shape[0]
    out = {k: int((scores[:, win] > scores[:, lose]).sum()) / n for k, (win, lose) in PAIRS.items()}
    out["avg"] = sum(out[k] for k in PAIRS) / len(PAIRS)
    out["n"] = int(n)
    return out


def score_triplets(reward: Reward, images: list[list[torch.Tensor]], prompts: list[str], device=None) -> torch.Tensor:
    """(B, 3) scores of each row's (I1, I2, I3) against its prompt."""

    columns = [[row[k] for row in images] for k in range(3)]
    if isinstance(reward, ICTHPReward):
        ict = torch.stack([score_by_size(reward.ict.cosines, c, prompts, device=device) for c in columns], -1)
        hp = [score_by_size(lambda x, p: reward.hp.logits(x), c, prompts, device=device) for c in columns]
        return icthp_scores(ict, *hp)
    return torch.stack([score_by_size(reward, c, prompts, device=device) for c in columns], -1)


def _device_of(module: torch.nn.Module):
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def evaluate_rewards(
    data_root,
    split: str,
    rewards: dict[str, Reward],
    batch_size: int = 16,
    limit: int = 0,
    trust_pickle: bool = False,
    skip_bad: bool = False,
    check_images: bool = True,
    num_workers: int = 0,
    progress: bool = True,
) -> dict[str, dict]:
    """Triplet accuracy of each reward on ``split`` under ``data_root``:
    ``{name: {"I2>I1": a, "I3>I2": a, "I3>I1": a, "avg": a, "n": n}}`` with accuracies in [0, 1]."""

    table = load_triplets(
        data_root, split, trust_pickle=trust_pickle, skip_bad=skip_bad, check_images=check_images, limit=limit or None
    )
    report_long_prompts(table.easy_prompt, reward_limits(rewards), where=f" in split '{split}'")
    loader = DataLoader(TripletDataset(table), batch_size=batch_size, num_workers=num_workers, collate_fn=collate)
    scores: dict[str, list[torch.Tensor]] = {name: [] for name in rewards}
    for batch in tqdm(
        loader, desc=f"evaluating on {split}", unit="batch", file=sys.stderr, disable=not progress or len(loader) < 2
    ):
        for name, reward in rewards.items():
            scores[name].append(score_triplets(reward, batch["images"], batch["easy_prompt"], _device_of(reward)))
    return {name: triplet_accuracy(torch.cat(s)) for name, s in scores.items()}

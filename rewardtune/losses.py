"""The paper's reward-training losses as pure functions (Ba et al., ICCV 2025, arXiv 2507.19002), and the
fine-tuning losses that turn a reward into a loss (``reward_loss``).

Features are L2-normalised, shape (B, D); labels and scores are shape (B,) (a trailing 1 is accepted).
Triplet order everywhere: I1 = Pick-a-Pic loser, I2 = winner, I3 = image of the refined prompt.
Under data parallelism, call these on features gathered with :func:`gather_with_grad`, so in-batch
negatives come from the whole global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .finetune.config import REWARD_LOSSES  # the choices of finetune --loss, declared with it


def negative_weight(cos: torch.Tensor, threshold: float = 6.0, sharpness: float = 20.0) -> torch.Tensor:
    """The paper's smooth weight on in-batch negatives: 1 / (1 + exp(sharpness * (|c| - threshold)))."""
    return torch.sigmoid(-sharpness * (cos.abs() - threshold))


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0]).float()


def _negatives(text: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Cosines of each prompt with the other rows' images of all three sets: (B, 3*(B-1))."""
    b = text.shape[0]
    cos = text.float() @ images.float().T  # (B, 3B): columns are I1 rows, then I2 rows, then I3 rows
    own = torch.eye(b, dtype=torch.bool, device=text.device).repeat(1, 3)
    return cos[~own].reshape(b, 3 * (b - 1))


def _negative_term(text: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    neg = _negatives(text, images)
    if neg.numel() == 0:  # a batch of one has no negatives
        return neg.sum()
    return (negative_weight(neg) * neg.square()).mean()


def triplet_cosines(text, img_lose, img_win, img_refine) -> torch.Tensor:
    """(B,3): each row's prompt against its own I1, I2, I3."""
    return torch.stack([(text.float() * img.float()).sum(-1) for img in (img_lose, img_win, img_refine)], -1)


def ict_loss(
    text_easy, text_refine, img_lose, img_win, img_refine, e1, e2, r1, r2, neg_weight: float = 0.5
) -> torch.Tensor:
    """ICT loss: MSE of the easy prompt's cosines with (I1, I2, I3) to (E1, E2, 1), the same for the
    refined prompt with (R1, R2, 1), plus ``neg_weight`` times the weighted mean squared cosine of each
    prompt with every other row's three images (pulled to 0)."""
    ones = torch.ones_like(_flat(e1))
    easy = triplet_cosines(text_easy, img_lose, img_win, img_refine)
    refine = triplet_cosines(text_refine, img_lose, img_win, img_refine)
    pos = F.mse_loss(easy, torch.stack([_flat(e1), _flat(e2), ones], -1)) + F.mse_loss(
        refine, torch.stack([_flat(r1), _flat(r2), ones], -1)
    )
    images = torch.cat([img_lose, img_win, img_refine], 0)
    neg = _negative_term(text_easy, images) + _negative_term(text_refine, images)
    return pos + neg_weight * neg


def hp_margin_loss(hp_lose, hp_win, hp_refine, margin: float = 0.3) -> torch.Tensor:
    """Mean margin ranking of I2 over I1 plus that of I3 over I2, on raw HP scores."""
    lose, win, refine = _flat(hp_lose), _flat(hp_win), _flat(hp_refine)
    one = torch.ones_like(win)
    return F.margin_ranking_loss(win, lose, one, margin=margin) + F.margin_ranking_loss(
        refine, win, one, margin=margin
    )


def icthp_scores(ict: torch.Tensor, hp_lose, hp_win, hp_refine) -> torch.Tensor:
    """ICT-HP over a triplet: ICT cosines (B,3) times the HP scores softmaxed over the triplet."""
    hp = torch.stack([_flat(hp_lose), _flat(hp_win), _flat(hp_refine)], -1)
    return ict.float() * torch.softmax(hp, dim=-1)


def icthp_loss(ict_easy, hp_lose, hp_win, hp_refine, margin: float = 0.3) -> torch.Tensor:
    """Margin ranking of I2 over I1 and I3 over I2 on :func:`icthp_scores`, summed over the batch
    (the released code sums here, where the HP margin loss averages)."""
    s = icthp_scores(ict_easy, hp_lose, hp_win, hp_refine)
    return (F.relu(margin - (s[:, 1] - s[:, 0])) + F.relu(margin - (s[:, 2] - s[:, 1]))).sum()


def reward_loss(rewards: torch.Tensor, kind: str = "reward", margin: float = 2.0) -> torch.Tensor:
    """Fine-tuning loss of a batch's rewards (B,): ``reward``: −mean(r); ``hinge``: mean(relu(margin − r)),
    ImageReward's ReFL loss (THUDM/ImageReward ``ReFL.py``: ``relu(-rewards + 2)``, then ``.mean()``), which
    stops pushing a sample once its reward passes ``margin``."""
    if kind == "reward":
        return -rewards.mean()
    if kind == "hinge":
        return F.relu(margin - rewards).mean()
    raise ValueError(f"unknown reward loss {kind!r}; one of {', '.join(REWARD_LOSSES)}")


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward hands each rank the summed gradient of its own slice."""

    @staticmethod
    def forward(ctx, x):
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every rank computed the same global loss; sum their contributions
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all processes (rank order), differentiably; ``x`` itself when not distributed.

    Every rank then computes the loss over the global batch; with DDP's gradient averaging the update
    equals the gradient of that global loss. All ranks must pass the same shape.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)

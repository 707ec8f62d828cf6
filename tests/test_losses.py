"""The paper's losses against values worked out by hand, and the gradient-carrying gather across processes."""

from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rewardtune.losses import gather_with_grad, hp_margin_loss, ict_loss, icthp_loss, icthp_scores, negative_weight


def _t(rows):
    return torch.tensor(rows, dtype=torch.float32)


def ict_example():
    """Two rows of unit 2-D features whose cosines are 0, 0.6, 0.8 or 1 (worked out in test_ict_loss)."""
    return dict(
        text_easy=_t([[1, 0], [0, 1]]),
        text_refine=_t([[0, 1], [1, 0]]),
        img_lose=_t([[1, 0], [1, 0]]),
        img_win=_t([[0.6, 0.8], [0, 1]]),
        img_refine=_t([[0, 1], [0.6, 0.8]]),
        e1=_t([0.5, 0.2]),
        e2=_t([0.6, 0.9]),
        r1=_t([0.3, 0.1]),
        r2=_t([0.4, 0.5]),
    )


def test_ict_loss_matches_hand_computation():
    # Easy prompt, own images: row 0 cos (1, .6, 0) vs (.5, .6, 1); row 1 (0, 1, .8) vs (.2, .9, 1)
    easy = (0.25 + 0 + 1 + 0.04 + 0.01 + 0.04) / 6
    # Refined prompt: row 0 (0, .8, 1) vs (.3, .4, 1); row 1 (1, 0, .6) vs (.1, .5, 1)
    refine = (0.09 + 0.16 + 0 + 0.81 + 0.25 + 0.16) / 6
    # Negatives, easy: row 0 with row 1's images (1, 0, .6); row 1 with row 0's (0, .8, 1)
    neg_easy = (1 + 0 + 0.36 + 0 + 0.64 + 1) / 6
    # Negatives, refined: row 0 with row 1's images (0, 1, .8); row 1 with row 0's (1, .6, 0)
    neg_refine = (0 + 1 + 0.64 + 1 + 0.36 + 0) / 6
    # |c| <= 1 keeps the negative weight 1 / (1 + e^(20(|c|-6))) at 1 to float precision.
    expected = easy + refine + 0.5 * (neg_easy + neg_refine)
    assert ict_loss(**ict_example()).item() == pytest.approx(expected, abs=1e-6)
    assert ict_loss(**ict_example(), neg_weight=0.0).item() == pytest.approx(easy + refine, abs=1e-6)
    assert ict_loss(**ict_example(), neg_weight=2.0).item() == pytest.approx(
        easy + refine + 2 * (neg_easy + neg_refine), abs=1e-6
    )


def test_negative_weight_is_the_papers_smooth_step():
    c = _t([0.0, 0.5, -1.0, 6.0, -6.0, 7.0])
    expected = [1 / (1 + math.exp(20 * (abs(v) - 6))) for v in c.tolist()]
    assert negative_weight(c).tolist() == pytest.approx(expected, abs=1e-7)
    assert negative_weight(_t([6.0])).item() == pytest.approx(0.5)


def test_ict_loss_with_one_row_has_no_negatives_and_accepts_column_labels():
    ex = {k: v[:1] for k, v in ict_example().items()}
    ex.update({k: ex[k][:, None] for k in ("e1", "e2", "r1", "r2")})  # (B, 1) labels work like (B,)
    easy = (0.25 + 0 + 1) / 3
    refine = (0.09 + 0.16 + 0) / 3
    loss = ict_loss(**ex)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(easy + refine, abs=1e-6)


def test_ict_loss_is_differentiable_in_every_feature():
    ex = {k: v.clone().requires_grad_(k.startswith(("text", "img"))) for k, v in ict_example().items()}
    ict_loss(**ex).backward()
    for k in ("text_easy", "text_refine", "img_lose", "img_win", "img_refine"):
        assert ex[k].grad is not None and ex[k].grad.abs().sum() > 0, k


def test_hp_margin_loss_matches_hand_computation():
    lose, win, refine = _t([0.0, 1.0]), _t([0.5, 0.8]), _t([0.6, 2.0])
    # I2 over I1: max(0, .3 - .5) = 0, max(0, .3 + .2) = .5 -> mean .25
    # I3 over I2: max(0, .3 - .1) = .2, max(0, .3 - 1.2) = 0 -> mean .1
    assert hp_margin_loss(lose, win, refine).item() == pytest.approx(0.35, abs=1e-6)
    assert hp_margin_loss(lose, win, refine, margin=0.0).item() == pytest.approx(0.1, abs=1e-6)


def test_icthp_loss_matches_hand_computation():
    ict = _t([[0.2, 0.5, 0.9], [0.6, 0.6, 0.6]])
    lose, win, refine = _t([0.0, 0.0]), _t([0.0, math.log(2)]), _t([0.0, math.log(3)])
    # Row 0: softmax (1/3 each) -> scores (.0667, .1667, .3): hinges .3 - .1 = .2 and .3 - .1333 = .1667
    # Row 1: softmax (1, 2, 3)/6 -> scores (.1, .2, .3): hinges .2 and .2
    scores = icthp_scores(ict, lose, win, refine)
    assert scores.flatten().tolist() == pytest.approx([0.2 / 3, 0.5 / 3, 0.3, 0.1, 0.2, 0.3], abs=1e-6)
    assert icthp_loss(ict, lose, win, refine).item() == pytest.approx(0.2 + 0.3 - 0.4 / 3 + 0.4, abs=1e-6)
    # Summed, not averaged, over the batch: the same row twice costs twice.
    one = icthp_loss(ict[:1], lose[:1], win[:1], refine[:1])
    two = icthp_loss(ict[:1].repeat(2, 1), lose[:1].repeat(2), win[:1].repeat(2), refine[:1].repeat(2))
    assert two.item() == pytest.approx(2 * one.item())


def test_gather_with_grad_is_identity_without_a_process_group():
    x = torch.randn(3, 4)
    assert gather_with_grad(x) is x


def _ict_full_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    feats = {
        k: torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=-1)
        for k in ("text_easy", "text_refine", "img_lose", "img_win", "img_refine")
    }
    labels = {k: torch.rand(4, generator=g) for k in ("e1", "e2", "r1", "r2")}
    return feats, labels


def _gather_worker(rank: int, world: int, port: int, out_path: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    feats, labels = _ict_full_batch()
    rows = slice(2 * rank, 2 * rank + 2)
    local = {k: v[rows].clone().requires_grad_(True) for k, v in feats.items()}
    gathered = {k: gather_with_grad(v) for k, v in local.items()}
    gathered_labels = {k: gather_with_grad(v[rows]) for k, v in labels.items()}
    loss = ict_loss(**gathered, **gathered_labels)
    loss.backward()
    torch.save(
        {"rows": gathered["text_easy"].shape[0], "loss": loss.item(), "grads": {k: v.grad for k, v in local.items()}},
        f"{out_path}.{rank}",
    )
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gathered_ict_loss_spans_processes_and_its_gradients_add_up(tmp_path):
    """Two gloo processes with two rows each: both see all four rows as negatives, compute the full-batch
    loss, and each gets world_size x the full-batch gradient of its own rows (DDP then averages)."""

    out = str(tmp_path / "result")
    mp.spawn(_gather_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    feats, labels = _ict_full_batch()
    full = {k: v.clone().requires_grad_(True) for k, v in feats.items()}
    full_loss = ict_loss(**full, **labels)
    full_loss.backward()
    for rank in range(2):
        res = torch.load(f"{out}.{rank}", weights_only=True)
        assert res["rows"] == 4
        assert res["loss"] == pytest.approx(full_loss.item(), abs=1e-6)
        for k, grad in res["grads"].items():
            torch.testing.assert_close(grad, 2 * full[k].grad[2 * rank : 2 * rank + 2], atol=1e-6, rtol=1e-5)

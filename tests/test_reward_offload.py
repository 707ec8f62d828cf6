"""--reward-offload: the reward models live in CPU memory outside their own passes (issue #23's memory targets).

The reward's forward and its backward to the images run with the reward on the accelerator; it leaves before the
decode's and the denoiser's backward, which take the gradient with respect to the images. On this CPU machine the
move itself is from the CPU to the CPU, so the tests check what can be seen here: the gradients are the one-pass
backward's, the moves come in that order around the step's parts, evaluation scores with the reward placed, and the
planner counts the reward's weights only in the reward's phases."""

from __future__ import annotations

import pytest
import torch

from rewardtune.finetune import Trainer
from rewardtune.finetune import lora as lora_mod
from rewardtune.finetune.config import FinetuneConfig
from rewardtune.finetune.run import Evaluator
from rewardtune.plan import predict_peak_memory
from rewardtune.testing import tiny_clip_config

PROMPTS = ["a red cube", "a blue ball"]


class TinyScorer(torch.nn.Module):
    """A reward with weights and a nonlinearity, so that its gradient with respect to the images depends on them."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(7)
        self.conv = torch.nn.Conv2d(3, 4, 3)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=gen) * 0.5)
            self.conv.bias.zero_()

    def forward(self, images, prompts):
        return torch.tanh(self.conv(images)).pow(2).mean(dim=(1, 2, 3))


def _step(cfg: FinetuneConfig):
    """One micro-step: the LoRA gradients, the rewards, the loss, and the order of parts and reward moves."""
    trainer = Trainer(cfg, reward=TinyScorer())
    order = []
    place = trainer._place_rewards

    def logged(on, *models):
        order.append(("place", on))
        place(on, *models)

    trainer._place_rewards = logged
    r, _, finite = trainer.micro_step(PROMPTS, torch.Generator().manual_seed(3), on_part=order.append)
    grads = [p.grad.clone() for p in lora_mod.trainable_parameters(*trainer.models_train)]
    return grads, r, trainer.micro_metrics[-1]["loss"], order, finite


@pytest.mark.parametrize("method", ["draft-k", "draft-lv"])
def test_offloaded_reward_gives_the_one_pass_gradients(sd_model, tmp_path, tiny_cfg, method):
    """The same LoRA gradients, rewards and logged loss as the one backward pass (fp32, 1e-6), with the reward
    moved to the accelerator after the decode and back before the decode's backward; without the option nothing
    moves."""
    kw = dict(method=method, k=1, mixed_precision="no", reg_weight=0.5)
    ref, r_ref, loss_ref, order_ref, _ = _step(tiny_cfg(sd_model, tmp_path / "a", **kw))
    got, r_got, loss_got, order, finite = _step(tiny_cfg(sd_model, tmp_path / "b", reward_offload=True, **kw))
    assert finite and len(got) == len(ref) > 0
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(r_got, r_ref)
    torch.testing.assert_close(loss_got, loss_ref)
    assert not any(isinstance(o, tuple) for o in order_ref)
    assert order_ref[-4:] == ["decode", "reward", "backward", None]
    assert order[-7:] == [
        "decode",
        "reward",
        ("place", True),
        "backward:reward",
        ("place", False),
        "backward:decode",
        None,
    ]


def test_evaluation_scores_with_the_rewards_placed(sd_model, tmp_path, tiny_cfg):
    """A run with --reward-offload evaluates (both the training and the held-out reward) with the rewards on the
    accelerator, and they are back in CPU memory afterwards; the run finishes and writes its LoRA."""
    cfg = tiny_cfg(sd_model, tmp_path / "run", reward_offload=True, eval_size=2)
    trainer = Trainer(cfg, reward=TinyScorer(), eval_reward=TinyScorer())
    moves = []
    place = trainer._place_rewards
    trainer._place_rewards = lambda on, *models: (moves.append((on, models)), place(on, *models))
    metrics = Evaluator(trainer, tmp_path / "run")(0)
    assert {"reward", "eval_reward"} <= set(metrics)
    assert moves == [(True, ()), (False, ())]  # all rewards, on then off
    assert all(p.device.type == "cpu" for m in (trainer.reward, trainer.eval_reward) for p in m.parameters())


def test_planner_counts_the_reward_only_in_its_own_phases(sd_model):
    """The planner's trace of --reward-offload: the resident weights lose exactly the reward's bytes, and so does
    every phase in which the reward is away (the denoiser's gradient steps, the decode, the decode's and the
    denoiser's backward), while the reward's own phases keep it. The backward after the reward also holds the
    reward's gradient with respect to the images (one image batch in fp32), which the one-pass backward frees
    sooner."""
    tiny_reward = tiny_clip_config(
        49408, hidden=32, layers=2, heads=4, projection_dim=1024, image_size=224, patch_size=32
    ).to_dict()
    base = dict(model=str(sd_model), output="unused", k=1, sample_steps=2, mixed_precision="bf16", cache=False)
    cache = base.pop("cache")
    on = predict_peak_memory(FinetuneConfig(**base), reward_config=tiny_reward, cache=cache)
    off = predict_peak_memory(FinetuneConfig(**base, reward_offload=True), reward_config=tiny_reward, cache=cache)
    towers = on["resident_mib"] - off["resident_mib"]
    assert towers > 0 and on["weights_mib"] - off["weights_mib"] == pytest.approx(towers)
    p_on, p_off = on["part_peaks_mib"], off["part_peaks_mib"]
    for phase in ("grad_steps", "decode"):
        assert p_off[phase] == pytest.approx(p_on[phase] - towers, abs=1e-6), phase
    images_mib = FinetuneConfig().batch_size * 3 * on["resolution"] ** 2 * 4 / 2**20
    for phase in ("backward:decode", "backward:denoiser"):
        assert 0 <= p_off[phase] - (p_on[phase] - towers) <= images_mib + 1e-6, phase
    assert p_off["reward"] == pytest.approx(p_on["reward"], abs=1e-6)

"""Whole-call checkpointing of the gradient steps (issue #13): the same gradients as keeping every call's
activations, including eta noise (drawn outside the checkpointed call, so the recomputation replays it), the
regulariser's base-model predictions and DRaFT-LV's re-noised copies."""

from __future__ import annotations

import pytest
import torch

import rewardtune.finetune.sampler as sampler_mod
from rewardtune.finetune import Trainer


def _grads(trainer: Trainer) -> dict[str, torch.Tensor]:
    """The LoRA gradients of one micro-step on fixed prompts and noise, from LoRA weights set away from zero
    (at their init the B matrices are zero, which would hide most of the graph)."""
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, p in sorted(trainer.unet.named_parameters()):
            if p.requires_grad:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    trainer.optimizer.zero_grad(set_to_none=True)
    r, reg, finite = trainer.micro_step(trainer.batch_prompts(0, step=0), trainer.batch_noise(0, step=0))
    assert finite
    return (
        {n: p.grad.clone() for n, p in trainer.unet.named_parameters() if p.requires_grad},
        float(r.mean()),
        float(reg),
    )


@pytest.mark.parametrize(
    "method,extra",
    [
        ("draft-k", {"k": 4, "eta": 1.0, "reg_weight": 0.5}),
        ("draft-lv", {"lv_samples": 2, "eta": 1.0}),
        ("alignprop", {"k": 4}),
    ],
)
def test_checkpointed_calls_give_the_same_gradients(sd_model, tmp_path, tiny_cfg, brightness, method, extra):
    results = {}
    for on in (False, True):
        cfg = tiny_cfg(
            sd_model,
            tmp_path / f"out{on}",
            method=method,
            sample_steps=4,
            checkpoint_calls=on,
            gradient_checkpointing=on,
            **extra,
        )
        results[on] = _grads(Trainer(cfg, reward=brightness()))
    (g_off, r_off, reg_off), (g_on, r_on, reg_on) = results[False], results[True]
    assert r_on == pytest.approx(r_off, rel=1e-6) and reg_on == pytest.approx(reg_off, rel=1e-6)
    if "reg_weight" in extra:
        assert reg_off > 0  # the regulariser took part
    assert sum(float(g.abs().sum()) for g in g_off.values()) > 0
    for name, g in g_off.items():
        torch.testing.assert_close(g_on[name], g, rtol=1e-4, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")


def test_only_the_last_gradient_call_is_not_checkpointed(sd_model, tmp_path, tiny_cfg, brightness, monkeypatch):
    """K gradient calls: K-1 go through torch's checkpoint, the last one's activations are used at once; off,
    none does. DRaFT-LV: the chain's calls and all re-noised copies but the last."""

    calls = []
    real = sampler_mod.checkpoint

    def counting(fn, *args, **kw):
        calls.append(args[2])  # the step index
        return real(fn, *args, **kw)

    monkeypatch.setattr(sampler_mod, "checkpoint", counting)
    for method, extra, expected in [
        ("draft-k", {"k": 3}, [1, 2]),
        ("draft-lv", {"lv_samples": 2}, [3, 3]),
        ("draft-k", {"k": 1}, []),
    ]:
        calls.clear()
        trainer = Trainer(
            tiny_cfg(sd_model, tmp_path / method / str(extra), method=method, sample_steps=4, **extra),
            reward=brightness(),
        )
        trainer.micro_step(trainer.batch_prompts(0, step=0), trainer.batch_noise(0, step=0))
        assert calls == expected, (method, extra, calls)
    calls.clear()
    trainer = Trainer(
        tiny_cfg(sd_model, tmp_path / "off", sample_steps=4, k=4, checkpoint_calls=False), reward=brightness()
    )
    trainer.micro_step(trainer.batch_prompts(0, step=0), trainer.batch_noise(0, step=0))
    assert calls == []

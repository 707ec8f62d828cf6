"""The methods as published (issue #14), checked against independent references: AlignProp's truncation draws,
ImageReward's ReFL (its stochastic 40-step sampler is diffusers' DDPMScheduler, its hinge loss, its pre-training
regulariser against diffusers' training formula), DRaFT-LV's re-noising against diffusers' ``add_noise``, ReFL's
x0 output against the DDIM formula, and how ICT-HP's gradient splits between its factors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler
from PIL import Image

from rewardtune.config import build_config
from rewardtune.errors import UserError
from rewardtune.finetune import FinetuneConfig, Trainer
from rewardtune.finetune.pretrain import load_pairs
from rewardtune.finetune.sampler import Plan, TruncatedSampler, make_plan
from rewardtune.losses import reward_loss
from rewardtune.plan.architectures import arch_config
from rewardtune.plan.memory import _plan_config
from rewardtune.rewards import load_reward
from rewardtune.testing.cli import run_cli

# ----- AlignProp ------------------------------------------------------------------------------------------------

# The chi-square statistic's 0.999 quantile for 9 and 4 degrees of freedom (tables): a uniform draw exceeds it
# one time in a thousand; a Gaussian draw like AlignProp's 2024 default (mean 8, std 5, kept in 1..10) exceeded
# it in 200 of 200 simulated runs of 2000 (the smallest statistic 75.8).
CHI2_999 = {9: 27.877, 4: 18.467}


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("k_min,k", [(1, 10), (3, 7)])
def test_alignprop_draws_k_uniformly_from_k_min_to_k(per_sample, k_min, k):
    """Over 2000 batches (one generator per step, as the trainer seeds them) every K in k_min..k appears, none
    outside, the counts pass a chi-square test of uniformity, and the batch shares one K unless per_sample."""
    n_steps, batch = 10, 3
    plans = [
        make_plan(
            "alignprop", n_steps, batch, torch.Generator().manual_seed(s), k=k, k_min=k_min, per_sample=per_sample
        )
        for s in range(2000)
    ]
    assert all(p.stop == n_steps and len(p.grad_from) == batch for p in plans)
    if per_sample:
        ks = [n_steps - g for p in plans for g in p.grad_from]
        assert sum(len(set(p.grad_from)) > 1 for p in plans) > 1000  # samples of a batch draw their own K
    else:
        assert all(len(set(p.grad_from)) == 1 for p in plans)
        ks = [n_steps - p.grad_from[0] for p in plans]
    counts = np.bincount(ks, minlength=n_steps + 1)
    assert counts[:k_min].sum() == 0 and counts[k + 1 :].sum() == 0
    observed = counts[k_min : k + 1]
    assert (observed > 0).all()
    expected = len(ks) / len(observed)
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < CHI2_999[len(observed) - 1], (observed.tolist(), chi2)


def test_alignprop_k_defaults_to_all_steps_and_draft_k_to_one(sd_model, tmp_path, tiny_cfg):
    def cfg(**kw):
        return tiny_cfg(sd_model, tmp_path, **{"k": None, **kw})

    assert cfg(method="alignprop", sample_steps=6).validate().k == 6
    assert cfg(method="draft-k", sample_steps=6).validate().k == 1
    assert cfg(method="alignprop", sample_steps=6, k=4, k_min=2).validate().k == 4
    with pytest.raises(UserError, match="--k-min applies to --method alignprop only"):
        cfg(method="draft-k", k_min=2).validate()
    with pytest.raises(UserError, match="--k-min 5 is more than --k 4"):
        cfg(method="alignprop", sample_steps=6, k=4, k_min=5).validate()
    # the planner traces AlignProp's worst case, K = all steps, once the model's steps are known
    unresolved = cfg(method="alignprop", sample_steps=None).validate()
    assert unresolved.k is None and _plan_config(unresolved).method == "alignprop"
    unresolved.sample_steps = 50  # what resolve_defaults fills in for an SD model
    traced = _plan_config(unresolved.validate())
    assert (traced.method, traced.k, traced.sample_steps) == ("draft-k", 50, 50)


# ----- ReFL as published (THUDM/ImageReward, ReFL.py) -----------------------------------------------------------


def test_hinge_loss_by_hand():
    r = torch.tensor([1.5, 2.5, -0.3], requires_grad=True)
    loss = reward_loss(r, "hinge", margin=2.0)
    assert loss.item() == pytest.approx((0.5 + 0.0 + 2.3) / 3)
    loss.backward()
    assert r.grad.tolist() == pytest.approx([-1 / 3, 0.0, -1 / 3])  # a sample above the margin adds nothing
    assert reward_loss(torch.tensor([1.5, 2.5, -0.3]), "reward").item() == pytest.approx(-(1.5 + 2.5 - 0.3) / 3)


def test_refl_sampler_is_imagerewards_ddpm_sampler():
    """ReFL.py samples with SD's scheduler config loaded as DDPMScheduler, 40 steps, no guidance: DDPM's ancestral
    step equals DDIM's with eta = 1 (the recipe's sampler) on every step ReFL runs without gradients (0..38; the
    stop step only predicts x0). Checked on SD 1.5's own scheduler config against diffusers' DDPMScheduler."""
    config = arch_config("sd15_scheduler")
    ddpm = DDPMScheduler.from_config(config)
    ddpm.set_timesteps(40)
    ours = TruncatedSampler(DDIMScheduler.from_config(config, clip_sample=False, steps_offset=1), 40, 1.0, eta=1.0)
    assert torch.equal(ours.timesteps, ddpm.timesteps)
    g = torch.Generator().manual_seed(0)
    for i in range(39):
        x, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
        seed = 100 + i
        expect = ddpm.step(eps, ddpm.timesteps[i], x, generator=torch.Generator().manual_seed(seed))
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
        got, x0 = ours.step(eps, i, x, noise)
        torch.testing.assert_close(got, expect.prev_sample, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(x0, expect.pred_original_sample, atol=1e-5, rtol=1e-5)


def test_refl_published_recipe_is_imagerewards_setting(tmp_path):
    cfg = build_config(FinetuneConfig, None, config="sd15_refl_published", output=str(tmp_path))
    assert (cfg.method, cfg.sample_steps, cfg.eta, cfg.guidance_scale) == ("refl", 40, 1.0, 1.0)
    assert (cfg.loss, cfg.hinge_margin, cfg.loss_scale, cfg.reward) == ("hinge", 2.0, 1e-3, "icthp")
    stops = {
        make_plan("refl", 40, 2, torch.Generator().manual_seed(s), refl_range=(cfg.refl_min, cfg.refl_max)).stop - 1
        for s in range(300)
    }
    assert stops == set(range(30, 40))  # ReFL.py: mid_timestep = random.randint(30, 39), the step predicting x0


# ----- a tiny SD trainer shared by the sampler-level tests -------------------------------------------------------


@pytest.fixture(scope="module")
def trainer(sd_model, tmp_path_factory, tiny_cfg, brightness):
    """Whole-call checkpointing off: a recorded output of a checkpointed call gets no gradient (it is recomputed)."""
    out = tmp_path_factory.mktemp("methods")
    return Trainer(tiny_cfg(sd_model, out, sample_steps=4, k=1, checkpoint_calls=False), reward=brightness())


class CallRecorder(torch.nn.Module):
    """Wraps the UNet and keeps each call's input, timestep and output (with its gradient retained)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, x, t, *args, **kw):
        out = self.model(x, t, *args, **kw)
        if out[0].requires_grad:
            out[0].retain_grad()
        self.calls.append((x.detach().clone(), t, out[0]))
        return out


def test_draft_lv_copies_renoise_the_detached_result_and_only_the_last_step_has_gradients(
    trainer, monkeypatch, run_plan
):
    """1 + n terms: the chain's own sample and n copies, each the chain's final latent (detached) noised to the
    last timestep as diffusers' DDPMScheduler.add_noise does, then denoised again by the last step."""
    sampler, n, lv = trainer.sampler, trainer.sampler.n_steps, 2
    renoised = []
    original = sampler.renoise
    monkeypatch.setattr(
        sampler, "renoise", lambda final, noise, i: renoised.append((final, noise, i)) or original(final, noise, i)
    )
    rec = CallRecorder(trainer.unet)
    out, _, prompts = run_plan(trainer, Plan([n - 1] * 2, n, lv=lv), rec)
    b = 2
    assert out.shape[0] == (1 + lv) * b and len(prompts) == (1 + lv) * b and len(rec.calls) == n + lv
    chain = out[:b]
    reference = DDPMScheduler.from_config(trainer.pipe.scheduler.config)
    t_last = sampler.timesteps[-1]
    for j, (final, noise, i) in enumerate(renoised):
        assert i == n - 1 and not final.requires_grad and torch.equal(final, chain.detach())
        x_in, t, _ = rec.calls[n + j]
        assert int(t) == int(t_last)
        expect = reference.add_noise(chain.detach(), noise, t_last.view(1))
        torch.testing.assert_close(x_in[:b], expect)  # guidance: the UNet sees [x, x]
        torch.testing.assert_close(x_in[b:], expect)
    assert not torch.equal(renoised[0][1], renoised[1][1])  # each copy draws its own noise
    assert [c[2].requires_grad for c in rec.calls] == [False] * (n - 1) + [True] * (1 + lv)
    # the copies' reward reaches their own last step, not the chain's: the result was detached before re-noising
    trainer.decode(out[b:]).mean().backward()
    last_chain, copies = rec.calls[n - 1][2], [c[2] for c in rec.calls[n:]]
    assert last_chain.grad is None or last_chain.grad.abs().max() == 0
    assert all(c.grad is not None and c.grad.abs().max() > 0 for c in copies)
    trainer.optimizer.zero_grad()


def test_refl_output_is_the_stop_steps_x0_prediction(trainer, run_plan):
    """The latent ReFL decodes is x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t) from the stop step's (guided) noise
    prediction, computed here from the recorded UNet call."""
    n, stop = trainer.sampler.n_steps, 2
    rec = CallRecorder(trainer.unet)
    out, _, _ = run_plan(trainer, Plan([stop] * 2, stop + 1, x0_at_stop=True), rec)
    assert len(rec.calls) == stop + 1 < n
    x_in, t, pred = rec.calls[stop]
    uncond, text = pred.detach().chunk(2)
    eps = uncond + trainer.cfg.guidance_scale * (text - uncond)
    a = trainer.pipe.scheduler.alphas_cumprod[int(t)]
    x0 = (x_in[:2] - (1 - a).sqrt() * eps) / a.sqrt()
    torch.testing.assert_close(out.detach(), x0, atol=1e-5, rtol=1e-4)
    assert (out.detach() - x_in[:2]).abs().max() > 0.1  # not the noisy latent it started from


# ----- the pre-training regulariser -------------------------------------------------------------------------------


def _write_pairs(d, n=2, size=32):
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, caption in enumerate(["a red apple", "a cat on a mat", "a blue car"][:n]):
        Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8")).save(d / f"img{i}.png")
        (d / f"img{i}.txt").write_text(caption + "\n")
    return d


def test_pretrain_data_layouts_and_their_errors(tmp_path):
    pairs = load_pairs(_write_pairs(tmp_path / "txt"))
    assert [(p.name, c) for p, c in pairs] == [("img0.png", "a red apple"), ("img1.png", "a cat on a mat")]
    jsonl = tmp_path / "jsonl"
    _write_pairs(jsonl)
    (jsonl / "metadata.jsonl").write_text(
        '{"file_name": "img1.png", "text": "one"}\n{"file_name": "img0.png", "text": "zero"}\n'
    )
    assert [(p.name, c) for p, c in load_pairs(jsonl)] == [("img1.png", "one"), ("img0.png", "zero")]
    with pytest.raises(UserError, match="is not a directory"):
        load_pairs(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no image with a caption"):
        load_pairs(tmp_path / "empty")
    (tmp_path / "txt" / "img1.txt").unlink()
    with pytest.raises(UserError, match="have no same-named .txt caption, e.g. 'img1.png'"):
        load_pairs(tmp_path / "txt")
    (jsonl / "metadata.jsonl").write_text('{"file_name": "img9.png", "text": "x"}\n')
    with pytest.raises(UserError, match="names 1 missing image"):
        load_pairs(jsonl)


def test_pretrain_loss_is_diffusers_training_loss_and_reaches_the_lora(trainer, tmp_path, brightness):
    """With a reward that has no gradient, the LoRA's gradient after a micro-step is --pretrain-weight times the
    gradient of diffusers' train_text_to_image loss, written out here: the VAE posterior sample times the scaling
    factor, noised to a random timestep by sqrt(a_t) x0 + sqrt(1 - a_t) eps, the UNet with the LoRA on, MSE to eps."""
    pipe, weight = trainer.pipe, 0.5
    trainer.pretrain_pairs = load_pairs(_write_pairs(tmp_path / "data"))
    trainer.cfg.pretrain_weight, reward = weight, trainer.reward
    trainer.reward = brightness(0.0)
    lora = [p for p in trainer.unet.parameters() if p.requires_grad]
    try:
        pairs, gen = trainer.pretrain_batch(0, 0), trainer.pretrain_generator(0, 0)
        pixels = torch.stack(
            [
                torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32)).permute(2, 0, 1)
                for p, _ in pairs
            ]
        )
        with torch.no_grad():
            z = pipe.vae.encode(pixels / 127.5 - 1).latent_dist.sample(generator=gen) * pipe.vae.config.scaling_factor
            ids = pipe.tokenizer(
                [c for _, c in pairs],
                padding="max_length",
                max_length=pipe.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            hidden = pipe.text_encoder(ids)[0]
        eps = torch.randn(z.shape, generator=gen)
        t = torch.randint(0, 1000, (len(pairs),), generator=gen)
        a = pipe.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * z + (1 - a).sqrt() * eps
        by_hand = F.mse_loss(trainer.unet(noisy, t, encoder_hidden_states=hidden).sample, eps)
        grads = torch.autograd.grad(by_hand, lora)
        assert max(g.abs().max() for g in grads) > 0  # the LoRA (its B matrices) gets the loss's gradient

        for p in lora:
            p.grad = None
        trainer.micro_metrics = []
        trainer.micro_step(trainer.batch_prompts(0, step=0), trainer.batch_noise(0, step=0))
        measured = trainer.micro_metrics[-1]
        assert float(measured["pretrain"]) == pytest.approx(by_hand.item(), rel=1e-4)
        assert float(measured["loss"]) == pytest.approx(weight * by_hand.item(), rel=1e-4)  # the reward is 0
        for p, g in zip(lora, grads, strict=True):
            torch.testing.assert_close(p.grad, weight * g, atol=1e-7, rtol=1e-4)
    finally:
        trainer.pretrain_pairs, trainer.reward, trainer.micro_metrics = [], reward, []
        for p in lora:
            p.grad = None


def test_hinge_loss_in_the_micro_step(trainer):
    """The micro-step's loss is --loss-scale x mean relu(--hinge-margin - r), with the margin between the batch's
    two rewards so that one sample is pushed and the other not."""
    cfg, prompts = trainer.cfg, trainer.batch_prompts(0, step=0)
    try:
        r, _, _ = trainer.micro_step(prompts, trainer.batch_noise(0, step=0))  # the default loss, -mean(r)
        assert float(trainer.micro_metrics[-1]["loss"]) == pytest.approx(-r.mean().item(), rel=1e-5)
        cfg.loss, cfg.hinge_margin, cfg.loss_scale = "hinge", float(r.mean()), 1e-3
        trainer.micro_metrics = []
        r2, _, _ = trainer.micro_step(prompts, trainer.batch_noise(0, step=0))
        torch.testing.assert_close(r2, r)  # no optimizer step between: the same batch, the same rewards
        assert (r < cfg.hinge_margin).sum() == 1
        expect = 1e-3 * torch.relu(cfg.hinge_margin - r).mean().item()
        assert float(trainer.micro_metrics[-1]["loss"]) == pytest.approx(expect, rel=1e-5)
    finally:
        cfg.loss, cfg.loss_scale, trainer.micro_metrics = "reward", 1.0, []
        trainer.optimizer.zero_grad()


def test_bad_pretrain_data_is_a_one_line_cli_error(sd_model, tmp_path):
    res = run_cli(
        "finetune",
        "--model",
        sd_model,
        "--output",
        tmp_path / "o",
        "--pretrain-data",
        tmp_path / "nope",
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert (
        res.stderr.strip()
        .splitlines()[-1]
        .endswith(
            f"--pretrain-data '{tmp_path / 'nope'}' is not a directory; give a folder of images with .txt captions"
        )
    )


# ----- ICT-HP: how the gradient splits between its factors --------------------------------------------------------


def test_icthp_gradient_split_sums_to_the_reward_gradient_and_shows_a_saturated_hp(
    released_ict, released_hp, tiny_backbone
):
    reward = load_reward("icthp", ict=str(released_ict), hp=str(released_hp), backbone=str(tiny_backbone))
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    prompts = ["a red apple", "a cat", "a blue car"]

    def grad(fn):
        x = images.clone().requires_grad_(True)
        value = fn(x)
        return torch.autograd.grad(value.sum(), x)[0], value.detach()

    def split_by_hand():
        g_ict, ict = grad(lambda x: reward.ict(x, prompts))
        g_hp, hp = grad(lambda x: reward.hp(x, prompts))
        through_ict, through_hp = hp.view(-1, 1, 1, 1) * g_ict, ict.view(-1, 1, 1, 1) * g_hp
        total, _ = grad(lambda x: reward(x, prompts))
        torch.testing.assert_close(through_ict + through_hp, total, atol=1e-6, rtol=1e-4)  # product rule
        return [g.flatten(1).norm(dim=1) for g in (through_ict, through_hp)], hp

    head = reward.hp.head.layers[7]
    bias = head.bias.detach().clone()
    try:
        for shift, saturated in ((0.0, False), (40.0, True)):
            with torch.no_grad():
                head.bias.copy_(bias + shift)
            (n_ict, n_hp), hp = split_by_hand()
            got = reward.gradient_split(images, prompts)
            assert float(got["icthp_grad_ict"]) == pytest.approx(n_ict.mean().item(), rel=1e-4)
            assert float(got["icthp_grad_hp"]) == pytest.approx(n_hp.mean().item(), rel=1e-4, abs=1e-12)
            assert float(got["icthp_hp_share"]) == pytest.approx(
                (n_hp / (n_ict + n_hp)).mean().item(), rel=1e-4, abs=1e-12
            )
            assert float(got["icthp_hp_slope"]) == pytest.approx(
                (4 * hp * (1 - hp)).mean().item(), rel=1e-4, abs=1e-12
            )
            if saturated:  # HP's sigmoid at 1: its factor passes (almost) no gradient
                assert float(got["icthp_hp_share"]) < 1e-6 and float(got["icthp_hp_slope"]) < 1e-6
            else:
                assert float(got["icthp_hp_share"]) > 0.01 and float(got["icthp_hp_slope"]) > 0.1
    finally:
        with torch.no_grad():
            head.bias.copy_(bias)


def test_trainer_logs_the_icthp_split_on_its_steps(trainer, released_ict, released_hp, tiny_backbone):
    """The split is measured on steps that are multiples of --reward-split-every and logged (--log-every), for
    a reward that has it; one step with it on shows it in the step's metrics."""
    reward, cfg = trainer.reward, trainer.cfg
    cfg.reward_split_every, cfg.log_every = 2, 3
    assert [s for s in range(1, 13) if trainer._split_step(s)] == []  # brightness has no split
    trainer.reward = load_reward("icthp", ict=str(released_ict), hp=str(released_hp), backbone=str(tiny_backbone))
    try:
        assert [s for s in range(1, 13) if trainer._split_step(s)] == [6, 12]
        cfg.reward_split_every, cfg.log_every = 1, 1
        metrics = trainer.step()
        assert {"icthp_grad_ict", "icthp_grad_hp", "icthp_hp_share", "icthp_hp_slope"} <= set(metrics)
        assert 0 < metrics["icthp_hp_share"] < 1 and metrics["loss"] == pytest.approx(-metrics["reward"], rel=1e-5)
    finally:
        trainer.reward, cfg.reward_split_every, cfg.log_every, trainer.global_step = reward, 10, 1, 0

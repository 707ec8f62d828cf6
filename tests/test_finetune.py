"""Reward fine-tuning on tiny real SD 1.x and SDXL pipelines saved in diffusers format (offline, CPU)."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, EulerDiscreteScheduler, PNDMScheduler, StableDiffusionPipeline
from safetensors import safe_open

from rewardtune.errors import OfflineError, UserError
from rewardtune.finetune import Trainer, load_lora, run_finetune
from rewardtune.finetune.lora import KOHYA_NAME, export_kohya
from rewardtune.finetune.models import load_pipeline, model_family, resolve_model, training_scheduler
from rewardtune.finetune.sampler import Plan, TruncatedSampler, make_plan
from rewardtune.finetune.trainer import checkpoint_vae_decoder
from rewardtune.plan.architectures import arch_config
from rewardtune.schedules import lr_factor
from rewardtune.testing import save_tiny_pipeline


@pytest.fixture
def models(sd_model, sdxl_model):
    return {"sd": sd_model, "sdxl": sdxl_model}


def test_tiny_pipelines_are_real_diffusers_pipelines(sd_model, sdxl_model):
    assert model_family(sd_model) == "sd" and model_family(sdxl_model) == "sdxl"
    pipe = DiffusionPipeline.from_pretrained(sdxl_model)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    assert pipe.vae_scale_factor == 8
    ids = pipe.tokenizer("a red apple").input_ids
    assert len(ids) == 5 and ids[0] == 49406  # the real CLIP vocabulary: BOS + 3 words + EOS


def test_brightness_rises_and_control_falls(sd_model, tmp_path, tiny_cfg, brightness):
    """Training on +brightness raises it on the held-out eval noise; on -brightness it falls."""
    up = run_finetune(tiny_cfg(sd_model, tmp_path / "up", steps=4, eval_every=2), reward=brightness(1.0))
    down = run_finetune(tiny_cfg(sd_model, tmp_path / "down", steps=4), reward=brightness(-1.0))
    assert up["after"]["reward"] > up["before"]["reward"]
    assert down["after"]["reward"] > down["before"]["reward"]  # its reward is -brightness
    assert down["before"]["reward"] == pytest.approx(-up["before"]["reward"])
    out = tmp_path / "up"
    for name in (
        "pytorch_lora_weights.safetensors",
        "config.yaml",
        "summary.json",
        "metrics.jsonl",
        "samples/step_000000.png",
        "samples/step_000002.png",
        "samples/step_000004.png",
    ):
        assert (out / name).is_file(), name
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert json.loads((out / "summary.json").read_text())["after"] == up["after"]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["kind"] == "train"] == [1, 2, 3, 4]
    assert [x["step"] for x in lines if x["kind"] == "eval"] == [0, 2, 4]
    assert all(
        x["grad_norm"] > 0 and x["step_time"] > 0 and x["peak_memory_mb"] > 0 for x in lines if x["kind"] == "train"
    )


@pytest.fixture(scope="module")
def trainers(sd_model, sdxl_model, tmp_path_factory, tiny_cfg, brightness):
    """One trainer per family; the method is read from its config at every step, so tests switch it."""
    out = tmp_path_factory.mktemp("methods")
    return {
        f: Trainer(
            tiny_cfg(m, out / f, k=3, lr=3e-3, refl_min=0.34, refl_max=0.66, gradient_checkpointing=f == "sdxl"),
            reward=brightness(),
        )
        for f, m in (("sd", sd_model), ("sdxl", sdxl_model))
    }


@pytest.mark.parametrize("family", ["sd", "sdxl"])
@pytest.mark.parametrize("method", ["draft-k", "draft-lv", "refl", "alignprop"])
def test_each_method_raises_the_reward_of_its_batch(trainers, family, method, batch_reward):
    """One optimizer step of each method raises the reward on the batch it was computed on. The optimizer starts
    fresh for each method (Adam's momentum from the other methods' steps would otherwise steer this one), and
    ReFL stops at the middle of the 3 steps: at the last one (t=1) the x0 prediction is almost the latent itself,
    and its gradient all but vanishes."""
    trainer = trainers[family]
    trainer.cfg.method = method
    trainer.optimizer.state.clear()
    step = trainer.global_step

    before, n = batch_reward(trainer, step)
    metrics = trainer.step()
    after, _ = batch_reward(trainer, step)
    assert metrics["reward"] == pytest.approx(before, abs=1e-5) and metrics["grad_norm"] > 0
    assert after > before
    assert n == (2 * 3 if method == "draft-lv" else 2)  # draft-lv adds lv_samples=2 re-noised copies


def test_k_decides_which_steps_carry_gradients(sd_model, tmp_path, tiny_cfg, brightness, grads_per_step):
    trainer = Trainer(tiny_cfg(sd_model, tmp_path, sample_steps=4, k=1), reward=brightness())
    for k in (1, 2, 4):
        grads = grads_per_step(trainer, Plan([4 - k] * 2, 4))
        assert [g is not None for g in grads] == [i >= 4 - k for i in range(4)]
        assert all(min(g) > 0 for g in grads if g is not None)
    # AlignProp: each sample has its own truncation point; before it, that sample's gradient is zero.
    grads = grads_per_step(trainer, Plan([3, 1], 4))
    assert grads[0] is None
    assert grads[1][0] == 0 and grads[1][1] > 0 and grads[2][0] == 0 and grads[2][1] > 0
    assert grads[3][0] > 0 and grads[3][1] > 0


def test_refl_plans_stop_in_range_with_one_gradient_step():
    """ReFL: a random stop inside the configured range; only the stop step carries gradients, and its
    output is the x0 prediction."""

    plans = [make_plan("refl", 10, 2, torch.Generator().manual_seed(s), refl_range=(0.5, 0.8)) for s in range(30)]
    stops = {p.stop for p in plans}
    assert stops <= set(range(6, 9)) and len(stops) > 1
    assert all(p.grad_from == [p.stop - 1] * 2 and p.x0_at_stop for p in plans)


def _pipe_images(pipe, seed=3):
    return pipe(
        ["a red apple", "a cat"],
        num_inference_steps=3,
        height=32,
        width=32,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    ).images


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_generate_draws_the_pipelines_noise_whatever_the_batch_size(models, family, tmp_path, tiny_cfg, brightness):
    """At eta 1, ``Trainer.generate`` with --batch-size 1 gives the images of one pipeline call over all prompts
    from the same seed (the initial latents and every step's noise drawn for the whole batch, in its order)."""
    trainer = Trainer(tiny_cfg(models[family], tmp_path, batch_size=1, eta=1.0), reward=brightness())
    prompts = ["a red apple", "a cat", "a blue house"]
    ours = trainer.generate(prompts, seed=4)
    ref = trainer.pipe(
        prompts,
        num_inference_steps=3,
        height=32,
        width=32,
        guidance_scale=3.0,
        eta=1.0,
        generator=torch.Generator().manual_seed(4),
        output_type="pt",
    ).images
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_sdxl_training_trajectory_ends_where_the_stock_euler_sampler_ends(models):
    """SDXL as shipped samples with Euler (its hub scheduler config, ``set_alpha_to_one: false`` included); the
    trainer's DDIM ends at a clean sample (final alpha 1), so at eta 0 both give the same latents: the images a
    user of the stock pipeline gets are the trained-on ones. With the hub's final alpha the DDIM chain ends noisy."""
    pipe = DiffusionPipeline.from_pretrained(models["sdxl"])
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=4, height=32, width=32, guidance_scale=3.0, output_type="latent")

    def latents(scheduler):
        pipe.scheduler = scheduler
        return pipe(["a red apple", "a cat"], generator=torch.Generator().manual_seed(1), **kw).images

    stock = EulerDiscreteScheduler.from_config(arch_config("sdxl_scheduler"))  # the SDXL base's shipped scheduler
    assert stock.config.set_alpha_to_one is False
    euler = latents(stock)
    pipe.scheduler = stock
    ours = latents(training_scheduler(pipe))
    hub_ddim = latents(DDIMScheduler.from_config(stock.config, clip_sample=False))  # the hub's final alpha
    torch.testing.assert_close(ours, euler, atol=1e-4, rtol=1e-4)
    assert float((hub_ddim - euler).abs().max()) > 1e-2


@pytest.mark.parametrize("family,text_encoder", [("sd", False), ("sdxl", True)])
def test_saved_lora_loads_without_warnings_and_reproduces_images(
    models, family, text_encoder, tmp_path, library_log, tiny_cfg, brightness
):
    """pipe.load_lora_weights(dir) (diffusers) and the kohya export give the fine-tuned model's images;
    --init-lora starts a new run from the same weights. SDXL also trains LoRA on both text encoders."""

    cfg = tiny_cfg(
        models[family],
        tmp_path,
        lr=5e-2,
        lora_alpha=8.0,
        train_text_encoder=text_encoder,
        gradient_checkpointing=text_encoder,
    )
    trainer = Trainer(cfg, reward=brightness())
    trainer.step()
    trainer.save_lora(tmp_path / "lora")
    export_kohya(tmp_path / "lora", 8.0)
    trainer.unet.eval()
    tuned = _pipe_images(trainer.pipe)

    def fresh():
        pipe = DiffusionPipeline.from_pretrained(models[family])
        pipe.set_progress_bar_config(disable=True)
        pipe.scheduler = training_scheduler(pipe)  # the one-line switch docs/finetune.md gives (DDIM ending clean)
        return pipe

    pipe = fresh()
    base = _pipe_images(pipe)
    with library_log() as log:
        pipe.load_lora_weights(tmp_path / "lora")  # the plain diffusers call a user makes
    assert not log.key_problems()
    assert (tuned - base).abs().max() > 1e-3  # the LoRA changed the model
    torch.testing.assert_close(_pipe_images(pipe), tuned, atol=1e-5, rtol=0)
    kohya = fresh()
    with library_log() as log:
        load_lora(kohya, tmp_path / "lora" / KOHYA_NAME)
    assert not log.key_problems()
    torch.testing.assert_close(_pipe_images(kohya), tuned, atol=1e-5, rtol=0)
    with safe_open(str(tmp_path / "lora" / "pytorch_lora_weights.safetensors"), "pt") as f:
        prefixes = {k.split(".")[0] for k in f.keys()}
    assert prefixes == ({"unet", "text_encoder", "text_encoder_2"} if text_encoder else {"unet"})
    again = Trainer(
        tiny_cfg(
            models[family], tmp_path, init_lora=str(tmp_path / "lora"), lora_alpha=8.0, train_text_encoder=text_encoder
        ),
        reward=brightness(),
    )
    again.unet.eval()
    torch.testing.assert_close(_pipe_images(again.pipe), tuned, atol=1e-5, rtol=0)


def test_family_scheduler_and_prediction_type_come_from_the_model_files(tmp_path):
    """A v-prediction SD model saved with a PNDM scheduler, in a directory named like SDXL: the family is
    read from model_index.json, the sampler steps DDIM on the model's config, x0 honours v-prediction."""

    d = save_tiny_pipeline(tmp_path / "my-sdxl-finetune", "sd", prediction_type="v_prediction")
    PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        skip_prk_steps=True,
        steps_offset=1,
    ).save_pretrained(d / "scheduler")
    index = json.loads((d / "model_index.json").read_text())
    (d / "model_index.json").write_text(json.dumps({**index, "scheduler": ["diffusers", "PNDMScheduler"]}))
    pipe, family = load_pipeline(str(d))
    assert family == "sd" and type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert pipe.scheduler.config.prediction_type == "v_prediction" and not pipe.scheduler.config.clip_sample
    sampler = TruncatedSampler(pipe.scheduler, 4)
    x, v = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    _, x0 = sampler.step(v, 1, x)
    a = pipe.scheduler.alphas_cumprod[sampler.timesteps[1]]
    torch.testing.assert_close(x0, a.sqrt() * x - (1 - a).sqrt() * v)


def test_sdxl_conditioning_uses_the_real_sizes(sdxl_model, tmp_path, tiny_cfg, brightness):
    trainer = Trainer(tiny_cfg(sdxl_model, tmp_path, resolution=48), reward=brightness())
    cond = trainer.encode(["a cat", "a dog"])
    assert cond.hidden.shape[0] == 4 and cond.added["text_embeds"].shape[0] == 4  # guidance: uncond + cond rows
    assert cond.added["time_ids"].tolist() == [[48, 48, 0, 0, 48, 48]] * 4
    assert trainer.latent_shape == (4, 6, 6)
    assert trainer.generate(["a cat"], seed=0).shape == (1, 3, 48, 48)


def test_model_errors_name_the_problem(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    with pytest.raises(OfflineError, match="stable-diffusion-xl-base-1.0"):
        resolve_model("sdxl")
    with pytest.raises(UserError, match="has no model_index.json"):
        resolve_model(str(tmp_path))
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(UserError, match="is a KandinskyPipeline; finetune supports"):
        load_pipeline(str(tmp_path))


def test_trainer_takes_an_in_memory_pipeline_like_a_loaded_one(sd_model, tmp_path, tiny_cfg, brightness):
    """``Trainer(pipe=...)`` (random full-size weights in the benchmarks) prepares the pipeline exactly as
    loading ``cfg.model`` does: same family, DDIM from its config, same first step's result."""

    results = []
    for pipe in (
        None,
        StableDiffusionPipeline.from_pretrained(sd_model, safety_checker=None, requires_safety_checker=False),
    ):
        t = Trainer(tiny_cfg(sd_model, tmp_path / f"out{len(results)}", steps=1), reward=brightness(), pipe=pipe)
        assert t.family == "sd" and type(t.pipe.scheduler).__name__ == "DDIMScheduler"
        assert t.pipe.scheduler.config.clip_sample is False
        results.append(t.step()["reward"])
    assert results[0] == pytest.approx(results[1], rel=1e-5)


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_lr_schedule_sets_each_steps_lr_from_the_step_counter(sd_model, tmp_path, schedule, tiny_cfg, brightness):
    cfg = tiny_cfg(
        sd_model, tmp_path, steps=4, lr=1e-2, lr_schedule=schedule, warmup_steps=1, sample_steps=2, k=1, batch_size=1
    )
    trainer = Trainer(cfg, reward=brightness())
    lrs = [trainer.step()["lr"] for _ in range(4)]
    expected = {"constant": [0.5, 1, 1, 1], "linear": [0.5, 1, 2 / 3, 1 / 3], "cosine": [0.5, 1, 0.75, 0.25]}[schedule]
    assert lrs == pytest.approx([1e-2 * f for f in expected])
    assert [lr_factor(schedule, 1, 4)(s) for s in range(4)] == pytest.approx(expected)


def test_unknown_lr_schedule_is_a_clear_error(sd_model, tmp_path, tiny_cfg):
    with pytest.raises(UserError, match="--lr-schedule 'step'"):
        tiny_cfg(sd_model, tmp_path, lr_schedule="step").validate()


def test_layer_checkpointed_vae_decode_gives_the_same_gradient(sd_model):
    """checkpoint_vae_decoder (each resnet, attention and upsampler of the decoder its own checkpoint, inside
    diffusers' block checkpoints) changes what is kept for the backward pass, not the gradient: the same
    d(image)/d(latent) as the plain decode. With diffusers' block checkpointing alone each layer runs twice (the
    forward pass and its block's recomputation); here also in a recomputation of its own."""

    def grad(vae):
        z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
        out = vae.decode(z, return_dict=False)[0]
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return z.grad

    pipe = DiffusionPipeline.from_pretrained(sd_model)
    plain = grad(pipe.vae)
    decoder = pipe.vae.decoder
    layers = [
        m
        for block in [decoder.mid_block, *decoder.up_blocks]
        for name in ("resnets", "attentions", "upsamplers")
        for m in (getattr(block, name, None) or [])
    ]
    calls = {id(m): 0 for m in layers}

    def counting(m, forward):
        def run(*args, **kwargs):
            calls[id(m)] += 1
            return forward(*args, **kwargs)

        return run

    for m in layers:
        m.forward = counting(m, m.forward)
    checkpoint_vae_decoder(pipe.vae)
    finer = grad(pipe.vae)
    # every layer but each block's last ran a third time: its own recomputation (the block's recomputation stops
    # early before its last layer, whose input is all it needs)
    blocks = 1 + len(decoder.up_blocks)
    assert len(layers) >= 4 and sum(v == 3 for v in calls.values()) == len(layers) - blocks
    torch.testing.assert_close(finer, plain, atol=1e-6, rtol=1e-5)

"""Flow-matching models (SD3/SD3.5, FLUX.1) in rewardtune finetune, on tiny real pipelines saved in diffusers
format (offline, CPU). References are diffusers' own pipelines, never a second copy of our code."""

from __future__ import annotations

import dataclasses
import gc
import importlib.util
import json
import logging
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from diffusers import DiffusionPipeline, FluxPipeline, StableDiffusion3Pipeline
from safetensors import safe_open

from rewardtune.cli import main
from rewardtune.config import build_config
from rewardtune.errors import OfflineError
from rewardtune.finetune import FinetuneConfig, Trainer, families, load_lora, sample, training_scheduler
from rewardtune.finetune.defaults import resolve_defaults
from rewardtune.finetune.families.flux import FLUX_TARGETS
from rewardtune.finetune.families.sd3 import SD3_TARGETS
from rewardtune.finetune.flow import SMALL_STEP_DT, FlowMatchSampler, small_steps_note
from rewardtune.finetune.models import (
    assemble_pipeline,
    make_adapter,
    model_family,
    pipeline_family,
    resolve_model,
)
from rewardtune.finetune.sampler import Plan, make_plan, make_sampler
from rewardtune.testing import save_tiny_pipeline
from rewardtune.testing.cli import run_cli
from rewardtune.testing.flow_pipelines import save_tiny_flow_pipeline

PROMPTS = ["a red apple", "a cat"]
MSL = 16  # T5 tokens per prompt: keeps the tiny transformers' text sequences short (the real default is 256/512)


class Brightness(torch.nn.Module):
    """Mean pixel value: a reward any generator can move."""

    def forward(self, images, prompts):
        return images.mean(dim=(1, 2, 3))


@pytest.fixture(scope="session")
def flow_models(tmp_path_factory):
    """Tiny SD3.5-Medium-like, FLUX.1-dev-like and FLUX.1-schnell-like pipeline directories."""

    return {
        name: save_tiny_flow_pipeline(tmp_path_factory.mktemp(f"tiny_{name}"), family, variant)
        for name, family, variant in (("sd3", "sd3", ""), ("flux", "flux", ""), ("schnell", "flux", "schnell"))
    }


def _load(path):
    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_tiny_flow_pipelines_are_real_diffusers_pipelines(flow_models):
    sd3 = StableDiffusion3Pipeline.from_pretrained(flow_models["sd3"])
    flux = FluxPipeline.from_pretrained(flow_models["flux"])
    schnell = FluxPipeline.from_pretrained(flow_models["schnell"])
    assert model_family(flow_models["sd3"]) == "sd3" and model_family(flow_models["schnell"]) == "flux"
    assert sd3.vae.config.latent_channels == 16 and sd3.vae.config.shift_factor == pytest.approx(0.0609)
    assert flux.vae.config.scaling_factor == pytest.approx(0.3611) and flux.transformer.config.in_channels == 64
    assert flux.transformer.config.guidance_embeds and not schnell.transformer.config.guidance_embeds
    assert flux.scheduler.config.use_dynamic_shifting and not schnell.scheduler.config.use_dynamic_shifting
    assert sd3.scheduler.config.shift == 3.0
    assert any(".attn2." in n for n, _ in sd3.transformer.named_modules())  # SD3.5-Medium's dual attention
    tokens = sd3.tokenizer.convert_ids_to_tokens(sd3.tokenizer("a red apple").input_ids)
    assert tokens == ["<|startoftext|>", "a</w>", "red</w>", "apple</w>", "<|endoftext|>"]  # CLIP's BPE
    ids = flux.tokenizer_2("a red apple").input_ids
    assert len(ids) == 4 and ids[-1] == 1  # three whole-word T5 pieces and </s>


# ----- sampling: the trainer's sampler is the pipeline's ---------------------------------------------
@pytest.mark.parametrize(
    "name,cases", [("sd3", [(32, 3.0), (64, 1.0)]), ("flux", [(32, 3.5), (64, 2.0)]), ("schnell", [(48, 0.0)])]
)
def test_sample_returns_the_pipelines_latents(flow_models, name, cases):
    """``sample`` equals ``pipe(..., output_type='latent')`` from the same generator and from the same latents
    (FLUX: packed), with and without guidance, and FLUX at two resolutions (two dynamic shifts)."""
    pipe = _load(flow_models[name])
    for res, g in cases:
        kw = dict(num_inference_steps=3, guidance_scale=g, height=res, width=res, max_sequence_length=MSL)
        ref = pipe(PROMPTS, generator=_gen(0), output_type="latent", **kw).images
        ours = sample(pipe, PROMPTS, generator=_gen(0), **kw)
        assert ours.shape == ref.shape and float((ours - ref).abs().max()) <= 1e-4
        noise = torch.randn(ref.shape, generator=_gen(1))
        ref = pipe(PROMPTS, latents=noise, output_type="latent", **kw).images
        assert float((sample(pipe, PROMPTS, latents=noise, **kw) - ref).abs().max()) <= 1e-4


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_sample_returns_the_sd_pipelines_latents_with_the_training_scheduler(family, tmp_path):
    """SD/SDXL: ``sample`` equals the stock pipeline once it samples with ``training_scheduler(pipe)`` (DDIM), at
    eta 0 and, from the same generator, at eta 1."""

    pipe = _load(save_tiny_pipeline(tmp_path, family))
    pipe.scheduler = training_scheduler(pipe)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    for eta in (0.0, 1.0):
        kw = dict(num_inference_steps=3, guidance_scale=3.0, height=32, width=48, eta=eta)
        ref = pipe(PROMPTS, generator=_gen(0), output_type="latent", **kw).images
        assert float((sample(pipe, PROMPTS, generator=_gen(0), **kw) - ref).abs().max()) <= 1e-4


def test_assemble_pipeline_builds_the_flow_pipelines(flow_models):
    for name in ("sd3", "flux"):
        pipe = _load(flow_models[name])
        parts = {
            k: v
            for k, v in pipe.components.items()
            if k.startswith(("transformer", "vae", "text_encoder", "scheduler"))
        }
        tokenizers = [pipe.tokenizer, pipe.tokenizer_2, getattr(pipe, "tokenizer_3", None)]
        built = assemble_pipeline(pipeline_family(pipe), parts, *tokenizers)
        assert type(built) is type(pipe) and built.tokenizer_2 is pipe.tokenizer_2


def test_flow_schedules_are_the_pipelines(flow_models):
    """SD3: the static shift 3 of its scheduler config (4 steps: 1, 0.858, 0.602, 0.0089, 0). FLUX: sigmas
    linspace(1, 1/N, N) shifted with mu from the packed image tokens, (H/16)(W/16): 0.63 at 512², 1.15 at 1024²."""

    sd3 = _load(flow_models["sd3"])
    sampler = FlowMatchSampler(training_scheduler(sd3), 4, **make_adapter(sd3, "sd3").sampler_options(32))
    assert sampler.sigmas.tolist() == pytest.approx([1.0, 0.858, 0.602, 0.0089, 0.0], abs=5e-4)
    torch.testing.assert_close(sampler.timesteps, sampler.sigmas[:-1] * 1000)
    flux = _load(flow_models["flux"])
    adapter = make_adapter(flux, "flux")
    for res, mu in ((512, 0.63), (1024, 1.15)):
        sampler = FlowMatchSampler(training_scheduler(flux), 4, **adapter.sampler_options(res))
        t = np.linspace(1.0, 1 / 4, 4)
        expected = math.exp(mu) / (math.exp(mu) + (1 / t - 1))
        assert sampler.sigmas[:-1].tolist() == pytest.approx(expected.tolist(), abs=1e-6)
        assert adapter.latent_shape(res) == ((res // 16) ** 2, 64)


# ----- training ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def flow_trainers(flow_models, tmp_path_factory, flow_cfg):
    """One trainer per family; the method is read from its config at every step, so tests switch it. SD3 samples
    with classifier-free guidance, FLUX with its guidance embedding. ReFL stops before SD3's last step, whose
    sigma (0.009) leaves its x0 estimate almost without gradient (see test_turbo_schedule_...)."""
    out = tmp_path_factory.mktemp("flow_methods")
    return {
        name: Trainer(
            flow_cfg(
                flow_models[name],
                out / name,
                k=2,
                lr=1e-2,
                refl_min=0.0,
                refl_max=0.6,
                guidance_scale=3.0 if name == "sd3" else None,
                gradient_checkpointing=name == "flux",
            ),
            reward=Brightness(),
        )
        for name in ("sd3", "flux")
    }


@pytest.mark.parametrize("name", ["sd3", "flux"])
@pytest.mark.parametrize("method", ["draft-k", "draft-lv", "refl", "alignprop"])
def test_each_method_raises_the_reward_of_its_batch(flow_trainers, name, method, step_raises_reward):
    # the fixture clears Adam's momentum first: the previous test's batch would otherwise outweigh a step whose own
    # gradient is tiny (SD3's last step, sigma 0.009: DRaFT-LV, AlignProp with K_j = 1)
    n = step_raises_reward(flow_trainers[name], method)
    assert n == (2 * 3 if method == "draft-lv" else 2)  # draft-lv adds lv_samples=2 re-noised copies


def test_trainer_resolves_the_models_defaults_and_caches_prompts(flow_trainers):
    """Unset options took the family's defaults; prompt embeddings were computed once: a step calls no text encoder."""

    sd3, flux = flow_trainers["sd3"], flow_trainers["flux"]
    assert sd3.cfg.lora_targets == SD3_TARGETS and flux.cfg.lora_targets == FLUX_TARGETS
    assert flux.cfg.guidance_scale == 3.5 and not flux.sampler.guided and sd3.sampler.guided
    assert any("attn2.to_q.lora_A" in n for n, _ in sd3.unet.named_parameters())
    calls = []
    encoders = [t.adapter.t5 for t in (sd3, flux)] + [te for t in (sd3, flux) for te in t.adapter.text_encoders()]
    hooks = [m.register_forward_hook(lambda *a: calls.append(1)) for m in encoders]
    try:
        sd3.step()
        flux.step()
    finally:
        for h in hooks:
            h.remove()
    assert calls == [] and all(m.device.type == "cpu" for m in encoders)


def test_prompt_embeddings_beyond_the_memory_limit_spill_to_disk_and_read_back_the_same(flow_trainers):
    """With --prompt-cache-gib 0 every prompt's embeddings go to a safetensors file in a private temporary
    directory; the trainer's conditioning is then exactly what the in-memory cache gives, and the directory goes
    with the cache."""
    flux = flow_trainers["flux"]
    prompts = flux.batch_prompts(0, step=0)
    in_memory = flux.adapter.encode(prompts, False, (32, 32))
    spilling = make_adapter(flux.pipe, "flux", SimpleNamespace(**{**vars(flux.cfg), "prompt_cache_gib": 0.0}))
    spilling.cache_prompts(flux.prompts)
    cache = spilling._cache
    n = len(set(flux.prompts) | {""})
    assert cache.spilled == len(cache) == n and cache.ram_used == 0
    directory = cache.directory
    assert len(list(directory.glob("*.safetensors"))) == n
    ours = spilling.encode(prompts, False, (32, 32))
    for name in ("hidden", "pooled"):
        torch.testing.assert_close(getattr(ours, name), getattr(in_memory, name), atol=0, rtol=0)
    del spilling, cache, ours
    gc.collect()
    assert not directory.exists()


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_k_decides_which_steps_carry_gradients(flow_trainers, name, grads_per_step):
    trainer = flow_trainers[name]
    for k in (1, 3):
        grads = grads_per_step(trainer, Plan([3 - k] * 2, 3))
        assert [g is not None for g in grads] == [i >= 3 - k for i in range(3)]
        assert all(min(g) > 0 for g in grads if g is not None)
    grads = grads_per_step(trainer, Plan([2, 0], 3))  # AlignProp: each sample its own truncation point
    assert grads[0][0] == 0 and grads[0][1] > 0 and grads[1][0] == 0 and grads[1][1] > 0
    assert grads[2][0] > 0 and grads[2][1] > 0
    trainer.unet.zero_grad(set_to_none=True)


# ----- the flow methods against their formulas, written here (not the sampler's code) ----------------------
class FlowCalls(torch.nn.Module):
    """Wraps a flow transformer and keeps each call's input latent, its noise level sigma (read from the timestep
    the transformer was given: SD3's pipeline passes sigma * 1000, FLUX's sigma) and its output."""

    def __init__(self, model, family: str):
        super().__init__()
        self.model, self.per_sigma, self.calls = model, 1000.0 if family == "sd3" else 1.0, []

    def forward(self, *args, **kw):
        out = self.model(*args, **kw)
        sigma = float(kw["timestep"].flatten()[0]) / self.per_sigma
        self.calls.append((kw["hidden_states"].detach().clone(), sigma, out[0].detach()))
        return out


def _velocity(trainer, out: torch.Tensor) -> torch.Tensor:
    """The velocity a step uses: the transformer's output, or with classifier-free guidance (SD3's [uncond, cond]
    rows) uncond + g (cond - uncond)."""
    if not trainer.sampler.guided:
        return out
    uncond, cond = out.chunk(2)
    return uncond + trainer.cfg.guidance_scale * (cond - uncond)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_draft_lv_copies_are_the_flow_forward_marginal_at_the_last_sigma(flow_trainers, name, run_plan, monkeypatch):
    """Each DRaFT-LV copy enters the transformer as sigma * eps + (1 - sigma) * x0, the flow's forward marginal at the
    last sigma (the one the chain's last step ran at), with x0 the chain's final sample and eps the copy's own noise;
    its output is one Euler step from there to sigma 0: the input minus sigma * v."""
    trainer = flow_trainers[name]
    sampler, n, b, lv = trainer.sampler, trainer.sampler.n_steps, 2, 2
    noises = []
    original = sampler.renoise
    monkeypatch.setattr(sampler, "renoise", lambda final, noise, i: noises.append(noise) or original(final, noise, i))
    rec = FlowCalls(trainer.unet, name)
    plan = make_plan("draft-lv", n, b, torch.Generator().manual_seed(0), lv=lv)
    out, _, _ = run_plan(trainer, plan, rec)
    out = out.detach()
    assert len(rec.calls) == n + lv and len(noises) == lv and not torch.equal(noises[0], noises[1])
    chain, last_sigma = out[:b], rec.calls[n - 1][1]
    assert 0 < last_sigma < 0.5
    for j, eps in enumerate(noises):
        x_in, sigma, raw = rec.calls[n + j]
        assert sigma == pytest.approx(last_sigma, rel=1e-6)
        expect = sigma * eps + (1 - sigma) * chain
        for rows in range(0, len(x_in), b):  # SD3's guidance feeds the same latent twice
            torch.testing.assert_close(x_in[rows : rows + b], expect, atol=1e-6, rtol=1e-6)
        copy = out[(1 + j) * b : (2 + j) * b]
        torch.testing.assert_close(copy, expect - sigma * _velocity(trainer, raw), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_refl_output_is_x_minus_sigma_v_at_the_stop_step(flow_trainers, name, run_plan):
    """ReFL decodes the stop step's clean-sample estimate x0 = x - sigma * v (sigma of that step, not the next one),
    for every stop step make_plan can draw, the last one (SD3: sigma 0.0089) included."""
    trainer = flow_trainers[name]
    n = trainer.sampler.n_steps
    for s in range(n):
        plan = make_plan("refl", n, 2, torch.Generator().manual_seed(s), refl_range=(s / n, (s + 1) / n))
        assert (plan.stop, plan.x0_at_stop) == (s + 1, True)
        rec = FlowCalls(trainer.unet, name)
        out, _, _ = run_plan(trainer, plan, rec)
        assert len(rec.calls) == s + 1
        x_in, sigma, raw = rec.calls[s]
        x = x_in[:2]
        expect = x - sigma * _velocity(trainer, raw)
        torch.testing.assert_close(out.detach(), expect, atol=1e-6, rtol=1e-5)
        assert float((out.detach() - x).abs().max()) > 1e-3  # not the noisy latent it started from


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_make_plan_draft_k_gives_gradients_to_exactly_the_last_k_steps(flow_trainers, name, grads_per_step):
    """make_plan's DRaFT-K plan (not one built here) for K = 1 and 2 of 2 steps, K = 1 and 3 of 4 steps: the reward's
    gradient reaches the transformer's output at steps N - K .. N - 1 and at no earlier step."""
    trainer = flow_trainers[name]
    own = trainer.sampler
    try:
        for n, ks in ((2, (1, 2)), (4, (1, 3))):
            steps_cfg = dataclasses.replace(trainer.cfg, sample_steps=n)
            trainer.sampler = make_sampler(
                "flow", trainer.pipe.scheduler, steps_cfg, trainer.weight_dtype, trainer.adapter, trainer.resolution
            )
            for k in ks:
                plan = make_plan("draft-k", n, 2, torch.Generator().manual_seed(k), k=k)
                grads = grads_per_step(trainer, plan)
                assert [g is not None and min(g) > 0 for g in grads] == [i >= n - k for i in range(n)], (n, k)
    finally:
        trainer.sampler = own
        trainer.unet.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_alignprop_draws_k_per_sample_and_only_the_last_k_steps_carry_gradients(flow_trainers, name, grads_per_step):
    """The trainer's own AlignProp draw (--alignprop-draw sample, K in 1..N): over 12 steps every K in 1..N is drawn
    and none outside; for a batch whose samples drew different K, sample j's gradient reaches exactly its last K_j
    steps."""
    trainer = flow_trainers[name]
    cfg, n = trainer.cfg, trainer.sampler.n_steps
    saved = (cfg.method, cfg.k, cfg.k_min, cfg.alignprop_draw)
    cfg.method, cfg.k, cfg.k_min, cfg.alignprop_draw = "alignprop", n, 1, "sample"
    try:
        plans = [
            trainer.sample_prefix(trainer.batch_prompts(0, step=s), trainer.batch_noise(0, step=s)).plan
            for s in range(12)
        ]
        drawn = [n - g for p in plans for g in p.grad_from]
        assert set(drawn) == set(range(1, n + 1)) and all(p.stop == n for p in plans)
        plan = next(p for p in plans if len(set(p.grad_from)) > 1)
        grads = grads_per_step(trainer, plan)
        for j, start in enumerate(plan.grad_from):
            assert [g is not None and g[j] > 0 for g in grads] == [i >= start for i in range(n)], (j, plan)
    finally:
        cfg.method, cfg.k, cfg.k_min, cfg.alignprop_draw = saved
        trainer.unet.zero_grad(set_to_none=True)


# ----- the LoRA a user loads ------------------------------------------------------------------------
class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("name,text_encoder", [("sd3", True), ("flux", False)])
def test_saved_lora_loads_into_the_stock_pipeline_and_gives_the_trained_images(
    flow_models, name, text_encoder, tmp_path, flow_cfg
):
    """``pipe.load_lora_weights(dir)`` on a fresh pipeline loads every tensor without a warning (captured on the
    diffusers and peft loggers themselves), at the trained scale (alpha 8 / rank 4), and the stock pipeline then
    makes the trainer's own images. SD3 also trains LoRA on both CLIP encoders (T5 stays cached)."""

    g = 3.0 if name == "sd3" else 3.5
    cfg = flow_cfg(
        flow_models[name],
        tmp_path,
        lr=5e-2,
        lora_alpha=8.0,
        train_text_encoder=text_encoder,
        guidance_scale=g,
        gradient_checkpointing=text_encoder,
    )
    trainer = Trainer(cfg, reward=Brightness())
    t5_calls = []
    hook = trainer.adapter.t5.register_forward_hook(lambda *a: t5_calls.append(1))
    trainer.step()
    hook.remove()
    assert t5_calls == []
    trainer.save_lora(tmp_path / "lora")
    for m in (trainer.unet, *trainer.trained_text_encoders):
        m.eval()
    trained = trainer.generate(PROMPTS, seed=5)
    kw = dict(num_inference_steps=3, guidance_scale=g, height=32, width=32, max_sequence_length=MSL)
    pipe = _load(flow_models[name])
    base = pipe(PROMPTS, generator=_gen(5), output_type="pt", **kw).images
    handler = _Capture()
    loggers = [logging.getLogger(n) for n in ("diffusers", "peft")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        pipe.load_lora_weights(tmp_path / "lora")  # the plain diffusers call a user makes
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
    # a transformer-only LoRA: diffusers says (at warning level) that the CLIP encoder got none, which is no lost key
    assert [
        m
        for m in handler.messages
        if not (m.startswith("No LoRA keys associated to CLIPTextModel") and not text_encoder)
    ] == []
    loaded = pipe(PROMPTS, generator=_gen(5), output_type="pt", **kw).images
    assert float((trained - base).abs().max()) > 1e-3  # the LoRA changed the model
    torch.testing.assert_close(loaded, trained, atol=1e-5, rtol=0)
    latents = pipe(PROMPTS, generator=_gen(6), output_type="latent", **kw).images
    torch.testing.assert_close(sample(pipe, PROMPTS, generator=_gen(6), **kw), latents, atol=1e-4, rtol=0)
    with safe_open(str(tmp_path / "lora" / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys = list(f.keys())
        metadata = f.metadata()
    assert {k.split(".")[0] for k in keys} == (
        {"transformer", "text_encoder", "text_encoder_2"} if text_encoder else {"transformer"}
    )
    assert any(".attn2." in k for k in keys) == (name == "sd3") and any(".ff.net.2." in k for k in keys) == (
        name == "flux"
    )
    meta = json.loads(metadata["lora_adapter_metadata"])  # alpha 8 / rank 4 is folded into lora_B: alpha = rank
    assert (meta["transformer.lora_alpha"], meta["transformer.r"]) == (4.0, 4)
    load_lora(_load(flow_models[name]), tmp_path / "lora")  # our checked loader agrees: every tensor found its module


# ----- the command line ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_cli_finetunes_a_local_flow_model_and_resumes(flow_models, name, released_ict, tiny_backbone, tmp_path):
    """A real ``rewardtune finetune`` process on the tiny directory, then ``--resume`` to one more step. The
    resolved model defaults are in config.yaml (SD3 with --defaults-from sd35-large-turbo: 4 steps, no guidance)."""
    out = tmp_path / "run"
    args = [
        "--model",
        flow_models[name],
        "--reward",
        "ict",
        "--ict",
        released_ict,
        "--backbone",
        tiny_backbone,
        "--output",
        out,
        "--resolution",
        32,
        "--batch-size",
        1,
        "--eval-size",
        1,
        "--lora-rank",
        2,
        "--k",
        2,
        "--max-sequence-length",
        8,
        "--checkpoint-every",
        1,
        "--no-gradient-checkpointing",
    ]
    args += ["--defaults-from", "sd35-large-turbo"] if name == "sd3" else ["--sample-steps", 2]

    def run(*extra):
        res = run_cli("finetune", *args, *extra)
        assert res.returncode == 0, res.stderr[-3000:]
        return json.loads((out / "summary.json").read_text())

    first = run("--steps", 1)
    assert first["family"] == name and first["steps"] == 1
    resumed = run("--steps", 2, "--resume")
    assert resumed["steps"] == 2 and resumed["before"] == first["before"]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["kind"] == "train"] == [1, 2]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    expected = {"sd3": dict(sample_steps=4, guidance_scale=0.0), "flux": dict(sample_steps=2, guidance_scale=3.5)}[
        name
    ]
    assert {k: saved[k] for k in expected} == expected and saved["resolution"] == 32 and saved["lora_targets"]


@pytest.mark.parametrize(
    "case",
    [
        "flux_resolution",
        "eta",
        "schnell_guidance",
        "turbo_guidance",
        "defaults_family",
        "export",
        "sequence_length",
        "quantize",
    ],
)
def test_bad_flow_input_gives_one_clear_line(case, flow_models, tmp_path, capsys):
    base = ["--output", tmp_path / "out", "--resolution", 32, "--sample-steps", 2, "--max-sequence-length", 8]
    args, expect = {
        "flux_resolution": (
            ["--model", flow_models["flux"], *base, "--resolution", 40],
            "--resolution 40: FLUX packs 2x2 latent patches",
        ),
        "eta": (["--model", flow_models["sd3"], *base, "--eta", 0.5], "--eta 0.5: sd3 is a flow-matching model"),
        "schnell_guidance": (
            ["--model", flow_models["schnell"], *base, "--guidance-scale", 3.5],
            "--guidance-scale 3.5: this FLUX.1 model (no guidance embedding) is distilled to sample without guidance",
        ),
        "turbo_guidance": (
            ["--model", flow_models["sd3"], "--defaults-from", "sd35-large-turbo", *base, "--guidance-scale", 5],
            "'sd35-large-turbo' is distilled to sample without guidance",
        ),
        "defaults_family": (
            ["--model", flow_models["flux"], "--defaults-from", "sd35-large", *base],
            "--defaults-from sd35-large is a sd3 model",
        ),
        "export": (
            ["--model", flow_models["flux"], *base, "--export", "kohya"],
            "--export kohya: only SD 1.x/2.x, SDXL LoRAs",
        ),
        "sequence_length": (
            ["--model", flow_models["flux"], *base, "--max-sequence-length", 600],
            "--max-sequence-length must be in [1, 512]",
        ),
        "quantize": (
            ["--model", flow_models["flux"], *base, "--quantize-base", "nf4"],
            "--quantize-base nf4 needs bitsandbytes: pip install bitsandbytes",
        ),
    }[case]
    if case == "quantize" and importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed; tests/test_quantized.py covers --quantize-base with it")
    rc = main(["finetune", *map(str, args)])
    err = capsys.readouterr().err
    assert rc == 2
    last = err.strip().splitlines()[-1]  # above it, at most the pipeline loading progress bar
    assert last.startswith("rewardtune finetune: error: ") and expect in last and "Traceback" not in err


def test_flow_aliases_name_the_public_models(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    assert families.aliases()["sd35-large-turbo"][1].hub == ("stabilityai/stable-diffusion-3.5-large-turbo",)
    for alias, hub_id in (
        ("flux-dev", "black-forest-labs/FLUX.1-dev"),
        ("sd35-medium", "stabilityai/stable-diffusion-3.5-medium"),
    ):
        with pytest.raises(OfflineError, match=f"'{hub_id}' is not in the local cache"):
            resolve_model(alias)


def test_unset_options_take_the_alias_or_family_defaults(flow_models, tmp_path):
    """Per alias (SD3.5-Large vs its Turbo: the same files), per family for a local directory, --defaults-from."""

    sd3, flux, schnell = _load(flow_models["sd3"]), _load(flow_models["flux"]), _load(flow_models["schnell"])

    def resolved(pipe, family, **kw):
        cfg = FinetuneConfig(output=str(tmp_path), **kw)
        resolve_defaults(cfg, pipe, family)
        return cfg.sample_steps, cfg.guidance_scale, cfg.max_sequence_length

    assert resolved(sd3, "sd3", model="sd35-large") == (28, 3.5, 256)
    assert resolved(sd3, "sd3", model="sd35-large-turbo") == (4, 0.0, 256)
    assert resolved(sd3, "sd3", model=str(flow_models["sd3"])) == (28, 7.0, 256)
    assert resolved(sd3, "sd3", model=str(flow_models["sd3"]), defaults_from="sd35-medium", sample_steps=10) == (
        10,
        4.5,
        256,
    )
    assert resolved(schnell, "flux", model=str(flow_models["schnell"])) == (4, 0.0, 256)
    assert resolved(flux, "flux", model="flux-dev") == (28, 3.5, 512)
    assert resolved(flux, "flux", model=str(flow_models["flux"]), defaults_from="flux-schnell") == (4, 0.0, 256)


def test_turbo_schedule_leaves_the_last_step_almost_no_gradient(
    flow_models, tmp_path, grads_per_step, flow_cfg, capsys
):
    """The paper's SD3.5-Large-Turbo setting (4 steps, shift 3, no guidance): the last Euler step goes from sigma
    0.0089 to 0, so the reward's gradient reaching that step's velocity (and so DRaFT-1's LoRA gradient) is about
    |dt| times the one reaching the sample: tens of times smaller than the step before. Use K >= 2 on Turbo: a
    trainer set to DRaFT-1 says so in one line."""
    trainer = Trainer(
        flow_cfg(
            flow_models["sd3"], tmp_path, defaults_from="sd35-large-turbo", sample_steps=None, k=1, guidance_scale=None
        ),
        reward=Brightness(),
    )
    notes = [x for x in capsys.readouterr().out.splitlines() if x.startswith("note: draft-k K=1:")]
    assert len(notes) == 1 and "use --k 2 or more" in notes[0]
    assert trainer.cfg.sample_steps == 4 and not trainer.sampler.guided
    dt = (trainer.sampler.sigmas[1:] - trainer.sampler.sigmas[:-1]).abs()
    assert float(dt[-1]) == pytest.approx(0.0089, abs=1e-4)
    grads = [sum(g) for g in grads_per_step(trainer, Plan([0, 0], 4))]
    assert grads[3] < grads[2] / 20 and grads[3] < grads[0] / 5


def test_turbo_recipe_builds_a_valid_config(tmp_path):
    cfg = build_config(FinetuneConfig, config="sd35l_turbo_icthp_draftk", output=str(tmp_path))
    assert cfg.model == "sd35-large-turbo" and cfg.method == "draft-k" and cfg.k >= 2 and cfg.guidance_scale == 0


def test_small_steps_note_follows_the_schedules_dt(flow_models):
    """The note fires when every gradient step moves the sample by |dt| < SMALL_STEP_DT, computed here from the
    pipelines' sigmas: SD3's 4-step schedule ends 0.0089 -> 0 (K=1, DRaFT-LV and AlignProp up to K=1 warned, K=2
    reaches the 0.59 step), FLUX's last step at 512 px is large (no note), ReFL is never warned about."""
    sd3, flux = _load(flow_models["sd3"]), _load(flow_models["flux"])
    turbo = FlowMatchSampler(training_scheduler(sd3), 4, **make_adapter(sd3, "sd3").sampler_options(32))
    dt = (turbo.sigmas[:-1] - turbo.sigmas[1:]).abs().tolist()
    assert dt[-1] < SMALL_STEP_DT <= dt[-2]
    note = small_steps_note(turbo, "draft-k", 1)
    assert note.startswith("note: draft-k K=1: every gradient step of this 4-step schedule") and "--k 2" in note
    assert small_steps_note(turbo, "draft-k", 2) is None and small_steps_note(turbo, "alignprop", 3) is None
    assert small_steps_note(turbo, "draft-lv", None) and small_steps_note(turbo, "alignprop", 1)
    assert small_steps_note(turbo, "refl", 1) is None
    dev = FlowMatchSampler(training_scheduler(flux), 4, **make_adapter(flux, "flux").sampler_options(512))
    assert float((dev.sigmas[-2] - dev.sigmas[-1]).abs()) > SMALL_STEP_DT
    assert small_steps_note(dev, "draft-k", 1) is None

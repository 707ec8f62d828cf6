"""Z-Image (``ZImagePipeline``; Z-Image-Turbo the headline) in rewardtune finetune, on a tiny real pipeline saved in
diffusers format (offline, CPU). References are diffusers' own pipeline and LoRA loader, never our code again."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline
from safetensors import safe_open

from rewardtune.cli import main
from rewardtune.config import build_config
from rewardtune.errors import OfflineError
from rewardtune.finetune import FinetuneConfig, Trainer, families, load_lora, sample, training_scheduler
from rewardtune.finetune.defaults import resolve_defaults
from rewardtune.finetune.families.zimage import ZIMAGE_TARGETS
from rewardtune.finetune.flow import FlowMatchSampler
from rewardtune.finetune.models import assemble_pipeline, make_adapter, model_family, resolve_model
from rewardtune.finetune.sampler import Plan
from rewardtune.plan.architectures import ARCH_OF_ALIAS, build_parts
from rewardtune.testing.cli import run_cli
from rewardtune.testing.zimage_pipelines import SCHEDULER, save_tiny_zimage_pipeline

PROMPTS = ["a red apple", "a cat"]
MSL = 16  # Qwen tokens per prompt (the pipeline's default is 512): the template and a few words
ROOT = Path(__file__).resolve().parents[1]
STACKS = ("noise_refiner", "context_refiner", "layers")  # the transformer's three runs of blocks


@pytest.fixture(scope="module")
def zimage_model(tmp_path_factory):
    """A tiny Z-Image-Turbo-like pipeline directory (the hub's scheduler config: static shift 3)."""
    return save_tiny_zimage_pipeline(tmp_path_factory.mktemp("tiny_zimage"))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_the_tiny_pipeline_is_a_real_zimage_pipeline(zimage_model):
    """The loaded parts are Z-Image's (the registry reads model_index.json's class), the tokenizer's template is
    Qwen3's chat format and honours enable_thinking, and every LoRA target names real modules in all three stacks."""
    pipe = ZImagePipeline.from_pretrained(zimage_model)
    assert model_family(zimage_model) == "zimage"
    assert type(pipe.text_encoder).__name__ == "Qwen3Model" and type(pipe.tokenizer).__name__ == "Qwen2Tokenizer"
    assert pipe.vae.config.scaling_factor == pytest.approx(0.3611) and pipe.vae.config.shift_factor == 0.1159
    assert pipe.scheduler.config.shift == 3.0 and not pipe.scheduler.config.use_dynamic_shifting
    turn = [{"role": "user", "content": "a red apple"}]
    thinking = pipe.tokenizer.apply_chat_template(
        turn, tokenize=False, add_generation_prompt=True, enable_thinking=True
    )
    assert thinking == "<|im_start|>user\na red apple<|im_end|>\n<|im_start|>assistant\n"
    off = pipe.tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert off == thinking + "<think>\n\n</think>\n\n"
    names = [n for n, m in pipe.transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    for target in ZIMAGE_TARGETS:
        for stack in STACKS:
            assert any(n.startswith(f"{stack}.") and n.endswith("." + target) for n in names), (stack, target)
    parts = {k: v for k, v in pipe.components.items() if k != "tokenizer"}
    built = assemble_pipeline("zimage", parts, pipe.tokenizer)
    assert type(built) is ZImagePipeline and built.tokenizer is pipe.tokenizer


# ----- sampling: the trainer's sampler is the pipeline's ---------------------------------------------
@pytest.mark.parametrize(
    "dynamic,cases",
    [(False, [(32, 0.0), (48, 1.5)]), (True, [(32, 0.0), (64, 0.5)])],
    ids=["hub-static-shift", "dynamic-shift"],
)
def test_sample_returns_the_pipelines_latents(zimage_model, stock_pipeline, dynamic, cases):
    """``sample`` equals ``pipe(..., output_type='latent')`` from the same generator and from the same latents, without
    guidance (Turbo) and with it (pos + g (pos - neg) from g > 0: 0.5 guides too); with the hub's static shift and
    with a dynamic-shift config at two sizes, whose mu the pipeline computes from the image tokens. The caller's
    prompt list is left as it was (the pipeline's encoder writes the templated text into the list it gets)."""
    pipe = stock_pipeline(zimage_model)
    if dynamic:
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, use_dynamic_shifting=True)
    prompts = list(PROMPTS)
    for res, g in cases:
        kw = dict(num_inference_steps=3, guidance_scale=g, height=res, width=res, max_sequence_length=MSL)
        ref = pipe(list(PROMPTS), generator=_gen(0), output_type="latent", **kw).images
        ours = sample(pipe, prompts, generator=_gen(0), **kw)
        assert ours.shape == ref.shape == (2, 16, res // 8, res // 8)
        assert float((ours - ref).abs().max()) <= 1e-4
        noise = torch.randn(ref.shape, generator=_gen(1))
        ref = pipe(list(PROMPTS), latents=noise, output_type="latent", **kw).images
        assert float((sample(pipe, prompts, latents=noise, **kw) - ref).abs().max()) <= 1e-4
    assert prompts == PROMPTS


def test_schedules_are_the_pipelines(zimage_model, stock_pipeline):
    """Sigmas linspace(1, 1/N, N) with the config's static shift 3 (the same at every size), or with a dynamic config
    the shift exp(mu), mu from the (H/16)(W/16) image tokens: 0.5 at 256 tokens (256 px), 1.15 at 4096 (1024 px)."""
    pipe = stock_pipeline(zimage_model)
    adapter = make_adapter(pipe, "zimage")
    t = torch.linspace(1.0, 1 / 4, 4).double()
    for res in (256, 1024):
        sampler = FlowMatchSampler(training_scheduler(pipe), 4, **adapter.sampler_options(res))
        assert sampler.sigmas[:-1].tolist() == pytest.approx((3 * t / (1 + 2 * t)).tolist(), abs=1e-6)
        assert float(sampler.sigmas[-1]) == 0 and sampler.guidance_scale == 1.0
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        pipe.scheduler.config, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15
    )
    for res, mu in ((256, 0.5), (1024, 1.15)):
        sampler = FlowMatchSampler(training_scheduler(pipe), 4, **adapter.sampler_options(res))
        expected = math.exp(mu) / (math.exp(mu) + (1 / t - 1))
        assert sampler.sigmas[:-1].tolist() == pytest.approx(expected.tolist(), abs=1e-6)
    assert adapter.latent_shape(1024) == (16, 128, 128) and adapter.native_resolution() == 1024


# ----- training ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def zimage_trainer(zimage_model, tmp_path_factory, flow_cfg, brightness):
    """A Turbo-like trainer (no guidance); the method is read from its config at every step, so tests switch it."""
    return Trainer(
        flow_cfg(
            zimage_model, tmp_path_factory.mktemp("zimage_methods"), guidance_scale=0.0, k=2, lr=1e-2, refl_min=0.0
        ),
        reward=brightness(),
    )


@pytest.mark.parametrize("method", ["draft-k", "draft-lv", "refl", "alignprop"])
def test_each_method_raises_the_reward_of_its_batch(zimage_trainer, method, step_raises_reward):
    trainer = zimage_trainer
    n = step_raises_reward(trainer, method)
    assert n == (2 * 3 if method == "draft-lv" else 2)  # draft-lv adds lv_samples=2 re-noised copies


def test_k_decides_which_steps_carry_gradients(zimage_trainer, grads_per_step):
    trainer = zimage_trainer
    for k in (1, 3):
        grads = grads_per_step(trainer, Plan([3 - k] * 2, 3))
        assert [g is not None for g in grads] == [i >= 3 - k for i in range(3)]
        assert all(min(g) > 0 for g in grads if g is not None)
    grads = grads_per_step(trainer, Plan([2, 0], 3))  # AlignProp: each sample its own truncation point
    assert grads[0][0] == 0 and grads[0][1] > 0 and grads[1][0] == 0 and grads[1][1] > 0
    assert grads[2][0] > 0 and grads[2][1] > 0
    trainer.unet.zero_grad(set_to_none=True)


def test_defaults_targets_and_the_prompt_cache(zimage_trainer):
    """Unset options took the family's defaults (LoRA on the attention and feed-forwards of all three stacks); the
    prompt embeddings were computed once: a step calls no text encoder, which stays off the accelerator, and the
    trainer's prompt list still holds the prompts, not the templated text."""
    trainer = zimage_trainer
    assert trainer.cfg.lora_targets == ZIMAGE_TARGETS and not trainer.sampler.guided
    lora = {n for n, _ in trainer.unet.named_parameters() if ".lora_A." in n}
    for stack in STACKS:
        for target in ("attention.to_out.0", "feed_forward.w2"):
            assert any(n.startswith(f"{stack}.") and f".{target}.lora_A." in n for n in lora), (stack, target)
    calls = []
    encoder = trainer.adapter.t5
    hook = encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        trainer.step()
    finally:
        hook.remove()
    assert calls == [] and encoder.device.type == "cpu"
    assert not any("<|im_start|>" in p for p in trainer.prompts)


# ----- the LoRA a user loads ------------------------------------------------------------------------
GUIDED = 1.5  # the round trip samples with guidance: two branches, the empty negative prompt


@pytest.fixture(scope="module")
def trained_lora(zimage_model, tmp_path_factory, flow_cfg, brightness):
    """One step of a guided run (rank 4, alpha 8; transformer and VAE decode checkpointed), its LoRA saved with
    ``ZImagePipeline.save_lora_weights``, and the images the trainer then makes: (LoRA directory, images)."""
    out = tmp_path_factory.mktemp("zimage_lora")
    cfg = flow_cfg(zimage_model, out, lr=5e-2, lora_alpha=8.0, guidance_scale=GUIDED, gradient_checkpointing=True)
    trainer = Trainer(cfg, reward=brightness())
    assert trainer.sampler.guided
    trainer.step()
    trainer.save_lora(out / "lora")
    trainer.unet.eval()
    return out / "lora", trainer.generate(PROMPTS, seed=5)


def test_saved_lora_loads_into_the_stock_pipeline_and_gives_the_trained_images(
    zimage_model, trained_lora, library_log, stock_pipeline
):
    """``pipe.load_lora_weights(dir)`` on a fresh ZImagePipeline loads every tensor without a warning (the diffusers,
    peft and transformers loggers captured), at the trained scale (alpha 8 / rank 4), and the stock pipeline, guided
    as the run was, then makes the trainer's own images."""
    directory, trained = trained_lora
    kw = dict(num_inference_steps=3, guidance_scale=GUIDED, height=32, width=32, max_sequence_length=MSL)
    pipe = stock_pipeline(zimage_model)
    base = pipe(list(PROMPTS), generator=_gen(5), output_type="pt", **kw).images
    with library_log() as log:
        pipe.load_lora_weights(directory)  # the plain diffusers call a user makes
    assert log.messages == []
    loaded = pipe(list(PROMPTS), generator=_gen(5), output_type="pt", **kw).images
    assert float((trained - base).abs().max()) > 1e-3  # the LoRA changed the model
    torch.testing.assert_close(loaded, trained, atol=1e-5, rtol=0)
    latents = pipe(list(PROMPTS), generator=_gen(6), output_type="latent", **kw).images
    torch.testing.assert_close(sample(pipe, PROMPTS, generator=_gen(6), **kw), latents, atol=1e-4, rtol=0)
    with safe_open(str(directory / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys = list(f.keys())
        metadata = f.metadata()
    assert {k.split(".")[0] for k in keys} == {"transformer"}
    assert {k.split(".")[1] for k in keys} == set(STACKS)
    assert any(".feed_forward.w3." in k for k in keys) and any(".attention.to_out.0." in k for k in keys)
    # alpha 8 / rank 4 is folded into lora_B, so the file says alpha = rank and every client applies the trained update
    assert json.loads(metadata["lora_adapter_metadata"])["transformer.lora_alpha"] == 4.0
    load_lora(stock_pipeline(zimage_model), directory)  # our checked loader agrees: every tensor found its module


# ComfyUI (Comfy-Org/ComfyUI), read, not run: comfy/lora.py at 17358c8f73b581a0d22facc3c385822f09b8bfb1,
# model_lora_keys_unet's Lumina2 branch (Z-Image loads as Lumina2): the key map takes "transformer." + every name
# z_image_to_diffusers gives that ends in ".weight", less ".weight"; comfy/utils.py at
# 09708eae709a992a5684bed3595ce4d07e705b4e, z_image_to_diffusers: for each of the n_layers "layers.<i>", the
# n_refiner_layers "context_refiner.<i>" and "noise_refiner.<i>" blocks, attention.to_q/to_k/to_v (slices of the
# fused qkv), attention.to_out.0, attention.norm_q/norm_k, attention_norm1/2, ffn_norm1/2, feed_forward.w1/w2/w3 and
# adaLN_modulation.0; load_lora reads <name>.lora_B.weight / .lora_A.weight with scale <name>.alpha / rank, 1.0
# without an alpha tensor (comfy/weight_adapter/lora.py at 6f98b150e065f1ffc788558574a887835068bd40).
COMFYUI_BLOCK_WEIGHTS = [
    *(f"attention.{x}" for x in ("to_q", "to_k", "to_v", "to_out.0", "norm_q", "norm_k")),
    *("attention_norm1", "attention_norm2", "ffn_norm1", "ffn_norm2", "adaLN_modulation.0"),
    *(f"feed_forward.{w}" for w in ("w1", "w2", "w3")),
]


def comfyui_zimage_names(config) -> set[str]:
    """The LoRA names ComfyUI's Z-Image key map holds, in the diffusers file's form (see above)."""
    blocks = [f"layers.{i}" for i in range(config.n_layers)]
    blocks += [f"{s}.{i}" for s in ("context_refiner", "noise_refiner") for i in range(config.n_refiner_layers)]
    return {f"transformer.{b}.{leaf}" for b in blocks for leaf in COMFYUI_BLOCK_WEIGHTS}


def test_comfyui_maps_every_key_of_the_saved_lora(zimage_model, trained_lora):
    """Every key of the saved file names a module ComfyUI's Z-Image map holds (the tiny model's, and all 238 LoRA
    modules of the full-size transformer on the default targets); the rule is not vacuous: peft's
    ``attention.to_out`` (without ``.0``) and the time embedder are not in it."""
    directory, _ = trained_lora
    with safe_open(str(directory / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys = list(f.keys())
    modules = {k.rsplit(".lora_", 1)[0] for k in keys}
    assert {k.rsplit(".lora_", 1)[1] for k in keys} == {"A.weight", "B.weight"}
    names = comfyui_zimage_names(ZImagePipeline.from_pretrained(zimage_model).transformer.config)
    assert modules and modules <= names, sorted(modules - names)[:3]
    full = build_parts("zimageturbo", device="meta")["transformer"]
    targeted = {
        f"transformer.{n}"
        for n, m in full.named_modules()
        if isinstance(m, torch.nn.Linear) and any(n.endswith("." + t) for t in ZIMAGE_TARGETS)
    }
    assert len(targeted) == 238 and targeted <= comfyui_zimage_names(full.config)
    assert "transformer.layers.0.attention.to_out" not in names and "transformer.t_embedder.mlp.0" not in names


# ----- the command line ------------------------------------------------------------------------------
def test_cli_finetunes_the_local_model_and_resumes(zimage_model, released_ict, tiny_backbone, tmp_path):
    """A real ``rewardtune finetune`` process on the tiny directory with Z-Image-Turbo's defaults (--defaults-from:
    9 steps, no guidance; --sample-steps 3 here), then ``--resume`` to one more step."""
    out = tmp_path / "run"
    args = ["--model", zimage_model, "--defaults-from", "z-image-turbo", "--reward", "ict", "--ict", released_ict]
    args += ["--backbone", tiny_backbone, "--output", out, "--resolution", 32, "--batch-size", 1, "--eval-size", 1]
    args += ["--lora-rank", 2, "--k", 2, "--sample-steps", 3, "--max-sequence-length", 8, "--checkpoint-every", 1]

    def run(*extra):
        res = run_cli("finetune", *args, "--no-gradient-checkpointing", *extra)
        assert res.returncode == 0, res.stderr[-3000:]
        return json.loads((out / "summary.json").read_text())

    first = run("--steps", 1)
    assert first["family"] == "zimage" and first["steps"] == 1
    resumed = run("--steps", 2, "--resume")
    assert resumed["steps"] == 2 and resumed["before"] == first["before"]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["kind"] == "train"] == [1, 2]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["sample_steps"], saved["guidance_scale"], saved["lora_targets"]) == (3, 0.0, ZIMAGE_TARGETS)


@pytest.mark.parametrize(
    "case", ["train_text_encoder", "eta", "export", "resolution", "too_large", "turbo_guidance", "defaults_family"]
)
def test_bad_input_gives_one_clear_line(case, zimage_model, tmp_path, capsys):
    base = ["--model", zimage_model, "--output", tmp_path / "out", "--resolution", 32, "--sample-steps", 2]
    args, expect = {
        "train_text_encoder": (
            ["--train-text-encoder"],
            "--train-text-encoder: ZImagePipeline.load_lora_weights loads transformer weights only",
        ),
        "eta": (["--eta", 0.5], "--eta 0.5: zimage is a flow-matching model"),
        "export": (["--export", "kohya"], "--export kohya: only SD 1.x/2.x, SDXL LoRAs"),
        "resolution": (["--resolution", 40], "--resolution 40: Z-Image packs 2x2 latent patches"),
        "too_large": (["--resolution", 2064], "--resolution 2064 is larger than this Z-Image model's position table"),
        "turbo_guidance": (
            ["--defaults-from", "z-image-turbo", "--guidance-scale", 0.5],
            "--guidance-scale 0.5: 'z-image-turbo' is distilled to sample without guidance",
        ),
        "defaults_family": (["--defaults-from", "flux-dev"], "--defaults-from flux-dev is a flux model"),
    }[case]
    rc = main(["finetune", *map(str, base + args)])
    err = capsys.readouterr().err
    assert rc == 2
    last = err.strip().splitlines()[-1]  # above it, at most the pipeline loading progress bar
    assert last.startswith("rewardtune finetune: error: ") and expect in last and "Traceback" not in err


def test_aliases_name_the_public_models_and_their_cards_settings(zimage_model, stock_pipeline, tmp_path, monkeypatch):
    """Z-Image-Turbo's card: 9 steps, guidance 0; Z-Image's: 50 steps, guidance 4; a local directory takes the
    pipeline's own call defaults (50, 5.0, 512 tokens) unless --defaults-from names an alias."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    for alias, hub_id in (("z-image-turbo", "Tongyi-MAI/Z-Image-Turbo"), ("z-image", "Tongyi-MAI/Z-Image")):
        with pytest.raises(OfflineError, match=f"'{hub_id}' is not in the local cache"):
            resolve_model(alias)
    pipe = stock_pipeline(zimage_model)

    def resolved(**kw):
        cfg = FinetuneConfig(output=str(tmp_path), **kw)
        resolve_defaults(cfg, pipe, "zimage")
        return cfg.sample_steps, cfg.guidance_scale, cfg.max_sequence_length

    assert resolved(model="z-image-turbo") == (9, 0.0, 512)
    assert resolved(model="z-image") == (50, 4.0, 512)
    assert resolved(model=str(zimage_model)) == (50, 5.0, 512)
    assert resolved(model=str(zimage_model), defaults_from="z-image-turbo", sample_steps=4) == (4, 0.0, 512)
    assert families.by_name("zimage").aliases["z-image-turbo"].guidance_free
    assert SCHEDULER == dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)


# ----- the full-size architecture ---------------------------------------------------------------------
def test_full_size_architecture_has_the_published_size():
    """The shipped configs built on the meta device: the transformer has Z-Image's 6.15B parameters (the hub's
    Turbo transformer is 24.6 GB of fp32 shards, Z-Image's 12.3 GB of bf16), Qwen3-4B's decoder 4.02B (its 8.05 GB
    of bf16 shards), LoRA lands on all 34 blocks' 7 projections, and the aliases name the planner's architectures
    with their schedulers' shifts (Turbo 3, Z-Image 6)."""
    parts = build_parts("zimageturbo", dtype=torch.bfloat16, device="meta")
    count = {name: sum(p.numel() for p in parts[name].parameters()) for name in ("transformer", "text_encoder")}
    assert count["transformer"] * 4 == pytest.approx(24.6e9, rel=0.005)
    assert count["transformer"] * 2 == pytest.approx(12.3e9, rel=0.005)
    assert count["text_encoder"] * 2 == pytest.approx(8.05e9, rel=0.005)
    assert type(parts["text_encoder"]).__name__ == "Qwen3Model" and parts["transformer"].config.n_layers == 30
    linears = [n for n, m in parts["transformer"].named_modules() if isinstance(m, torch.nn.Linear)]
    targeted = [n for n in linears if any(n.endswith("." + t) for t in ZIMAGE_TARGETS)]
    assert len(targeted) == (30 + 2 + 2) * 7
    assert families.by_name("zimage").plan_names == ("zimageturbo", "zimage")
    assert (ARCH_OF_ALIAS["z-image-turbo"], ARCH_OF_ALIAS["z-image"]) == ("zimageturbo", "zimage")
    assert build_parts("zimage", device="meta")["scheduler"].config.shift == 6.0
    assert parts["scheduler"].config.shift == 3.0


def test_the_fsdp_recipe_names_the_block_class_the_transformer_has(zimage_model):
    """accelerate refuses a listed block class the model lacks: the recipe lists the family's FSDP block class, which
    every block of the three stacks is."""
    config = yaml.safe_load((ROOT / "recipes/accelerate/fsdp_zimage.yaml").read_text())["fsdp_config"]
    listed = set(config["fsdp_transformer_layer_cls_to_wrap"].split(","))
    transformer = ZImagePipeline.from_pretrained(zimage_model).transformer
    blocks = [m for stack in STACKS for m in getattr(transformer, stack)]
    assert config["fsdp_version"] == 2 and listed == set(families.by_name("zimage").fsdp_blocks)
    assert {type(m).__name__ for m in blocks} == listed and len(blocks) == 4


def test_stored_prompt_embeddings_stand_in_for_the_text_encoder(zimage_model, tmp_path, flow_cfg, brightness):
    """--prompt-embeddings: a first run writes each prompt's caption (its own length) to the store, with Qwen3 run
    on the CPU (--text-encoder-device cpu); a second run finds every prompt there, never loads Qwen3, and conditions
    the transformer on exactly the same captions."""
    store = tmp_path / "store"
    first = Trainer(
        flow_cfg(zimage_model, tmp_path / "a", prompt_embeddings=str(store), text_encoder_device="cpu"),
        reward=brightness(),
    )
    second = Trainer(flow_cfg(zimage_model, tmp_path / "b", prompt_embeddings=str(store)), reward=brightness())
    assert first.pipe.text_encoder is not None and second.pipe.text_encoder is None
    prompts = first.batch_prompts(0, step=0)
    ours, theirs = first.encode(prompts).captions, second.encode(prompts).captions
    assert len({c.shape[0] for c in ours}) > 1  # captions of different lengths
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_the_recipe_is_turbo_at_1024_with_draft_k_and_states_its_prediction(tmp_path):
    """The bundled recipe builds a valid config: Z-Image-Turbo's card settings, DRaFT-K with K = 1, LoRA rank 16,
    ICT-HP, batch 1 at 1024 px; it states the planner's predicted peaks with their commit, marked unmeasured."""
    cfg = build_config(FinetuneConfig, config="zimage_turbo_icthp_draftk", output=str(tmp_path))
    assert (cfg.model, cfg.method, cfg.k, cfg.lora_rank, cfg.reward) == ("z-image-turbo", "draft-k", 1, 16, "icthp")
    assert (cfg.resolution, cfg.batch_size, cfg.sample_steps, cfg.guidance_scale) == (1024, 1, 9, 0.0)
    text = (ROOT / "recipes" / "zimage_turbo_icthp_draftk.yaml").read_text()
    assert "rewardtune plan --config zimage_turbo_icthp_draftk" in text and " GiB (commit " in text
    assert "Not yet measured on a GPU" in text

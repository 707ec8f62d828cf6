"""FLUX.2 (dev: ``Flux2Pipeline``; klein: ``Flux2KleinPipeline``) in rewardtune finetune, on tiny real pipelines saved
in diffusers format (offline, CPU). References are diffusers' own pipelines and LoRA loader, never a second copy of our
code path."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from diffusers import DiffusionPipeline, Flux2KleinPipeline, Flux2Pipeline, Flux2Transformer2DModel
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open

from rewardtune.cli import main
from rewardtune.config import RECIPES_DIR
from rewardtune.errors import OfflineError
from rewardtune.finetune import FinetuneConfig, Trainer, families, sample
from rewardtune.finetune.defaults import resolve_defaults
from rewardtune.finetune.families.flux2 import DOUBLE_AND_FUSED_TARGETS, lora_targets
from rewardtune.finetune.flow import FlowMatchSampler
from rewardtune.finetune.lora import add_lora
from rewardtune.finetune.models import (
    assemble_pipeline,
    make_adapter,
    model_family,
    pipeline_family,
    resolve_model,
    training_scheduler,
)
from rewardtune.finetune.sampler import Plan
from rewardtune.plan.architectures import ARCHITECTURES, CONFIG_DIR, arch_config, build_parts
from rewardtune.testing.cli import run_cli
from rewardtune.testing.flux2_pipelines import LATENT_CHANNELS, save_tiny_flux2_pipeline

PROMPTS = ["a red apple", "a cat"]
MSL = 48  # LLM tokens per prompt: dev's system message and the chat templates fit, the tiny runs stay short


class Brightness(torch.nn.Module):
    """Mean pixel value: a reward any generator can move."""

    def forward(self, images, prompts):
        return images.mean(dim=(1, 2, 3))


@pytest.fixture(scope="module")
def flux2_models(tmp_path_factory):
    """Tiny FLUX.2-dev-like, klein-base-like (true CFG) and step-distilled klein-like pipeline directories."""
    return {
        name: save_tiny_flux2_pipeline(tmp_path_factory.mktemp(f"tiny_flux2_{name}"), variant, distilled)
        for name, variant, distilled in (
            ("dev", "dev", False),
            ("klein", "klein", False),
            ("distilled", "klein", True),
        )
    }


def _load(path):
    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _cfg(model, output, **kw) -> FinetuneConfig:
    base = dict(
        model=str(model),
        prompts="builtin:simple",
        output=str(output),
        method="draft-k",
        k=2,
        steps=2,
        batch_size=2,
        lr=3e-2,
        lora_rank=4,
        lora_alpha=4.0,
        resolution=32,
        sample_steps=3,
        guidance_scale=None,
        eval_every=0,
        eval_size=2,
        checkpoint_every=0,
        max_sequence_length=MSL,
        gradient_checkpointing=False,
    )
    return FinetuneConfig(**{**base, **kw})


def test_tiny_flux2_pipelines_are_real_diffusers_pipelines(flux2_models):
    dev, klein, distilled = (_load(flux2_models[n]) for n in ("dev", "klein", "distilled"))
    assert type(dev) is Flux2Pipeline and type(klein) is Flux2KleinPipeline and type(distilled) is Flux2KleinPipeline
    assert {model_family(p) for p in flux2_models.values()} == {"flux2"}
    assert type(dev.tokenizer).__name__ == "PixtralProcessor" and type(dev.text_encoder).__name__.startswith(
        "Mistral3"
    )
    assert (
        type(klein.tokenizer).__name__ == "Qwen2Tokenizer" and type(klein.text_encoder).__name__ == "Qwen3ForCausalLM"
    )
    assert not klein.config.is_distilled and distilled.config.is_distilled
    assert dev.transformer.config.guidance_embeds and not klein.transformer.config.guidance_embeds
    assert dev.transformer.config.in_channels == 4 * dev.vae.config.latent_channels == 4 * LATENT_CHANNELS
    assert dev.transformer.config.joint_attention_dim == 3 * dev.text_encoder.config.text_config.hidden_size
    assert (
        dev.text_encoder.config.text_config.num_hidden_layers >= 30
        and klein.text_encoder.config.num_hidden_layers >= 27
    )
    assert float(dev.vae.bn.running_var.sub(1).abs().min()) > 0  # de-normalising the latent is never the identity
    # the pipelines' own prompt templates, through our offline tokenizers
    ids = dev.tokenizer.apply_chat_template(
        [[{"role": "user", "content": [{"type": "text", "text": "a red apple"}]}]], tokenize=True, return_dict=True
    )["input_ids"][0]
    assert dev.tokenizer.tokenizer.convert_ids_to_tokens(ids) == ["<s>", "[INST]", "a", "Ġred", "Ġapple", "[/INST]"]
    text = klein.tokenizer.apply_chat_template(
        [{"role": "user", "content": "a cat"}], tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert text == "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


# ----- sampling: the trainer's sampler is the pipeline's ---------------------------------------------
@pytest.mark.parametrize(
    "name,cases",
    [
        ("dev", [(32, 3, 4.0), (64, 2, 2.5)]),
        ("klein", [(32, 3, 3.0), (64, 2, 1.0)]),  # true CFG at 3, none at 1
        ("distilled", [(48, 2, 1.0), (64, 3, 4.0)]),  # a distilled model ignores guidance, as its pipeline does
    ],
)
def test_sample_returns_the_pipelines_latents(flux2_models, name, cases):
    """``sample`` equals ``pipe(..., output_type='latent')`` from the same generator and from the same latents (the
    pipelines' patchified (B, 4C, H/16, W/16) noise), at two sizes and step counts: two shifts. dev returns packed
    latents; klein the VAE's, de-normalised and unpatchified."""
    pipe = _load(flux2_models[name])
    for res, n, g in cases:
        kw = dict(num_inference_steps=n, guidance_scale=g, height=res, width=res, max_sequence_length=MSL)
        ref = pipe(prompt=PROMPTS, generator=_gen(0), output_type="latent", **kw).images
        ours = sample(pipe, PROMPTS, generator=_gen(0), **kw)
        side = res // 16
        expected = (2, side * side, 4 * LATENT_CHANNELS) if name == "dev" else (2, LATENT_CHANNELS, 2 * side, 2 * side)
        assert ours.shape == ref.shape == expected and float((ours - ref).abs().max()) <= 1e-4
        noise = torch.randn((2, 4 * LATENT_CHANNELS, side, side), generator=_gen(1))
        ref = pipe(prompt=PROMPTS, latents=noise, output_type="latent", **kw).images
        assert float((sample(pipe, PROMPTS, latents=noise, **kw) - ref).abs().max()) <= 1e-4


def test_the_shift_depends_on_the_image_size_and_the_number_of_steps(flux2_models):
    """FLUX.2's mu grows with the image tokens and, unlike FLUX.1's, changes with the step count: read back from the
    sigmas the sampler steps on (sigma' = e^mu / (e^mu + 1/t - 1) on t = linspace(1, 1/N, N))."""
    pipe = _load(flux2_models["klein"])
    adapter = make_adapter(pipe, "flux2")

    def mu(res: int, n: int) -> float:
        sampler = FlowMatchSampler(training_scheduler(pipe), n, **adapter.sampler_options(res))
        t, s = 1 - 1 / n, float(sampler.sigmas[1])  # the second sigma (the first is 1 for any mu)
        values = [math.log(si * (1 / ti - 1) / (1 - si)) for si, ti in zip(sampler.sigmas[1:n].tolist(), _ts(n)[1:])]
        assert max(values) - min(values) < 1e-4 and s < 1 and t < 1  # one mu for the whole schedule
        return values[0]

    assert mu(512, 4) < mu(1024, 4) and abs(mu(1024, 4) - mu(1024, 28)) > 0.1
    assert adapter.latent_shape(1024) == (4 * LATENT_CHANNELS, 64, 64) and adapter.native_resolution() == 1024


def _ts(n: int) -> list[float]:
    return [1 - i * (1 - 1 / n) / (n - 1) for i in range(n)]


def test_assemble_pipeline_builds_both_pipelines(flux2_models):
    for name in ("dev", "klein"):
        pipe = _load(flux2_models[name])
        parts = {k: v for k, v in pipe.components.items() if k in ("transformer", "vae", "text_encoder", "scheduler")}
        built = assemble_pipeline(pipeline_family(pipe), parts, pipe.tokenizer)
        assert type(built) is type(pipe) and built.tokenizer is pipe.tokenizer


# ----- training ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def flux2_trainers(flux2_models, tmp_path_factory):
    """dev with its guidance embedding (its default 4.0), klein base with true CFG at 3; the method is read from
    the config at every step, so tests switch it. ReFL stops at steps 0-1 of 3."""
    out = tmp_path_factory.mktemp("flux2_methods")
    return {
        name: Trainer(
            _cfg(
                flux2_models[name],
                out / name,
                refl_min=0.0,
                refl_max=0.6,
                guidance_scale=3.0 if name == "klein" else None,
                gradient_checkpointing=name == "dev",
            ),
            reward=Brightness(),
        )
        for name in ("dev", "klein")
    }


@pytest.mark.parametrize("name", ["dev", "klein"])
@pytest.mark.parametrize("method", ["draft-k", "draft-lv", "refl", "alignprop"])
def test_each_method_raises_the_reward_of_its_batch(flux2_trainers, name, method, step_raises_reward):
    trainer = flux2_trainers[name]
    n = step_raises_reward(trainer, method)
    assert n == (2 * 3 if method == "draft-lv" else 2)  # draft-lv adds lv_samples=2 re-noised copies


@pytest.mark.parametrize("name", ["dev", "klein"])
def test_k_decides_which_steps_carry_gradients(flux2_trainers, name, grads_per_step):
    trainer = flux2_trainers[name]
    for k in (1, 3):
        grads = grads_per_step(trainer, Plan([3 - k] * 2, 3))
        assert [g is not None for g in grads] == [i >= 3 - k for i in range(3)]
        assert all(min(g) > 0 for g in grads if g is not None)
    grads = grads_per_step(trainer, Plan([2, 0], 3))  # AlignProp: each sample its own truncation point
    assert grads[0][0] == 0 and grads[0][1] > 0 and grads[1][0] == 0 and grads[1][1] > 0
    assert grads[2][0] > 0 and grads[2][1] > 0
    trainer.unet.zero_grad(set_to_none=True)


def test_trainer_takes_the_models_defaults_targets_and_caches_prompts(flux2_trainers):
    """Unset options took the family's defaults; LoRA sits on every target, the single blocks' fused projections
    included; the LLM ran once per prompt: a step calls no text encoder, and it waits on the CPU."""
    dev, klein = flux2_trainers["dev"], flux2_trainers["klein"]
    assert dev.cfg.guidance_scale == 4.0 and not dev.sampler.guided and klein.sampler.guided
    assert dev.adapter.guidance_kind == "embedded" and klein.adapter.guidance_kind == "cfg"
    assert (
        dev.cfg.lora_targets
        == lora_targets(1)
        == [*DOUBLE_AND_FUSED_TARGETS, "single_transformer_blocks.0.attn.to_out"]
    )
    wrapped = {n.rsplit(".lora_A", 1)[0] for n, _ in dev.unet.named_modules() if n.endswith(".lora_A")}
    assert {
        "transformer_blocks.0.attn.to_out.0",
        "transformer_blocks.0.ff.linear_in",
        "transformer_blocks.0.ff_context.linear_out",
        "single_transformer_blocks.0.attn.to_qkv_mlp_proj",
        "single_transformer_blocks.0.attn.to_out",
    } <= wrapped and len(wrapped) == 14
    calls = []
    encoders = [dev.adapter.t5, klein.adapter.t5]
    hooks = [m.register_forward_hook(lambda *a: calls.append(1)) for m in encoders]
    try:
        dev.step()
        klein.step()
    finally:
        for h in hooks:
            h.remove()
    assert calls == [] and all(m.device.type == "cpu" for m in encoders)
    assert dev.adapter.text_encoders() == [] == klein.adapter.text_encoders()


def test_stored_prompt_embeddings_train_without_loading_the_llm(flux2_models, tmp_path):
    """--prompt-embeddings: a first run fills the store through klein's Qwen3; a second finds every prompt there, so
    its pipeline has no text encoder at all, and its conditioning is exactly the first run's."""
    cfg = dict(prompt_embeddings=str(tmp_path / "store"), guidance_scale=3.0, sample_steps=2)
    first = Trainer(_cfg(flux2_models["klein"], tmp_path / "a", **cfg), reward=Brightness())
    assert first.pipe.text_encoder is not None
    second = Trainer(_cfg(flux2_models["klein"], tmp_path / "b", **cfg), reward=Brightness())
    assert second.pipe.text_encoder is None and second.adapter.t5 is None
    prompts = first.batch_prompts(0, step=0)
    a, b = first.encode(prompts), second.encode(prompts)
    assert a.guided and b.guided
    torch.testing.assert_close(b.hidden, a.hidden, atol=0, rtol=0)
    assert second.step()["grad_norm"] > 0


# ----- the LoRA a user loads ------------------------------------------------------------------------
@pytest.mark.parametrize("name,g", [("dev", 4.0), ("klein", 3.0)])
def test_saved_lora_loads_into_the_stock_pipeline_and_gives_the_trained_images(
    flux2_models, name, g, tmp_path, library_log
):
    """``pipe.load_lora_weights(dir)`` on a fresh pipeline (the family's own loader) loads every tensor with no
    missing or unexpected key on the diffusers, peft and transformers loggers, and the stock pipeline then makes the
    trainer's own images."""
    cfg = _cfg(flux2_models[name], tmp_path, lr=5e-2, lora_alpha=8.0, guidance_scale=g, sample_steps=2)
    trainer = Trainer(cfg, reward=Brightness())
    trainer.step()
    trainer.save_lora(tmp_path / "lora")
    trainer.unet.eval()
    trained = trainer.generate(PROMPTS, seed=5)
    kw = dict(num_inference_steps=2, guidance_scale=g, height=32, width=32, max_sequence_length=MSL)
    pipe = _load(flux2_models[name])
    base = pipe(prompt=PROMPTS, generator=_gen(5), output_type="pt", **kw).images
    with library_log() as log:
        pipe.load_lora_weights(tmp_path / "lora")  # the plain diffusers call a user makes
    assert log.key_problems() == [] and not [m for m in log.messages if "lora" in m.lower()], log.messages
    loaded = pipe(prompt=PROMPTS, generator=_gen(5), output_type="pt", **kw).images
    assert float((trained - base).abs().max()) > 1e-3  # the LoRA changed the model
    torch.testing.assert_close(loaded, trained, atol=1e-5, rtol=0)
    with safe_open(str(tmp_path / "lora" / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert {k.split(".")[0] for k in keys} == {"transformer"}
    assert "transformer.single_transformer_blocks.0.attn.to_out.lora_A.weight" in keys
    assert "transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj.lora_B.weight" in keys
    assert len(keys) == 2 * 14
    adapters = pipe.get_list_adapters()["transformer"]
    assert len(adapters) == 1 and pipe.transformer.peft_config[adapters[0]].r == 4


# ----- the command line ------------------------------------------------------------------------------
def test_cli_finetunes_a_local_flux2_model_and_resumes(flux2_models, released_ict, tiny_backbone, tmp_path):
    """A real ``rewardtune finetune`` process on the tiny klein base directory (true CFG at 2), then ``--resume`` to
    one more step; the resolved model defaults, LoRA targets included, are in config.yaml."""
    out = tmp_path / "run"
    args = [
        "--model", flux2_models["klein"], "--reward", "ict", "--ict", released_ict, "--backbone", tiny_backbone,
        "--output", out, "--resolution", 32, "--batch-size", 1, "--eval-size", 1, "--lora-rank", 2, "--k", 1,
        "--sample-steps", 2, "--guidance-scale", 2, "--max-sequence-length", 32, "--checkpoint-every", 1,
        "--no-gradient-checkpointing",
    ]  # fmt: skip

    def run(*extra):
        res = run_cli("finetune", *args, *extra)
        assert res.returncode == 0, res.stderr[-3000:]
        return json.loads((out / "summary.json").read_text())

    first = run("--steps", 1)
    assert first["family"] == "flux2" and first["steps"] == 1
    resumed = run("--steps", 2, "--resume")
    assert resumed["steps"] == 2 and resumed["before"] == first["before"]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["kind"] == "train"] == [1, 2]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["guidance_scale"] == 2 and saved["sample_steps"] == 2 and saved["lora_targets"] == lora_targets(1)


@pytest.mark.parametrize(
    "case", ["resolution", "train_text_encoder", "eta", "export", "distilled_guidance", "defaults_family"]
)
def test_bad_flux2_input_gives_one_clear_line(case, flux2_models, tmp_path, capsys):
    base = ["--output", tmp_path / "out", "--resolution", 32, "--sample-steps", 2, "--max-sequence-length", 8]
    klein, dev = ["--model", flux2_models["klein"]], ["--model", flux2_models["dev"]]
    args, expect = {
        "resolution": ([*dev, *base, "--resolution", 40], "--resolution 40: FLUX.2 patchifies 2x2 latent positions"),
        "train_text_encoder": (
            [*klein, *base, "--train-text-encoder"],
            "--train-text-encoder: Flux2Pipeline.load_lora_weights loads transformer weights only",
        ),
        "eta": ([*dev, *base, "--eta", 0.5], "--eta 0.5: flux2 is a flow-matching model"),
        "export": ([*klein, *base, "--export", "kohya"], "--export kohya: only SD 1.x/2.x, SDXL LoRAs"),
        "distilled_guidance": (
            ["--model", flux2_models["distilled"], *base, "--guidance-scale", 3],
            "--guidance-scale 3.0: this FLUX.2 model (is_distilled in its model_index.json) is distilled to sample "
            "without guidance; leave --guidance-scale unset (1)",
        ),
        "defaults_family": ([*dev, "--defaults-from", "flux-dev", *base], "--defaults-from flux-dev is a flux model"),
    }[case]
    rc = main(["finetune", *map(str, args)])
    err = capsys.readouterr().err
    assert rc == 2
    last = err.strip().splitlines()[-1]  # above it, at most the pipeline loading progress bar
    assert last.startswith("rewardtune finetune: error: ") and expect in last and "Traceback" not in err


def test_flux2_aliases_name_the_public_models_and_their_settings(flux2_models, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    for alias, hub_id in (
        ("flux2-dev", "black-forest-labs/FLUX.2-dev"),
        ("flux2-klein-4b", "black-forest-labs/FLUX.2-klein-4B"),
    ):
        with pytest.raises(OfflineError, match=f"'{hub_id}' is not in the local cache"):
            resolve_model(alias)
    dev, klein, distilled = (_load(flux2_models[n]) for n in ("dev", "klein", "distilled"))

    def resolved(pipe, **kw):
        cfg = FinetuneConfig(output=str(tmp_path), **kw)
        resolve_defaults(cfg, pipe, "flux2")
        return cfg.sample_steps, cfg.guidance_scale, cfg.max_sequence_length

    assert resolved(dev, model="flux2-dev") == (50, 4.0, 512)
    assert resolved(klein, model=str(flux2_models["klein"])) == (50, 4.0, 512)
    assert resolved(distilled, model=str(flux2_models["distilled"])) == (4, 1.0, 512)  # read from is_distilled
    assert resolved(klein, model="flux2-klein-9b") == (4, 1.0, 512)
    local = str(flux2_models["klein"])
    assert resolved(klein, model=local, defaults_from="flux2-klein-base-4b", sample_steps=8) == (8, 4.0, 512)


# ----- ComfyUI -------------------------------------------------------------------------------------------
# ComfyUI's rule for a diffusers-format FLUX.2 LoRA, read in Comfy-Org/ComfyUI and written down here (not copied):
# comfy/model_base.py at 094c74c1b7f9cd5cdd9015741e8eb26acff1142a: ``class Flux2(Flux)``, so comfy/lora.py at
# ec93dcacb96b922f7cb1417b3ba22bccb082df32 ``model_lora_keys_unet`` takes its Flux branch: "transformer." + every name
# of comfy/utils.py at 09708eae709a992a5684bed3595ce4d07e705b4e ``flux_to_diffusers`` (FLUX.1's names, and FLUX.2's
# ff.linear_in/out, attn.to_qkv_mlp_proj and attn.to_out of the single blocks), over depth = the double blocks,
# depth_single_blocks = the single blocks and hidden_size = img_in's rows (comfy/model_detection.py at
# 0b61ce5baa9ea03d8484729b7eb00e77c6fca227, its "flux2" branch). A q/k/v name is a slice of the fused weight.
COMFY_DOUBLE = [
    *(f"attn.{x}" for x in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0")),
    *("attn.to_add_out", "norm1.linear", "norm1_context.linear"),
    *("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"),
    *("ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out"),
]
COMFY_SINGLE = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "norm.linear", "proj_out"]
COMFY_SINGLE += ["attn.to_qkv_mlp_proj", "attn.to_out"]
COMFY_SLICED = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")


def comfyui_flux2_names(config) -> dict[str, int | None]:
    """{LoRA module name ComfyUI maps: rows it takes from the fused weight (a q/k/v slice: hidden_size), else None}."""
    hidden = config.num_attention_heads * config.attention_head_dim  # img_in's rows
    names = {}
    for i in range(config.num_layers):
        for leaf in COMFY_DOUBLE:
            names[f"transformer.transformer_blocks.{i}.{leaf}"] = hidden if leaf in COMFY_SLICED else None
    for i in range(config.num_single_layers):
        for leaf in COMFY_SINGLE:
            names[f"transformer.single_transformer_blocks.{i}.{leaf}"] = hidden if leaf in COMFY_SLICED[:3] else None
    return names


@pytest.mark.parametrize("arch", ["flux2klein4b", "flux2klein9b", "flux2dev"])
def test_comfyui_maps_every_module_of_the_lora_file(arch, tmp_path):
    """On the full-size transformers (meta device, shipped configs): every module the family's targets put a LoRA on,
    named as in the file ``save_lora`` writes, is one ComfyUI maps, and a sliced q/k/v name has the slice's rows."""
    with torch.device("meta"):
        model = Flux2Transformer2DModel(**arch_config(ARCHITECTURES[arch]["transformer"]))
    add_lora(model, 2, 2.0, lora_targets(model.config.num_single_layers))
    state = get_peft_model_state_dict(model)
    mapped = comfyui_flux2_names(model.config)
    modules = {"transformer." + k.rsplit(".lora_", 1)[0]: v for k, v in state.items() if ".lora_B." in k}
    assert len(modules) == 12 * model.config.num_layers + 2 * model.config.num_single_layers
    missing = sorted(set(modules) - set(mapped))
    assert not missing, f"{len(missing)} modules ComfyUI would not load, e.g. {missing[:3]}"
    for name, lora_b in modules.items():
        rows = mapped[name]
        assert rows is None or lora_b.shape[0] == rows, name
    # not vacuous: FLUX.1's single-block projection names are not in FLUX.2's file, and a typo is not mapped
    assert "transformer.single_transformer_blocks.0.proj_out" not in modules
    assert "transformer.transformer_blocks.0.ff.linear_inn" not in mapped


# ----- full-size architectures -------------------------------------------------------------------------
# Published sizes (billions of parameters): FLUX.2-dev's transformer 32B (black-forest-labs/flux2 README), klein 4B and
# 9B (their names), Mistral-Small-3.x 24B, Qwen3-4B and Qwen3-8B (their names).
FULL_SIZES = {"flux2dev": (32, 24), "flux2klein4b": (4, 4), "flux2klein9b": (9, 8)}


@pytest.mark.parametrize("arch", list(FULL_SIZES))
def test_shipped_configs_build_the_published_models(arch):
    """The planner's configs (plan/configs) on the meta device: the transformer and the LLM have their published
    sizes, dev a guidance embedding and klein none, and each config names the hub file it stands for."""
    parts = build_parts(arch, torch.bfloat16, "meta")
    transformer, encoder = FULL_SIZES[arch]
    assert round(sum(p.numel() for p in parts["transformer"].parameters()) / 1e9) == transformer
    assert round(sum(p.numel() for p in parts["text_encoder"].parameters()) / 1e9) == encoder
    assert parts["transformer"].config.guidance_embeds == (arch == "flux2dev")
    assert type(parts["vae"]).__name__ == "AutoencoderKLFlux2" and parts["vae"].config.latent_channels == 32
    assert parts["transformer"].config.joint_attention_dim == 3 * _text_width(parts["text_encoder"].config)
    for part in ARCHITECTURES[arch].values():
        assert "/" in json.loads((CONFIG_DIR / f"{part}.json").read_text())["_source"], part


def _text_width(config) -> int:
    return getattr(config, "text_config", config).hidden_size


def test_fsdp_recipe_names_the_block_classes_the_transformer_has(flux2_models):
    """accelerate refuses a listed block class the model lacks: recipes/accelerate/fsdp_flux2.yaml lists the family's
    FSDP blocks, both present in the transformer (diffusers' own block classes in the tiny one)."""
    config = yaml.safe_load((RECIPES_DIR / "accelerate" / "fsdp_flux2.yaml").read_text())["fsdp_config"]
    listed = config["fsdp_transformer_layer_cls_to_wrap"].split(",")
    assert tuple(listed) == families.by_name("flux2").fsdp_blocks and config["fsdp_version"] == 2
    for name in ("dev", "klein"):
        present = {type(m).__name__ for m in _load(flux2_models[name]).transformer.modules()}
        assert set(listed) <= present, set(listed) - present

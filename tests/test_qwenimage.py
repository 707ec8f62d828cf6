"""Qwen-Image (``QwenImagePipeline``) in rewardtune finetune, on a tiny real pipeline saved in diffusers format
(offline, CPU). References are diffusers' own: its pipeline for sampling, its LoRA loader for the round trip."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml
from diffusers import AutoencoderKLQwenImage, DiffusionPipeline, QwenImagePipeline, QwenImageTransformer2DModel
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from rewardtune.cli import main
from rewardtune.config import RECIPES_DIR, build_config
from rewardtune.finetune import FinetuneConfig, Trainer, families, load_lora, sample
from rewardtune.finetune.defaults import resolve_defaults
from rewardtune.finetune.families.qwenimage import NEGATIVE_PROMPT, QWENIMAGE_TARGETS
from rewardtune.finetune.flow import FlowMatchSampler
from rewardtune.finetune.lora import add_lora, save_lora
from rewardtune.finetune.models import assemble_pipeline, make_adapter, model_family, training_scheduler
from rewardtune.finetune.sampler import Plan
from rewardtune.finetune.trainer import checkpoint_vae_decoder
from rewardtune.plan import arch_config, build_reward, predict_peak_memory
from rewardtune.testing import tiny_clip_config
from rewardtune.testing.cli import run_cli
from rewardtune.testing.qwenimage_pipelines import pipeline_template, save_tiny_qwenimage_pipeline

PROMPTS = ["a red apple", "a cat sitting on a mat"]  # different lengths: the conditional rows are padded
MSL = 16  # text tokens per prompt (the real default is 512)
TINY_CLIP = tiny_clip_config(49408, projection_dim=32, image_size=64, patch_size=32, hidden=32, layers=1).to_dict()


class Brightness(torch.nn.Module):
    def forward(self, images, prompts):
        return images.mean(dim=(1, 2, 3))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are a few thousand parameters a part: a second thread only adds synchronisation, which on a
    loaded machine made a training step 15-25x slower (0.7-1.0 s at one thread, 14-23 s at two, load 8)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def qwen_model(tmp_path_factory):
    return save_tiny_qwenimage_pipeline(tmp_path_factory.mktemp("tiny_qwenimage"))


def _load(path):
    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _pipe_kw(g: float, res: int, steps: int = 3) -> dict:
    """The stock call with true CFG as rewardtune samples it: the negative prompt ' ' when guided."""
    return dict(
        true_cfg_scale=g,
        negative_prompt=NEGATIVE_PROMPT if g > 1 else None,
        num_inference_steps=steps,
        height=res,
        width=res,
        max_sequence_length=MSL,
    )


def test_tiny_pipeline_has_the_real_layout(qwen_model):
    """The tiny model is a QwenImagePipeline of the released one's parts, and its tokenizer makes the template's
    first 34 tokens -- the ones the pipeline drops -- exactly its system part, as Qwen2's tokenizer does."""
    pipe = QwenImagePipeline.from_pretrained(qwen_model)
    assert model_family(qwen_model) == "qwenimage"
    assert type(pipe.vae).__name__ == "AutoencoderKLQwenImage" and pipe.vae.config.z_dim == 16
    assert len(pipe.vae.config.latents_std) == 16 and pipe.vae_scale_factor == 8
    assert type(pipe.text_encoder).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert pipe.transformer.config.in_channels == 64 and pipe.transformer.config.out_channels == 16
    cfg = pipe.scheduler.config
    assert cfg.use_dynamic_shifting and cfg.time_shift_type == "exponential" and cfg.shift_terminal == 0.02
    template, drop = pipeline_template()
    tokens = pipe.tokenizer.convert_ids_to_tokens(pipe.tokenizer(template.format("a red apple")).input_ids)
    assert drop == 34 and tokens[drop - 1 :] == [
        "Ċ",
        "a",
        "Ġred",
        "Ġapple",
        "<|im_end|>",
        "Ċ",
        "<|im_start|>",
        "assistant",
        "Ċ",
    ]
    assert tokens[:4] == ["<|im_start|>", "system", "Ċ", "Describe"] and tokens[drop - 3 : drop] == [
        "<|im_start|>",
        "user",
        "Ċ",
    ]
    parts = {k: v for k, v in pipe.components.items() if k != "tokenizer"}
    assert type(assemble_pipeline("qwenimage", parts, pipe.tokenizer)) is QwenImagePipeline


# ----- sampling: the trainer's sampler is the pipeline's ---------------------------------------------------
def test_sample_returns_the_pipelines_latents(qwen_model):
    """``sample`` equals ``pipe(..., output_type='latent')`` from the same generator and from the same packed
    latents: true CFG with the negative prompt and the norm rescaling (g 4), without guidance (g 1), at two
    resolutions (two packed token counts, so two shifts)."""
    pipe = _load(qwen_model)
    for res, g in ((32, 4.0), (64, 1.0)):
        kw = _pipe_kw(g, res)
        ref = pipe(PROMPTS, generator=_gen(0), output_type="latent", **kw).images
        ours = sample(pipe, PROMPTS, generator=_gen(0), guidance_scale=g, **_ours(kw))
        assert ours.shape == ref.shape == (2, (res // 16) ** 2, 64)
        assert float((ours - ref).abs().max()) <= 1e-4
        noise = torch.randn(ref.shape, generator=_gen(1))
        ref = pipe(PROMPTS, latents=noise, output_type="latent", **kw).images
        assert float((sample(pipe, PROMPTS, latents=noise, guidance_scale=g, **_ours(kw)) - ref).abs().max()) <= 1e-4


def _ours(pipe_kw: dict) -> dict:
    return {k: v for k, v in pipe_kw.items() if k not in ("true_cfg_scale", "negative_prompt")}


def test_schedule_is_the_pipelines_at_full_size(qwen_model):
    """sigmas linspace(1, 1/N, N) shifted exponentially with mu from the packed tokens ((H/16)(W/16), between the
    config's (256, 0.5) and (8192, 0.9)), then stretched so that the last is shift_terminal 0.02; the timesteps
    the transformer sees are sigma * 1000 (divided by 1000 in the call)."""
    pipe = _load(qwen_model)
    adapter = make_adapter(pipe, "qwenimage")
    for res in (512, 1024):
        tokens = (res // 16) ** 2
        mu = 0.5 + (tokens - 256) * (0.9 - 0.5) / (8192 - 256)
        sampler = FlowMatchSampler(training_scheduler(pipe), 4, **adapter.sampler_options(res))
        t = np.linspace(1.0, 1 / 4, 4)
        shifted = math.exp(mu) / (math.exp(mu) + (1 / t - 1))
        stretched = 1 - (1 - shifted) / ((1 - shifted[-1]) / (1 - 0.02))
        assert sampler.sigmas.tolist() == pytest.approx([*stretched.tolist(), 0.0], abs=1e-6)
        torch.testing.assert_close(sampler.timesteps, sampler.sigmas[:-1] * 1000)
        assert adapter.latent_shape(res) == (tokens, 64)
    assert adapter.native_resolution() == 1024


# ----- training ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qwen_trainer(qwen_model, tmp_path_factory):
    """A trainer with the model's own guidance (true CFG 4) and gradient checkpointing (the transformer's blocks
    and the 3-D VAE's layers); the method is read from its config at every step, so tests switch it."""
    cfg = FinetuneConfig(
        model=str(qwen_model),
        prompts="builtin:simple",
        output=str(tmp_path_factory.mktemp("qwen_methods")),
        method="draft-k",
        k=2,
        steps=2,
        batch_size=2,
        lr=1e-2,
        lora_rank=4,
        lora_alpha=4.0,
        resolution=32,
        sample_steps=3,
        eval_every=0,
        eval_size=2,
        checkpoint_every=0,
        refl_min=0.0,
        refl_max=0.6,
        max_sequence_length=MSL,
        gradient_checkpointing=True,
    )
    return Trainer(cfg, reward=Brightness())


@pytest.mark.parametrize("method", ["draft-k", "draft-lv", "refl", "alignprop"])
def test_each_method_raises_the_reward_of_its_batch(qwen_trainer, method, step_raises_reward):
    trainer = qwen_trainer
    n = step_raises_reward(trainer, method)
    assert n == (2 * 3 if method == "draft-lv" else 2)  # draft-lv adds lv_samples=2 re-noised copies


def test_trainer_takes_the_models_defaults_and_caches_the_prompts(qwen_trainer):
    """Unset options took QwenImagePipeline's defaults (true CFG 4 in the conditioning, never the sampler's two
    rows); the prompt set and the negative prompt were encoded once: a step calls no text encoder."""
    trainer = qwen_trainer
    assert trainer.cfg.guidance_scale == 4.0 and trainer.cfg.lora_targets == QWENIMAGE_TARGETS
    assert not trainer.sampler.guided and trainer.encode(PROMPTS).scale == 4.0
    assert any("img_mlp.net.2.lora_A" in n for n, _ in trainer.unet.named_parameters())
    assert NEGATIVE_PROMPT in trainer.adapter._cache
    calls = []
    hook = trainer.adapter.t5.register_forward_hook(lambda *a: calls.append(1))
    try:
        trainer.step()
    finally:
        hook.remove()
    assert calls == [] and trainer.adapter.t5.device.type == "cpu"


def test_k_decides_which_steps_carry_gradients(qwen_trainer, grads_per_step):
    """Per step the denoiser runs twice (conditional, then negative prompt); exactly the last K steps' calls get
    a gradient, and AlignProp's per-sample truncation reaches each sample from its own step on."""
    trainer = qwen_trainer

    def per_step(plan):
        calls = grads_per_step(trainer, plan)
        assert len(calls) == 6
        return [None if a is None else [x + y for x, y in zip(a, b)] for a, b in zip(calls[::2], calls[1::2])]

    for k in (1, 3):
        grads = per_step(Plan([3 - k] * 2, 3))
        assert [g is not None for g in grads] == [i >= 3 - k for i in range(3)]
        assert all(min(g) > 0 for g in grads if g is not None)
    grads = per_step(Plan([2, 0], 3))
    assert grads[0][0] == 0 and grads[0][1] > 0 and grads[1][0] == 0 and grads[1][1] > 0
    assert grads[2][0] > 0 and grads[2][1] > 0
    trainer.unet.zero_grad(set_to_none=True)


def test_checkpointed_3d_vae_decode_gives_the_same_images_and_gradients(qwen_model):
    """The causal 3-D VAE's layers, checkpointed without their frame cache, decode and backpropagate exactly as
    the plain decoder does (diffusers does not checkpoint this VAE)."""
    vae = _load(qwen_model).vae
    z = torch.randn(1, 16, 1, 4, 4, generator=_gen(3))

    def run():
        x = z.clone().requires_grad_(True)
        out = vae.decode(x, return_dict=False)[0]
        out.square().mean().backward()
        return out.detach(), x.grad

    plain = run()
    checkpoint_vae_decoder(vae)
    assert all(getattr(r, "_rewardtune_checkpointed", False) for r in vae.decoder.up_blocks[0].resnets)
    ckpt = run()
    torch.testing.assert_close(ckpt[0], plain[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(ckpt[1], plain[1], atol=1e-6, rtol=0)


# ----- the LoRA a user loads ---------------------------------------------------------------------------------
def test_saved_lora_loads_into_the_stock_pipeline_and_gives_the_trained_images(qwen_model, tmp_path, library_log):
    """``QwenImagePipeline.load_lora_weights(dir)`` on a fresh pipeline loads every tensor without a warning from
    diffusers, peft or transformers, at the trained scale (alpha 8 / rank 4), and the stock pipeline then makes the
    trainer's own images (decoded through the 3-D VAE)."""
    cfg = FinetuneConfig(
        model=str(qwen_model),
        prompts="builtin:simple",
        output=str(tmp_path),
        k=2,
        steps=1,
        batch_size=2,
        lr=5e-2,
        lora_rank=4,
        lora_alpha=8.0,
        resolution=32,
        sample_steps=3,
        eval_every=0,
        eval_size=2,
        max_sequence_length=MSL,
        gradient_checkpointing=False,
    )
    trainer = Trainer(cfg, reward=Brightness())
    trainer.step()
    trainer.save_lora(tmp_path / "lora")
    trainer.unet.eval()
    trained = trainer.generate(PROMPTS, seed=5)
    kw = _pipe_kw(4.0, 32)
    pipe = _load(qwen_model)
    base = pipe(PROMPTS, generator=_gen(5), output_type="pt", **kw).images
    with library_log() as log:
        pipe.load_lora_weights(tmp_path / "lora")  # the plain diffusers call a user makes
    assert log.messages == []
    loaded = pipe(PROMPTS, generator=_gen(5), output_type="pt", **kw).images
    assert float((trained - base).abs().max()) > 1e-3  # the LoRA changed the model
    torch.testing.assert_close(loaded, trained, atol=1e-5, rtol=0)
    with safe_open(str(tmp_path / "lora" / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys = list(f.keys())
        metadata = f.metadata()
    assert {k.split(".")[0] for k in keys} == {"transformer"}
    assert any(".txt_mlp.net.2." in k for k in keys) and any(".attn.add_q_proj." in k for k in keys)
    # alpha 8 / rank 4 is folded into lora_B, so the file says alpha = rank and every client applies the trained update
    assert json.loads(metadata["lora_adapter_metadata"])["transformer.lora_alpha"] == 4.0
    load_lora(_load(qwen_model), tmp_path / "lora")  # our checked loader agrees: every tensor found its module


# ----- the command line ----------------------------------------------------------------------------------------
def test_cli_finetunes_the_local_model_and_resumes(qwen_model, released_ict, tiny_backbone, tmp_path):
    """A real ``rewardtune finetune`` process on the tiny directory, then ``--resume`` to one more step; the
    resolved defaults (true CFG 4, the family's LoRA targets) are in config.yaml."""
    out = tmp_path / "run"
    args = ["--model", qwen_model, "--reward", "ict", "--ict", released_ict, "--backbone", tiny_backbone]
    args += ["--output", out, "--resolution", 32, "--batch-size", 1, "--eval-size", 1, "--lora-rank", 2, "--k", 2]
    args += ["--sample-steps", 2, "--max-sequence-length", 8, "--checkpoint-every", 1, "--no-gradient-checkpointing"]

    def run(*extra):
        res = run_cli("finetune", *args, *extra)
        assert res.returncode == 0, res.stderr[-3000:]
        return json.loads((out / "summary.json").read_text())

    first = run("--steps", 1)
    assert first["family"] == "qwenimage" and first["steps"] == 1
    resumed = run("--steps", 2, "--resume")
    assert resumed["steps"] == 2 and resumed["before"] == first["before"]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["kind"] == "train"] == [1, 2]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["guidance_scale"] == 4.0 and saved["sample_steps"] == 2
    assert saved["lora_targets"] == QWENIMAGE_TARGETS


@pytest.mark.parametrize(
    "case,extra,expect",
    [
        (
            "text_encoder",
            ["--train-text-encoder"],
            "--train-text-encoder: QwenImagePipeline.load_lora_weights loads transformer weights only",
        ),
        ("resolution", ["--resolution", 40], "--resolution 40: Qwen-Image packs 2x2 latent patches"),
        ("one_step", ["--sample-steps", 1], "--sample-steps 1: Qwen-Image's schedule takes at least 2 steps"),
        ("eta", ["--eta", 0.5], "--eta 0.5: qwenimage is a flow-matching model"),
        ("export", ["--export", "kohya"], "--export kohya: only SD 1.x/2.x, SDXL LoRAs are converted"),
        ("defaults", ["--defaults-from", "flux-dev"], "--defaults-from flux-dev is a flux model"),
    ],
)
def test_bad_input_gives_one_clear_line(case, extra, expect, qwen_model, tmp_path, capsys):
    args = ["--model", qwen_model, "--output", tmp_path / "out", "--resolution", 32, "--sample-steps", 2, *extra]
    rc = main(["finetune", *map(str, args)])
    err = capsys.readouterr().err
    assert rc == 2
    last = err.strip().splitlines()[-1]  # above it, at most the pipeline loading progress bar
    assert last.startswith("rewardtune finetune: error: ") and expect in last and "Traceback" not in err


def test_alias_and_family_defaults(qwen_model, tmp_path):
    """The alias names the public model and the model card's settings; a local directory takes the pipeline's."""
    family, alias = families.aliases()["qwen-image"]
    assert family.name == "qwenimage" and alias.hub == ("Qwen/Qwen-Image",)
    pipe = _load(qwen_model)

    def resolved(**kw):
        cfg = FinetuneConfig(output=str(tmp_path), **kw)
        resolve_defaults(cfg, pipe, "qwenimage")
        return cfg.sample_steps, cfg.guidance_scale, cfg.max_sequence_length

    assert resolved(model="qwen-image") == (50, 4.0, 512)
    assert resolved(model=str(qwen_model), sample_steps=20, guidance_scale=1.0) == (20, 1.0, 512)


# ----- full size: configs, planner, recipes ----------------------------------------------------------------------
def test_shipped_configs_build_the_published_sizes():
    """On the meta device: the transformer is the README's "20B MMDiT" (20.43B), the Qwen2.5-VL-7B encoder the
    8.29B whose bf16 weights are 16.58 GB (its four shards in Qwen-Image's text_encoder/), the VAE Qwen-Image's."""
    with torch.device("meta"):
        transformer = QwenImageTransformer2DModel.from_config(arch_config("qwenimage_transformer"))
        encoder = Qwen2_5_VLForConditionalGeneration(
            Qwen2_5_VLConfig.from_dict(arch_config("qwen25vl_7b_text_encoder"))
        )
        vae = AutoencoderKLQwenImage.from_config(arch_config("qwenimage_vae"))

    def count(m):
        return sum(p.numel() for p in m.parameters())

    assert round(count(transformer) / 1e9) == 20 and f"{count(transformer) / 1e9:.4g}" == "20.43"
    assert count(encoder) * 2 / 1e9 == pytest.approx(4.97 + 4.99 + 4.93 + 1.69, abs=0.02)
    assert vae.config.latents_std == pytest.approx(arch_config("qwenimage_vae")["latents_std"])
    assert 2 ** len(vae.config.temperal_downsample) == 8 and vae.config.z_dim == 16


def test_fsdp_recipe_names_the_block_class_the_model_has(qwen_model):
    config = yaml.safe_load((RECIPES_DIR / "accelerate" / "fsdp_qwenimage.yaml").read_text())["fsdp_config"]
    listed = set(config["fsdp_transformer_layer_cls_to_wrap"].split(","))
    present = {type(m).__name__ for m in _load(qwen_model).transformer.modules()}
    assert listed == set(families.by_name("qwenimage").fsdp_blocks) and listed <= present


def test_planner_traces_a_qwenimage_step(qwen_model):
    """The planner runs the Trainer's own step on fake tensors (the encoder's embeddings cached first, so the
    encoder is not resident); at full size it takes minutes (the recipe states its prediction)."""
    base = dict(model=str(qwen_model), output="", reward="ict", k=1, sample_steps=2, resolution=64)
    plan = predict_peak_memory(  # one branch and one reward tower: the trace's ~10k operations take seconds
        FinetuneConfig(**base, guidance_scale=1.0, max_sequence_length=MSL), reward_config=TINY_CLIP
    )
    pipe = _load(qwen_model)
    reward = build_reward("ict", torch.float32, "meta", clip_config=TINY_CLIP)
    tensors = [t for m in (pipe.transformer, pipe.vae, reward) for t in (*m.parameters(), *m.buffers())]
    assert plan["family"] == "qwenimage" and plan["trainable_params"] > 0
    # the frozen weights counted are the transformer's, the VAE's and the reward's: not the text encoder's
    assert plan["weights_mib"] == pytest.approx(sum(t.numel() * t.element_size() for t in tensors) / 2**20, rel=0.02)
    assert plan["peak_mib"] > plan["resident_mib"] > plan["weights_mib"] and plan["resolution"] == 64


def test_recipe_builds_a_valid_config(tmp_path):
    cfg = build_config(FinetuneConfig, config="qwenimage_icthp_draftk", output=str(tmp_path))
    assert cfg.model == "qwen-image" and cfg.method == "draft-k" and cfg.k == 1 and cfg.resolution == 1024
    assert cfg.lora_rank == 16 and cfg.batch_size == 1 and cfg.reward == "icthp" and cfg.quantize_base == "nf4"
    text = (RECIPES_DIR / "qwenimage_icthp_draftk.yaml").read_text()
    assert "rewardtune plan --config qwenimage_icthp_draftk" in text and "Not yet measured on a GPU" in text


# ----- ComfyUI: its key rule for Qwen-Image, read there and written here (not copied) -------------------------------
# - comfy/ldm/qwen_image/model.py (comfyanonymous/ComfyUI at c708d0a433c2f93e97d6e149ccda313192ee4f1e): the Linear
#   layers of QwenImageTransformer2DModel carry diffusers' names; per block transformer_blocks.N: img_mod.1, txt_mod.1,
#   attn.{to_q,to_k,to_v,add_q_proj,add_k_proj,add_v_proj,to_out.0,to_add_out}, img_mlp.net.0.proj, img_mlp.net.2,
#   txt_mlp.net.0.proj, txt_mlp.net.2 (FeedForward: net = [GELU(proj), Dropout, Linear]).
# - comfy/lora.py, model_lora_keys_unet's QwenImage branch: for every diffusion_model.{m}.weight of the model,
#   key_map["transformer.{m}"] (and "{m}", "lycoris_{m with _}"). The copy read here is in the search index without a
#   commit; the snapshot could not be fetched (1.19 GB, over the tool's 0.5 GB), and the comfy/lora.py stored with a
#   commit (00728eb) predates Qwen-Image.
# - comfy/weight_adapter/lora.py (at 6fd406fb14ca663225b88c6f75d7a7f2b997e5a0), LoRAAdapter.load: module key x is a
#   LoRA when "{x}.lora_B.weight" is in the file, with "{x}.lora_A.weight"; its scale is alpha/rank only where
#   "{x}.alpha" is in the file, else 1.
COMFY_BLOCK_LINEARS = [
    "img_mod.1",
    "txt_mod.1",
    *(
        f"attn.{p}"
        for p in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out")
    ),
    "img_mlp.net.0.proj",
    "img_mlp.net.2",
    "txt_mlp.net.0.proj",
    "txt_mlp.net.2",
]


def comfy_qwen_lora_modules(num_layers: int) -> set[str]:
    """The LoRA module keys ComfyUI maps onto its Qwen-Image blocks (the rule above, blocks only)."""
    return {f"transformer.transformer_blocks.{i}.{leaf}" for i in range(num_layers) for leaf in COMFY_BLOCK_LINEARS}


def _comfy_reads(keys: list[str], modules: set[str]) -> set[str]:
    """The keys ComfyUI's LoRA adapter consumes: each module's lora_B/lora_A pair."""
    read = set()
    for m in modules:
        if f"{m}.lora_B.weight" in keys and f"{m}.lora_A.weight" in keys:
            read |= {f"{m}.lora_B.weight", f"{m}.lora_A.weight"}
    return read


def test_comfyui_maps_every_key_of_a_full_size_lora():
    """Every key of the LoRA rewardtune saves (the family's targets on all 60 blocks of the full-size module tree,
    named as save_lora names them) is one ComfyUI reads; a FLUX-style or kohya name is not. (The widths are cut to
    tiny ones: names do not depend on them, and peft's injection into 720 full-size modules takes seconds.)"""
    tiny_widths = dict(attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(2, 2, 4))
    with torch.device("meta"):
        transformer = QwenImageTransformer2DModel.from_config({**arch_config("qwenimage_transformer"), **tiny_widths})
    add_lora(transformer, 16, 16.0, QWENIMAGE_TARGETS)
    keys = [f"transformer.{k}" for k in get_peft_model_state_dict(transformer)]
    assert len(keys) == 60 * len(QWENIMAGE_TARGETS) * 2
    assert _comfy_reads(keys, comfy_qwen_lora_modules(60)) == set(keys)
    foreign = [
        "transformer.transformer_blocks.0.ff.net.2.lora_B.weight",
        "lora_unet_transformer_blocks_0_attn_to_q.lora_up.weight",
    ]
    assert _comfy_reads(foreign, comfy_qwen_lora_modules(60)) == set()


def test_saved_lora_file_is_read_whole_by_the_comfyui_rule(qwen_model, tmp_path):
    """The file save_lora writes (tiny model, two blocks) has only keys ComfyUI reads and no '.alpha' entries: ComfyUI
    applies it at scale 1, the trained scale: lora_B carries alpha / rank (save_lora folds it in)."""
    pipe = _load(qwen_model)
    add_lora(pipe.transformer, 4, 4.0, QWENIMAGE_TARGETS)
    path = save_lora(tmp_path / "lora", QwenImagePipeline, pipe.transformer)
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    assert keys and _comfy_reads(keys, comfy_qwen_lora_modules(2)) == set(keys)
    assert not any(k.endswith(".alpha") for k in keys)


def test_stored_prompt_embeddings_stand_in_for_qwen25vl(qwen_model, tmp_path):
    """--prompt-embeddings: a first run (Qwen2.5-VL on the CPU) writes each prompt's features and length to the
    store, the negative prompt's too; a second run finds them all, never loads Qwen2.5-VL, and conditions the
    transformer on exactly the same features and mask, negative branch included."""
    store = tmp_path / "store"

    def cfg(out, **kw):
        return FinetuneConfig(
            model=str(qwen_model), prompts="builtin:simple", output=str(tmp_path / out), steps=1, batch_size=2,
            lora_rank=4, resolution=32, sample_steps=2, eval_every=0, eval_size=2, checkpoint_every=0,
            max_sequence_length=MSL, prompt_embeddings=str(store), **kw,
        )  # fmt: skip

    first = Trainer(cfg("a", text_encoder_device="cpu"), reward=Brightness())
    second = Trainer(cfg("b"), reward=Brightness())
    assert first.pipe.text_encoder is not None and second.pipe.text_encoder is None
    prompts = first.batch_prompts(0, step=0)
    ours, theirs = first.encode(prompts), second.encode(prompts)
    assert ours.scale == theirs.scale == 4.0
    for name in ("hidden", "mask", "neg_hidden", "neg_mask"):
        a, b = getattr(ours, name), getattr(theirs, name)
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, atol=0, rtol=0)

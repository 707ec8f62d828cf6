"""The memory planner: full-size configs build, predictions are sane and move the right way with each
knob, impossible configs are clear errors. Everything is traced on fake tensors: nothing allocates."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from diffusers import AutoencoderKL

from rewardtune.cli import main
from rewardtune.config import RECIPES_DIR, build_config
from rewardtune.errors import UserError
from rewardtune.finetune import families
from rewardtune.finetune.config import FinetuneConfig
from rewardtune.plan import arch_config, build_clip, build_parts, fit_budget, predict_peak_memory
from rewardtune.plan.architectures import ARCH_OF_ALIAS, CONFIG_DIR, FAMILY_OF
from rewardtune.plan.stacks import BASE_DEPTH
from rewardtune.testing import save_tiny_flow_pipeline, save_tiny_pipeline, tiny_clip_config
from rewardtune.testing.cli import offline_env, run_cli

TINY_REWARD = tiny_clip_config(
    49408, hidden=32, layers=2, heads=4, projection_dim=1024, image_size=224, patch_size=32
).to_dict()


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("pipe") / "sd", family="sd")


def tiny_cfg(tiny_sd, **kw) -> FinetuneConfig:
    base = dict(model=str(tiny_sd), output="unused", k=1, sample_steps=2, mixed_precision="bf16")
    return FinetuneConfig(**{**base, **kw})


def millions(module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


def test_shipped_configs_build_the_published_architectures():
    # Published sizes: SD 1.5 UNet 860M, SDXL UNet 2.6B, SDXL bigG text tower 695M, CLIP ViT-H-14 986M.
    sd = build_parts("sd15", torch.float16, "meta")
    xl = build_parts("sdxl", torch.float16, "meta")
    assert millions(sd["unet"]) == pytest.approx(859.5, abs=1)
    assert millions(xl["unet"]) == pytest.approx(2567.5, abs=1)
    assert millions(xl["text_encoder_2"]) == pytest.approx(694.7, abs=1)
    assert millions(sd["vae"]) == pytest.approx(83.7, abs=0.5)
    assert millions(build_clip(torch.float16, "meta")) == pytest.approx(986.1, abs=1)
    assert arch_config("clip_vit_h14")["projection_dim"] == 1024
    assert "_source" not in arch_config("sdxl_unet")


# The published transformer sizes (billions of parameters): SD3.5-Large 8.06B, SD3.5-Medium 2.24B, FLUX.1-dev 11.90B.
FLOW_SIZES = {"sd35l": 8.06, "sd35m": 2.24, "fluxdev": 11.9}


def test_flow_configs_build_the_published_transformers():
    for arch, billions in FLOW_SIZES.items():
        n = sum(p.numel() for p in build_parts(arch, torch.bfloat16, "meta")["transformer"].parameters())
        assert float(f"{n / 1e9:.3g}") == billions, arch
    schnell = build_parts("fluxschnell", torch.bfloat16, "meta")
    assert not schnell["transformer"].config.guidance_embeds and schnell["scheduler"].config.shift == 1.0
    for path in CONFIG_DIR.glob("*.json"):  # every shipped value names the hub file it stands for
        assert "/" in json.loads(path.read_text())["_source"], path.name


@pytest.fixture(scope="module")
def flow_plans():
    """The planner on the full-size flow models (meta/fake tensors, tiny reward towers): one gradient step at 256 px
    (each trace takes 10-20 s: it is the real step's ~100k operations); FLUX.1-dev also with an NF4 base."""

    def plan(arch, resolution=256, quantize="none"):
        cfg = FinetuneConfig(
            model=arch, output="unused", k=1, sample_steps=1, resolution=resolution, mixed_precision="bf16"
        )
        return predict_peak_memory(dataclasses.replace(cfg, quantize_base=quantize), reward_config=TINY_REWARD)

    runs = {arch: plan(arch) for arch in FLOW_SIZES}
    runs["fluxdev-nf4"] = plan("fluxdev", quantize="nf4")
    return runs


def test_flow_planner_models_the_quantized_base_and_the_cached_text(flow_plans):
    bf16, nf4 = flow_plans["fluxdev"], flow_plans["fluxdev-nf4"]
    # bitsandbytes NF4 (blocksize 64, fp32 absmax, no double quantization): 0.5625 bytes per Linear weight
    # against bf16's 2; everything else is unchanged.
    transformer = build_parts("fluxdev", torch.bfloat16, "meta")["transformer"]
    linear = sum(m.weight.numel() for m in transformer.modules() if type(m) is torch.nn.Linear)
    assert linear / 1e9 > 11.5  # nearly all of FLUX's weights are Linear
    saved_mib = linear * (2 - 0.5625) / 2**20
    assert bf16["weights_mib"] - nf4["weights_mib"] == pytest.approx(saved_mib, rel=0.005)
    assert nf4["peak_mib"] < bf16["peak_mib"] - 0.9 * saved_mib
    # T5-XXL (4.76B weights, 9 GiB in bf16) is not resident: its embeddings are cached off the accelerator.
    t5_mib = 4.7623e9 * 2 / 2**20
    sd35m = flow_plans["sd35m"]
    transformer_mib = FLOW_SIZES["sd35m"] * 1e9 * 2 / 2**20
    assert transformer_mib < sd35m["weights_mib"] < transformer_mib + t5_mib / 2
    assert bf16["trainable_params"] > sd35m["trainable_params"] > 0


def test_flow_planner_orders_the_models(flow_plans):
    peak = {name: p["peak_mib"] for name, p in flow_plans.items()}
    assert peak["fluxdev"] > peak["sd35l"] > peak["sd35m"]
    assert peak["fluxdev-nf4"] < peak["sd35l"]  # 11.9B at 4 bits below 8.06B at 16
    assert {p["family"] for p in flow_plans.values()} == {"sd3", "flux"}
    assert all(p["activations_mib"] > 0 for p in flow_plans.values())


FINETUNE_RECIPES = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml") if not p.stem.startswith("train_"))


@pytest.mark.parametrize("recipe", FINETUNE_RECIPES)
def test_every_finetune_recipe_loads_and_flow_recipes_carry_their_plan(recipe, tmp_path):
    cfg = build_config(FinetuneConfig, config=recipe, output=str(tmp_path))
    assert cfg.reward == "icthp"
    text = (RECIPES_DIR / f"{recipe}.yaml").read_text()
    arch = ARCH_OF_ALIAS.get(cfg.model)
    if arch and families.by_name(FAMILY_OF[arch]).flow:  # the planner's number, stated with its commit
        assert "rewardtune plan --config" in text and " GiB (commit " in text
        assert "Not yet measured on a GPU" in text


def test_tiny_prediction_is_sane_and_follows_the_knobs(tiny_sd):
    base = predict_peak_memory(tiny_cfg(tiny_sd), reward_config=TINY_REWARD)
    assert 0 < base["weights_mib"] <= base["resident_mib"] < base["peak_mib"]
    assert base["trainable_params"] > 0 and base["family"] == "sd" and base["resolution"] == 64
    all_k = predict_peak_memory(tiny_cfg(tiny_sd, k=2), reward_config=TINY_REWARD)
    no_ckpt = predict_peak_memory(tiny_cfg(tiny_sd, k=2, gradient_checkpointing=False), reward_config=TINY_REWARD)
    assert all_k["peak_mib"] > base["peak_mib"]
    assert no_ckpt["peak_mib"] > all_k["peak_mib"]
    assert all_k["resident_mib"] == base["resident_mib"]  # K changes activations, not weights


def test_fit_budget_suggests_knobs_that_lower_the_peak(tiny_sd):
    cfg = tiny_cfg(tiny_sd, k=2, gradient_checkpointing=False, optimizer="adamw8bit")
    base = predict_peak_memory(cfg, reward_config=TINY_REWARD)
    budget = (base["resident_mib"] + 0.5 * base["activations_mib"]) / 1024
    out = fit_budget(cfg, budget, reward_config=TINY_REWARD)
    assert not out["fits"]
    changes = {s["change"]: s for s in out["suggestions"]}
    # a quantized base is offered but not suggested: on this tiny UNet its fp32 layer outputs cost more than it saves
    assert set(changes) == {"--gradient-checkpointing", "--k 1", "--resolution 48"}
    assert all(s["peak_gib"] <= base["peak_gib"] for s in out["suggestions"])
    assert changes["--gradient-checkpointing"]["peak_gib"] < base["peak_gib"]
    assert any(s["fits"] for s in out["suggestions"]) or out["combined"]["changes"]


def test_local_backbone_config_is_planned_and_budget_below_the_weights_is_an_error(tiny_sd, tiny_backbone):
    cfg = tiny_cfg(tiny_sd, backbone=str(tiny_backbone))  # a user's own CLIP directory, read for its config
    assert predict_peak_memory(cfg)["weights_mib"] < 100  # not the 3.7 GiB of two ViT-H-14 towers
    with pytest.raises(UserError, match="less than the weights"):
        fit_budget(cfg, 0.001)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"k": 9}, "--k 9 is more than --sample-steps 2"),
        ({"resolution": 100}, "multiple of 8"),
        ({"model": "no/such-model-here"}, "neither a shipped architecture"),
        ({"reward": "aesthetic"}, "ViT-H-14 rewards"),
    ],
)
def test_impossible_configs_are_user_errors(tiny_sd, change, message):
    with pytest.raises(UserError, match=message):
        predict_peak_memory(dataclasses.replace(tiny_cfg(tiny_sd), **change), reward_config=TINY_REWARD)


def test_cli_full_size_sd15_is_sane(capsys):
    code = main(
        [
            "plan",
            "--model",
            "sd15",
            "--resolution",
            "512",
            "--k",
            "1",
            "--sample-steps",
            "30",
            "--mixed-precision",
            "bf16",
            "--lora-rank",
            "16",
            "--reward",
            "icthp",
            "--json",
        ]
    )
    assert code == 0
    pred = json.loads(capsys.readouterr().out)["prediction"]
    # bf16 weights alone: UNet 1.7 GB + VAE + text encoder + two ViT-H-14 towers 3.9 GB, about 5.7 GiB.
    assert 5.0 < pred["weights_mib"] / 1024 < 6.5
    assert pred["weights_mib"] < pred["peak_mib"] < 16 * 1024


def test_cli_impossible_config_exits_2_with_one_line():
    out = run_cli("plan", "--model", "sd15", "--k", "40", "--sample-steps", "30")
    assert out.returncode == 2
    assert "--k 40 is more than --sample-steps 30" in out.stderr
    assert "Traceback" not in out.stderr


# ----- one layer per stack, extended: the same numbers as tracing every layer ------------------------------------

REWARD_3_LAYERS = tiny_clip_config(
    49408, hidden=32, layers=3, heads=4, projection_dim=1024, image_size=224, patch_size=32
).to_dict()


def test_reduced_trace_gives_the_full_depth_numbers_phase_by_phase():
    """SD3.5-Medium (between its first and last joint blocks, 12 dual-attention and 10 plain ones) with a 3-layer
    ICT-HP reward, K=2 (a checkpointed gradient call and a plain one), CFG: the prediction from one layer per stack
    plus the slope traces equals tracing all 24 blocks and 3 + 3 tower layers, in every phase, to the byte."""
    cfg = FinetuneConfig(
        model="sd35m", output="unused", k=2, sample_steps=2, resolution=128, mixed_precision="bf16", reward="icthp"
    )
    reduced = predict_peak_memory(cfg, reward_config=REWARD_3_LAYERS)
    full = predict_peak_memory(cfg, reward_config=REWARD_3_LAYERS, full_depth=True)
    assert reduced["traced_layers"] == {
        "transformer.dual": [BASE_DEPTH, 12],
        "transformer.plain": [BASE_DEPTH, 10],
        "reward.vision": [BASE_DEPTH, 3],
        "reward.text": [BASE_DEPTH, 3],
    }
    assert full["traced_layers"] == {} and reduced["traces"] == 3
    for key in ("peak_mib", "weights_mib", "resident_mib", "trainable_params"):
        assert reduced[key] == full[key], key
    assert reduced["part_peaks_mib"] == full["part_peaks_mib"]
    assert set(full["part_peaks_mib"]) >= {"grad_steps", "decode", "reward", "backward:decode", "backward:denoiser"}


# ----- the command line -----------------------------------------------------------------------------------------

# Runs the CLI in a fresh process and reports which model libraries it loaded.
DRIVER = (
    "import json, sys; from rewardtune.cli import main; rc = main(sys.argv[1:]); "
    "print(json.dumps(sorted(m for m in ('diffusers', 'peft') if m in sys.modules)))"
)


def test_plan_answers_again_from_its_cache_without_loading_the_model_code(tiny_sd, tmp_path):
    """The second identical ``plan`` (CPU target) prints the first one's answer without importing diffusers or peft;
    --no-cache traces again, and so does a plan whose cache file is unreadable. The CPU target is the Python API's."""
    env = offline_env(REWARDTUNE_CACHE_DIR=str(tmp_path / "cache"))
    args = ["plan", "--model", tiny_sd, "--k", "1", "--sample-steps", "2", "--target", "cpu", "--json"]

    def plan(*extra):
        res = subprocess.run(
            [sys.executable, "-c", DRIVER, *map(str, args), *extra],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert res.returncode == 0, res.stderr[-2000:]
        *out, loaded = res.stdout.strip().splitlines()
        return json.loads("\n".join(out)), json.loads(loaded)

    first, loaded = plan()
    assert loaded == ["diffusers", "peft"]
    again, loaded = plan()
    assert again == first and loaded == []
    files = list((tmp_path / "cache" / "plan").glob("*.json"))
    assert files
    for f in files:
        f.write_text("{")
    assert plan("--no-cache") == (first, ["diffusers", "peft"])  # traced again (and would be, unreadable files)
    assert plan() == (first, ["diffusers", "peft"])
    cfg = FinetuneConfig(model=str(tiny_sd), output="unused", k=1, sample_steps=2)
    assert first["prediction"]["peak_mib"] == predict_peak_memory(cfg, target="cpu")["peak_mib"]


def test_plan_of_a_train_reward_recipe_says_what_it_is(capsys):
    assert main(["plan", "--config", "train_ict"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--config train_ict: this is a train-reward recipe" in err[0] and "'stage'" in err[0]


def test_plan_header_and_no_notices_without_news(tmp_path, tiny_backbone, library_log):
    """A FLUX model in bf16 with an NF4 base and an fp32 VAE: the header names all three; neither diffusers'
    "kept in float32: []" notice (the VAE's cast; diffusers still raises it, checked here) nor torch's rms_norm
    dtype notice (about the fake CPU tensors of the trace) reaches the user."""
    flux = save_tiny_flow_pipeline(tmp_path / "flux", "flux")
    args = ["plan", "--model", flux, "--resolution", 32, "--sample-steps", 2, "--k", 1, "--max-sequence-length", 32]
    args += ["--reward", "ict", "--backbone", tiny_backbone]
    res = run_cli(
        *args, "--mixed-precision", "bf16", "--vae-fp32", "--quantize-base", "nf4", "--no-cache", timeout=600
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "weights bf16, base nf4, VAE fp32" in res.stdout.splitlines()[0]
    assert "kept in float32" not in res.stderr and "Mismatch dtype" not in res.stderr, res.stderr[-2000:]
    plain = run_cli(*args, timeout=600)
    assert "weights fp32, VAE fp32," in plain.stdout.splitlines()[0] and "no (VAE" not in plain.stdout
    vae = AutoencoderKL(
        block_out_channels=(4,),
        norm_num_groups=4,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
    )
    with library_log() as log:
        vae.to(dtype=torch.float32)
    assert any("should be kept in float32: []" in m for m in log.messages), log.messages

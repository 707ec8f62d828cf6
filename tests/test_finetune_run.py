"""rewardtune finetune around the Trainer: resume, CLI and recipes, regulariser, evaluation and early stop,
mixed precision, non-finite losses, bad input, and a two-process accelerate run (offline, CPU)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from diffusers import DiffusionPipeline

from rewardtune.cli import main
from rewardtune.config import build_config
from rewardtune.errors import UserError
from rewardtune.finetune import FinetuneConfig, Trainer, load_lora, run_finetune
from rewardtune.finetune.models import load_pipeline
from rewardtune.finetune.prompts import load_prompts, note_long_prompts
from rewardtune.rewards import load_reward
from rewardtune.sources import load_state_dict
from rewardtune.testing.cli import run_cli


def _lora(out: Path) -> dict:
    return load_state_dict(out / "pytorch_lora_weights.safetensors")


def test_resume_continues_from_the_saved_step_and_matches_an_uninterrupted_run(
    sd_model, tmp_path, tiny_cfg, brightness
):
    first = run_finetune(tiny_cfg(sd_model, tmp_path / "a", steps=2, checkpoint_every=1), reward=brightness())
    assert first["steps"] == 2
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir()) == ["step_000001", "step_000002"]
    resumed = run_finetune(tiny_cfg(sd_model, tmp_path / "a", steps=3, resume=True), reward=brightness())
    straight = run_finetune(tiny_cfg(sd_model, tmp_path / "b", steps=3), reward=brightness())
    assert resumed["steps"] == 3 and resumed["before"] == first["before"]
    lines = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["kind"] == "train"] == [1, 2, 3]
    a, b = _lora(tmp_path / "a"), _lora(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    assert resumed["after"]["reward"] == pytest.approx(straight["after"]["reward"], abs=1e-6)


def test_regulariser_eval_reward_hook_and_early_stop(sd_model, tmp_path, tiny_cfg, brightness):
    """Training on brightness with darkness as the held-out reward: the eval reward falls, the run stops early."""
    seen = []

    def hook(step, images, prompts):
        seen.append(step)
        assert images.shape == (2, 3, 32, 32) and images.min() >= 0 and images.max() <= 1 and len(prompts) == 2
        return {"oracle": float(images.mean())}

    cfg = tiny_cfg(sd_model, tmp_path, steps=6, eval_every=1, eval_size=2, reg_weight=1.0, early_stop_drop=1e-6)
    summary = run_finetune(cfg, reward=brightness(), eval_reward=brightness(-1.0), eval_hook=hook)
    assert summary["stopped_early"] and summary["steps"] < 6
    assert seen == list(range(summary["steps"] + 1)) + [summary["steps"]]  # before, each step, after
    assert summary["before"]["oracle"] == pytest.approx(-summary["before"]["eval_reward"])
    assert summary["after"]["eval_reward"] < summary["before"]["eval_reward"]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all("oracle" in x and "eval_reward" in x for x in lines if x["kind"] == "eval")
    train = [x for x in lines if x["kind"] == "train"]
    assert train[0]["reg"] == 0 and all(x["reg"] > 0 for x in train[1:])  # LoRA = base until the first update


def test_bf16_keeps_lora_weights_fp32_and_vae_fp32_on_request(sdxl_model, tmp_path, tiny_cfg, brightness):
    trainer = Trainer(tiny_cfg(sdxl_model, tmp_path, mixed_precision="bf16", vae_fp32=True), reward=brightness())
    lora = [p for p in trainer.unet.parameters() if p.requires_grad]
    frozen = [p for p in trainer.unet.parameters() if not p.requires_grad]
    assert lora and all(p.dtype == torch.float32 for p in lora)
    assert all(p.dtype == torch.bfloat16 for p in frozen)
    assert trainer.pipe.vae.dtype == torch.float32 and trainer.pipe.text_encoder_2.dtype == torch.bfloat16
    metrics = trainer.step()
    assert not metrics["skipped"] and metrics["grad_norm"] > 0
    assert all(p.dtype == torch.float32 for p in lora)


class NaNAt(torch.nn.Module):
    """Brightness, except NaN on the calls listed (counting from 0), or always."""

    def __init__(self, calls=None):
        super().__init__()
        self.calls, self.n = calls, 0

    def forward(self, images, prompts):
        r = images.mean(dim=(1, 2, 3))
        bad = self.calls is None or self.n in self.calls
        self.n += 1
        return r * float("nan") if bad else r


def test_non_finite_loss_skips_the_step_and_many_stop_the_run(sd_model, tmp_path, capsys, tiny_cfg):
    trainer = Trainer(tiny_cfg(sd_model, tmp_path / "once"), reward=NaNAt(calls={0}))
    lora_b = [p.detach() for n, p in trainer.unet.named_parameters() if "lora_B" in n]
    first = trainer.step()
    assert first["skipped"] and trainer.skipped_steps == 1
    assert all(float(p.abs().max()) == 0 for p in lora_b)  # no update
    assert "non-finite" in capsys.readouterr().out
    second = trainer.step()
    assert not second["skipped"] and any(float(p.abs().max()) > 0 for p in lora_b)
    with pytest.raises(UserError, match="2 non-finite losses in a row"):
        run_finetune(tiny_cfg(sd_model, tmp_path / "always", max_nonfinite=2, steps=5, eval_size=2), reward=NaNAt())


def _cli(args, capsys):
    rc = main(["finetune", *map(str, args)])
    return rc, capsys.readouterr()


def test_cli_trains_on_icthp_writes_kohya_and_reruns_from_its_config(
    sd_model, released_ict, released_hp, tiny_backbone, tmp_path, capsys
):
    out = tmp_path / "run"
    args = [
        "--model",
        sd_model,
        "--reward",
        "icthp",
        "--ict",
        released_ict,
        "--hp",
        released_hp,
        "--backbone",
        tiny_backbone,
        "--eval-reward",
        "ict",
        "--prompts",
        "builtin:animals",
        "--output",
        out,
        "--steps",
        1,
        "--sample-steps",
        2,
        "--k",
        1,
        "--resolution",
        32,
        "--batch-size",
        1,
        "--eval-size",
        2,
        "--lora-rank",
        2,
        "--export",
        "kohya",
        "--no-gradient-checkpointing",
    ]
    rc, cap = _cli(args, capsys)
    assert rc == 0, cap.err
    printed = json.loads(cap.out[cap.out.index("{") :])
    monitors = {"saturation", "seed_similarity", "prompt_similarity", "hf_energy", "eval_reward_std"}
    assert printed["steps"] == 1 and set(printed["after"]) == {"reward", "eval_reward", *monitors}
    for name in (
        "pytorch_lora_weights.safetensors",
        "pytorch_lora_weights_kohya.safetensors",
        "config.yaml",
        "summary.json",
    ):
        assert (out / name).is_file()
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (
        saved["reward"] == "icthp" and saved["gradient_checkpointing"] is False and saved["ict"] == str(released_ict)
    )
    rc, cap = _cli(["--config", out / "config.yaml", "--output", tmp_path / "again"], capsys)
    assert rc == 0, cap.err
    again = yaml.safe_load((tmp_path / "again" / "config.yaml").read_text())
    assert {**again, "output": None} == {**saved, "output": None}
    before = json.loads((out / "summary.json").read_text())["before"]
    assert json.loads((tmp_path / "again" / "summary.json").read_text())["before"] == before


@pytest.mark.parametrize("recipe", ["sd15_icthp_draftk", "sd15_icthp_refl", "sdxl_icthp_draftk"])
def test_bundled_recipes_build_valid_configs(recipe, tmp_path):
    cfg = build_config(FinetuneConfig, config=recipe, output=str(tmp_path))
    assert cfg.model in ("sd15", "sdxl") and cfg.reward == "icthp"


@pytest.mark.parametrize(
    "case",
    [
        "alias",
        "empty_prompts",
        "invisible_prompts",
        "blank_prompts_flag",
        "blank_eval_prompts_flag",
        "resolution",
        "not_a_lora",
        "resume_overwrite",
        "offline_reward",
        "adamw8bit",
        "xformers",
    ],
)
def test_bad_input_gives_one_clear_line(case, sd_model, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    invisible = tmp_path / "invisible.txt"
    invisible.write_text("\ufeff\n\u200b\n \u2060 \n", encoding="utf-8")  # a byte-order mark, zero-width spaces
    (tmp_path / "notlora").mkdir()
    (tmp_path / "notlora" / "readme.txt").write_text("hi")
    base = ["--model", sd_model, "--output", tmp_path / "out", "--resolution", 32, "--sample-steps", 2]
    args, expect = {
        "alias": (["--model", "sd16", "--output", tmp_path / "out"], "'sd16' is not an alias (sd15, sd21, sdxl, "),
        "empty_prompts": (base + ["--prompts", empty], "holds no prompts"),
        "invisible_prompts": (base + ["--prompts", invisible], "holds no prompts"),
        "blank_prompts_flag": (base + ["--prompts", " "], "--prompts is empty (' ')"),
        "blank_eval_prompts_flag": (base + ["--eval-prompts", "  "], "--eval-prompts is empty ('  ')"),
        "resolution": (base + ["--resolution", 36], "--resolution must be a positive multiple of 8"),
        "not_a_lora": (base + ["--init-lora", tmp_path / "notlora"], "is not a LoRA"),
        "resume_overwrite": (base + ["--resume", "--overwrite"], "pass one of them"),
        "offline_reward": (base + ["--reward", "icthp"], "'8y/ICT' is not in the local cache"),
        "adamw8bit": (base + ["--optimizer", "adamw8bit", "--reward", "ict", "--ict", tmp_path], "needs bitsandbytes"),
        "xformers": (base + ["--attention", "xformers"], "xformers is not installed"),
    }[case]
    if case in ("adamw8bit", "xformers") and _has({"adamw8bit": "bitsandbytes", "xformers": "xformers"}[case]):
        pytest.skip(f"{case} is installed here")
    rc, cap = _cli(args, capsys)
    assert rc == 2
    last = cap.err.strip().splitlines()[-1]  # above it, at most the pipeline loading progress bar
    assert last.startswith("rewardtune finetune: error: ") and expect in last and "Traceback" not in cap.err


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def test_load_lora_refuses_a_directory_that_is_not_one(sd_model, tmp_path):
    pipe = DiffusionPipeline.from_pretrained(sd_model)
    with pytest.raises(UserError, match="is not a LoRA"):
        load_lora(pipe, tmp_path)


def test_two_processes_train_what_one_process_trains_on_the_doubled_batch(
    sd_model, released_ict, tiny_backbone, tmp_path, launch_two_processes
):
    """Data parallelism as it should be: ``accelerate launch`` starts two processes (world size 2), each trains on
    its own prompts, both hold the same LoRA after every step, and that LoRA is the one a single process trains on
    the doubled batch: the same global prompts, and the same noise (one generator for the global batch, sliced
    per process), here with eta 1 so every step draws noise too."""
    common = [
        "finetune", "--model", sd_model, "--reward", "ict", "--ict", released_ict, "--backbone", tiny_backbone,
        "--steps", 2, "--k", 2, "--sample-steps", 3, "--eta", 1, "--resolution", 32, "--eval-size", 2,
        "--lora-rank", 2, "--reg-weight", 0.1, "--log-every", 1, "--mixed-precision", "no", "--lr", 1e-3,
    ]  # fmt: skip
    two, one = tmp_path / "two", tmp_path / "one"
    res = launch_two_processes(*common, "--output", two, "--batch-size", 1, "--checkpoint-every", 1)
    assert res.returncode == 0, res.stderr[-3000:]
    run_cli(*common, "--output", one, "--batch-size", 2, check=True)
    summary = json.loads((two / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 2
    assert len(summary["lora_sha256"]) == 2 and len(set(summary["lora_sha256"])) == 1  # both processes in step

    def steps(out):
        return [x for x in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if x["kind"] == "train"]

    for two_step, one_step in zip(steps(two), steps(one), strict=True):
        (a,), (b,) = two_step["prompts"]  # one prompt on each process
        assert a != b and one_step["prompts"] == [[a, b]]
        assert two_step["reward"] == pytest.approx(one_step["reward"], abs=1e-5)
    lora_two, lora_one = _lora(two), _lora(one)
    assert lora_two.keys() == lora_one.keys()
    for key in lora_one:  # all-reduced gradients vs one batch mean: float rounding only, through two Adam steps
        torch.testing.assert_close(lora_two[key], lora_one[key], atol=1e-5, rtol=1e-4)
    assert max(float(v.abs().max()) for k, v in lora_one.items() if "lora.up" in k) > 1e-3  # it trained
    ckpt = two / "checkpoints" / "step_000002"
    assert sorted(p.name for p in ckpt.glob("random_states_*")) == [
        "random_states_0.safetensors",
        "random_states_1.safetensors",
    ]
    assert not [p for p in ckpt.iterdir() if p.suffix not in (".safetensors", ".json")]  # nothing that needs pickle


def test_prompt_files_never_yield_an_empty_prompt(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("\ufeffa red cube\n\u200b\n  a blue ball  \n\n\t\n", encoding="utf-8")
    assert load_prompts(str(f)) == ["a red cube", "a blue ball"]  # no byte-order mark in the first prompt


def test_long_prompts_are_noted_once_for_the_model_and_each_reward(
    sd_model, released_ict, tiny_backbone, tmp_path, capfd
):
    long = "a small red cube on a big blue table " * 12  # about 110 tokens
    prompts, held_out = tmp_path / "train.txt", tmp_path / "eval.txt"
    prompts.write_text(f"a cat\n{long}one\na dog\n{long}two\n")
    held_out.write_text(f"{long}three\na bird\n")
    args = [
        "--model",
        sd_model,
        "--reward",
        "ict",
        "--ict",
        released_ict,
        "--backbone",
        tiny_backbone,
        "--eval-reward",
        "clip",
        "--clip",
        tiny_backbone,
        "--prompts",
        prompts,
        "--eval-prompts",
        held_out,
        "--output",
        tmp_path / "run",
        "--steps",
        2,
        "--sample-steps",
        2,
        "--k",
        1,
        "--resolution",
        32,
        "--batch-size",
        2,
        "--eval-size",
        2,
        "--lora-rank",
        2,
        "--no-gradient-checkpointing",
    ]
    assert main(["finetune", *map(str, args)]) == 0
    err = capfd.readouterr().err
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert notes == [
        "note: 2 of 4 training prompts are longer than the diffusion model's text encoder's 77 tokens and are cut there",
        "note: 2 of 4 training prompts are longer than the CLIP text encoder's 77 tokens (reward ict) and are cut there",
        "note: 1 of 2 evaluation prompts is longer than the diffusion model's text encoder's 77 tokens and is cut there",
        "note: 1 of 2 evaluation prompts is longer than the CLIP text encoder's 77 tokens (rewards ict, clip) and is cut there",
    ], err
    assert "input was truncated" not in err  # diffusers' warning at every batch, said once above instead


def test_sdxl_counts_a_prompt_that_either_text_encoder_cuts(sdxl_model, tiny_backbone, capsys):
    pipe, _ = load_pipeline(str(sdxl_model))
    pipe.tokenizer_2.model_max_length = 40  # a second encoder that reads less: what it cuts counts too
    run = SimpleNamespace(
        pipe=pipe,
        prompts=["a cat", "red " * 50, "red " * 100, "a dog"],
        eval_reward=None,
        reward=load_reward("clip", clip=str(tiny_backbone)),
        cfg=SimpleNamespace(eval_prompts=""),
        accelerator=SimpleNamespace(is_main_process=True),
    )
    capsys.readouterr()  # the loading bars
    note_long_prompts(run, run.prompts[:2])
    assert capsys.readouterr().err.splitlines() == [
        "note: 2 of 4 training prompts are longer than the diffusion model's text encoders' 40 tokens and are cut there",
        "note: 1 of 4 training prompts is longer than the CLIP text encoder's 77 tokens (reward clip) and is cut there",
    ]

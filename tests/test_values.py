"""Bad values and divergence (issue #11, case 2 and the values / full-disk half of case 8), on tiny real models:

- a diverging run stops with one line and a non-zero exit, in both trainers (one ``--max-nonfinite`` rule);
  non-finite weights are never saved; a NaN final evaluation is not a success;
- NaN or infinite numbers, empty values, misshapen values and over-deep or alias-bomb YAML are one-line errors
  naming the option, for every command (``rewardtune.config``);
- a write that fails (disk full, read-only, forbidden) is one line naming what and where, leaves no temp file or
  staging directory, and leaves a finished run's model and ``config.yaml`` as they were.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import resource
import signal
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
import transformers.modeling_utils
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import CLIPModel

from rewardtune import sources
from rewardtune.config import build_config
from rewardtune.data.synthetic import WORDS, make_pick_high
from rewardtune.errors import UserError
from rewardtune.finetune import FinetuneConfig, Trainer, lora
from rewardtune.images import save_image
from rewardtune.reward_training import TrainRewardConfig, models, train, train_reward
from rewardtune.testing import SMALL_IMAGE_CLIP, save_tiny_clip
from rewardtune.testing.cli import one_line_error as _one_line_error
from rewardtune.testing.cli import run_cli

QUIET = dict(num_workers=0, progress=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A 32 px CLIP (patch 8, width 32, two layers) and a 16/8-triplet coloured-shapes set."""

    d = tmp_path_factory.mktemp("values_world")
    save_tiny_clip(
        d / "backbone",
        seed=0,
        words=WORDS,
        **SMALL_IMAGE_CLIP,
    )
    make_pick_high(d / "data", {"train": 16, "val": 8}, size=32, formats=("parquet",))
    return {"backbone": d / "backbone", "data": d / "data"}


def _reward_cfg(world, out: Path, **kw):
    base = dict(
        stage="ict",
        data=str(world["data"]),
        backbone=str(world["backbone"]),
        output=str(out),
        steps=2,
        batch_size=4,
        lr=1e-3,
        eval_limit=4,
        checkpoint_every=0,
        **QUIET,
    )
    base.update(kw)
    if "overwrite" in {f.name for f in dataclasses.fields(TrainRewardConfig)}:
        base.setdefault(
            "overwrite", True
        )  # where finished runs are kept unless asked (issue #11, the run-directory half)
    return TrainRewardConfig(**base)


def _reward_cli(world, out: Path, *extra) -> list:
    over = ["--overwrite"] if "overwrite" in {f.name for f in dataclasses.fields(TrainRewardConfig)} else []
    return [
        "train-reward",
        "--data",
        world["data"],
        "--backbone",
        world["backbone"],
        "--output",
        out,
        "--batch-size",
        4,
        "--num-workers",
        0,
        "--no-progress",
        *over,
        *extra,
    ]


# ----- divergence (case 2) ------------------------------------------------------------------------------------


def test_diverging_reward_training_exits_non_zero_and_writes_no_model(world, tmp_path):
    """The issue's repro: --lr 1e6 without clipping. Before: "trained", exit 0, a model 77 of 78 tensors NaN."""
    out = tmp_path / "run"
    res = run_cli(
        *_reward_cli(
            world, out, "--steps", 3, "--lr", "1e6", "--max-grad-norm", 0, "--eval-limit", 4, "--eval-every", 0
        ),
    )
    _one_line_error(
        res, "train-reward", "validation: ict scores of 4 of 4 triplets are NaN or infinite", "diverged", "--lr"
    )
    assert (
        "step 3: non-finite loss or gradient; update skipped (2 in a row)" in res.stdout
    )  # skipped and logged on the way
    assert not (out / "model.safetensors").exists() and not (out / "config.yaml").exists()
    assert not (out / ".staging").exists()


def test_reward_training_skips_non_finite_steps_and_stops_after_max_nonfinite(world, tmp_path, monkeypatch, capsys):
    """One rule as in finetune: a NaN loss skips its update and is counted; --max-nonfinite in a row stop the
    run; weights that overflowed are refused before the checkpoint is written."""

    real_loss, calls = train.Stage.loss, []

    def nan_first(self, trainee, batch):
        loss, info = real_loss(self, trainee, batch)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 1 else loss), info

    monkeypatch.setattr(train.Stage, "loss", nan_first)
    metrics = train_reward(_reward_cfg(world, tmp_path / "once", eval_split="", max_nonfinite=2))
    assert metrics["skipped_steps"] == 1 and metrics["step"] == 2
    assert "train-reward: step 1: non-finite loss or gradient; update skipped (1 in a row)" in capsys.readouterr().out
    model = load_file(tmp_path / "once" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in model.values())
    monkeypatch.setattr(train.Stage, "loss", real_loss)

    with pytest.raises(
        UserError, match=r"^train-reward: stopped: 2 non-finite losses in a row at step 3 \(--max-nonfinite 2\)"
    ):
        train_reward(
            _reward_cfg(world, tmp_path / "stop", steps=6, lr=1e6, max_grad_norm=0.0, eval_split="", max_nonfinite=2)
        )
    assert not (tmp_path / "stop" / "model.safetensors").exists()
    # an update that overflows a weight although loss and gradient were finite: refused before the checkpoint
    real_step = train.nonfinite.optimizer_step

    def overflowing_step(acc, optimizer, params, *args):
        out = real_step(acc, optimizer, params, *args)
        with torch.no_grad():
            params[0].view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(train.nonfinite, "optimizer_step", overflowing_step)
    with pytest.raises(
        UserError, match=r"^train-reward: the checkpoint at step 1: 1 weight tensors hold NaN or infinite values"
    ):
        train_reward(_reward_cfg(world, tmp_path / "inf", eval_split="", checkpoint_every=1))
    assert not list((tmp_path / "inf").glob("checkpoints/step_*"))


def test_diverging_finetune_exits_non_zero_and_publishes_no_lora(sd_model, tiny_backbone, tmp_path):
    """The issue's repro: finetune --lr 1e6 --steps 3. Before: exit 0, a LoRA of max 9.7e5, evaluation reward NaN."""
    out = tmp_path / "run"
    res = run_cli(
        "finetune",
        "--model",
        sd_model,
        "--reward",
        "clip",
        "--clip",
        tiny_backbone,
        "--output",
        out,
        "--steps",
        3,
        "--lr",
        "1e6",
        "--resolution",
        32,
        "--sample-steps",
        2,
        "--k",
        1,
        "--eval-size",
        2,
        "--batch-size",
        1,
        "--lora-rank",
        2,
        "--checkpoint-every",
        0,
        "--no-gradient-checkpointing",
    )
    _one_line_error(res, "finetune", "the evaluation after step 3 gave reward nan", "LoRA was not saved", "--lr")
    for name in ("pytorch_lora_weights.safetensors", "summary.json", "config.yaml"):
        assert not (out / name).exists(), name


def test_non_finite_lora_weights_are_never_saved(sd_model, tmp_path, tiny_cfg, brightness):
    trainer = Trainer(tiny_cfg(sd_model, tmp_path / "run"), reward=brightness())
    trainer.save_lora(tmp_path / "good")
    good = (tmp_path / "good" / lora.WEIGHT_NAME).read_bytes()
    name, param = next((n, p) for n, p in trainer.unet.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        param[0, 0] = float("inf")
    with pytest.raises(UserError, match="hold NaN or infinite values .*not saved: the training diverged"):
        trainer.save_lora(tmp_path / "good")
    assert (tmp_path / "good" / lora.WEIGHT_NAME).read_bytes() == good  # the earlier LoRA stays
    with pytest.raises(
        UserError, match=r"the LoRA for .*: 1 of \d+ tensors hold NaN or infinite values \(first: 'unet\."
    ):
        lora.save_lora(tmp_path / "direct", type(trainer.pipe), trainer.unet)  # the writer itself checks too
    assert not (tmp_path / "direct").exists()


def test_non_finite_reward_model_weights_are_never_written(world, tmp_path):
    clip = CLIPModel.from_pretrained(world["backbone"])
    state = {f"clip.{k}": v for k, v in clip.state_dict().items()}
    state["clip.text_projection.weight"] = state["clip.text_projection.weight"].clone().fill_(float("nan"))
    with pytest.raises(
        UserError, match=r"the ICT model for .*: 1 of \d+ tensors hold NaN .*'clip.text_projection.weight'"
    ):
        models.write_ict(clip, state, world["backbone"], tmp_path / "ict", official=False)
    assert not (tmp_path / "ict").exists()


# ----- numbers and recipe values (case 8) ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "recipe, message",
    [
        ("lr: .nan\n", "--lr must be a finite number, got nan"),
        ("lr: -.inf\n", "--lr must be a finite number, got -inf"),
        ("guidance_scale: nan\n", "--guidance-scale must be a finite number, got nan"),
        ("lr: 1.0e+39\n", "--lr must be a finite number, got 1e+39 (beyond float32's range"),
        ("eta:\n", "config: 'eta' in '{path}' has no value; give it one or remove the line"),
        ("lr: [0.1, 0.2]\n", "config: 'lr' must be float, got a list [0.1, 0.2]"),
        ("steps: 2.5\n", "config: 'steps' must be int (a whole number), got 2.5"),
        ("steps: .inf\n", "config: 'steps' must be int (a whole number), got inf"),
        (
            "lora_targets: [[to_q, to_k], to_v]\n",
            "config: 'lora_targets' must be a list of names or numbers (not nested",
        ),
        ("lora_targets: {to_q: 1}\n", "config: 'lora_targets' must be a list of names or numbers"),
        ("model: {id: sd15}\n", "config: 'model' must be str, got a mapping {'id': 'sd15'}"),
        ("mixed_precision: no\n", "config: 'mixed_precision' must be str, got the boolean false"),
        ("reward: 'ict:nan'\n", "reward: weight 'nan' of 'ict' is not a finite number"),
        ("eval_reward: 'ict:1,hp:inf'\n", "reward: weight 'inf' of 'hp' is not a finite number"),
        ("lora_targets: " + "[" * 9 + "to_q" + "]" * 9 + "\n", "config: '{path}' nests values deeper than 8 levels"),
        (
            "a: &a [x, x, x, x, x, x, x, x, x]\n"
            + "".join(f"{b}: &{b} [{', '.join(['*' + a] * 9)}]\n" for a, b in zip("abcdefg", "bcdefgh"))
            + "model: *h\n",
            "config: '{path}' expands to more than 10000 values through its YAML aliases",
        ),
        ("lora_targets: &x [to_q, *x]\n", "config: '{path}' holds a YAML alias inside its own anchor"),
    ],
)
def test_bad_recipe_values_are_one_line_errors_naming_the_option(recipe, message, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe)
    start = time.perf_counter()
    with pytest.raises(UserError) as info:
        build_config(FinetuneConfig, None, config=str(path), output="o")
    assert str(info.value).startswith(message.replace("{path}", str(path))) and "\n" not in str(info.value)
    assert time.perf_counter() - start < 60  # a hang guard (0.02 s here): an expanded bomb would not come back


def test_a_hundred_thousand_levels_of_yaml_are_refused_quickly(tmp_path):
    """Building a tree this deep recurses (RecursionError after seconds); the parser's events are counted first."""

    path = tmp_path / "deep.yaml"
    path.write_text("model: " + "[" * 100_000 + "]" * 100_000 + "\n")
    start = time.perf_counter()
    with pytest.raises(UserError, match="nests values deeper than 8 levels"):
        build_config(FinetuneConfig, None, config=str(path), output="o")
    assert time.perf_counter() - start < 60  # a hang guard: 0.34 s at load 2.5 on the 2-core machine


def test_values_that_are_fine_still_pass(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text(
        "steps: 1e3\nlr: 1.0e-4\nlora_targets: [to_q, to_v]\nreward: 'ict:1.0,hp:-0.5'\nmixed_precision: 'no'\n"
    )
    cfg = build_config(FinetuneConfig, None, config=str(path), output="o")
    assert (cfg.steps, cfg.lr, cfg.lora_targets, cfg.mixed_precision) == (1000, 1e-4, ["to_q", "to_v"], "no")
    hp = tmp_path / "hp.yaml"
    hp.write_text("stage: hp\nlr:\nict:\nwarmup_steps:\n")  # empty Optional values mean "the default"
    cfg = build_config(TrainRewardConfig, None, config=str(hp), data="d", output="o", ict="i")
    assert cfg.lr is None and cfg.peak_lr == 3e-6


@pytest.mark.parametrize(
    "args, command, expect",
    [
        (["finetune", "--output", "o", "--lr", "nan"], "finetune", "--lr must be a finite number, got nan"),
        (
            ["finetune", "--output", "o", "--reward", "ict:nan"],
            "finetune",
            "reward: weight 'nan' of 'ict' is not a finite number",
        ),
        (
            ["train-reward", "--data", "d", "--output", "o", "--margin", "inf"],
            "train-reward",
            "--margin must be a finite number, got inf",
        ),
        (
            ["plan", "--model", "./no-such-model", "--budget-gib", "nan"],  # refused before the model is read
            "plan",
            "--budget-gib must be a positive finite number of GiB, got nan",
        ),
    ],
)
def test_cli_non_finite_numbers_exit_2_with_one_line(args, command, expect):
    """Before: --lr nan and --reward ict:nan were accepted (the reward NaN); plan --budget-gib nan worked 99 s
    (it planned first: with a model that is not there, the error would name the model instead)."""
    _one_line_error(run_cli(*args), command, expect)


def test_cli_empty_and_nested_recipe_values_exit_2_with_one_line(tmp_path):
    empty, nested = tmp_path / "empty.yaml", tmp_path / "nested.yaml"
    empty.write_text("model: sd15\neta:\n")
    nested.write_text("lora_targets:\n  - [to_q, to_k]\n")
    _one_line_error(
        run_cli("finetune", "--config", empty, "--output", tmp_path / "o"),
        "finetune",
        f"config: 'eta' in '{empty}' has no value",
    )
    _one_line_error(
        run_cli("finetune", "--config", nested, "--output", tmp_path / "o"),
        "finetune",
        "config: 'lora_targets' must be a list of names or numbers",
    )
    assert not (tmp_path / "o").exists()


# ----- disk full, read-only paths (case 8) --------------------------------------------------------------------

WRITE_ERRORS = [
    (errno.ENOSPC, "no space left on the device"),
    (errno.EROFS, "the file system is read-only"),
    (errno.EACCES, "permission denied"),
    (errno.EDQUOT, "the disk quota is exceeded"),
]


@pytest.mark.parametrize("code, reason", WRITE_ERRORS)
def test_write_helpers_turn_os_errors_into_one_line_and_keep_the_old_file(code, reason, tmp_path, monkeypatch):
    """The low-level write fails as a full disk, a read-only file system, a forbidden directory or a used-up
    quota makes it fail. (The tests run as root, for whom chmod does not stop a write: a read-only directory is
    simulated with EROFS at the write call, as a full disk is with ENOSPC.)"""

    text, weights, image = tmp_path / "config.yaml", tmp_path / "w.safetensors", tmp_path / "grid.png"
    sources.atomic_write_text(text, "old: 1\n")
    sources.save_state_dict({"a": torch.ones(2)}, weights)
    save_image(torch.zeros(3, 8, 8), image)
    before = {p: p.read_bytes() for p in (text, weights, image)}

    def fail(path, data):
        Path(path).write_bytes(data[: len(data) // 2])  # half written, then the device gives up
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(sources, "_write_bytes", fail)
    for write, path, what in [
        (lambda: sources.atomic_write_text(text, "new: 2\n", "the config"), text, "the config"),
        (lambda: sources.save_state_dict({"a": torch.zeros(2)}, weights), weights, "weights"),
        (lambda: save_image(torch.ones(3, 8, 8), image), image, "image"),
    ]:
        with pytest.raises(UserError) as info:
            write()
        msg = str(info.value)
        assert msg.startswith(f"could not write {what} '{path}': {reason}; ") and "\n" not in msg
        assert msg.endswith("(nothing was replaced)")
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "grid.png", "w.safetensors"]  # no .tmp left


def _safetensors_full_disk(*args, **kwargs):
    """What safetensors' Rust writer raises when the disk fills up."""

    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def test_lora_and_reward_model_writes_on_a_full_disk_leave_no_staging(
    world, sd_model, tmp_path, tiny_cfg, brightness, monkeypatch
):
    trainer = Trainer(tiny_cfg(sd_model, tmp_path / "run"), reward=brightness())
    out = trainer.save_lora(tmp_path / "lora")
    old_lora = out.read_bytes()
    clip = CLIPModel.from_pretrained(world["backbone"])
    state = {f"clip.{k}": v for k, v in clip.state_dict().items()}
    models.write_ict(clip, state, world["backbone"], tmp_path / "ict", official=True)
    old_ict = {p.name: p.read_bytes() for p in (tmp_path / "ict").iterdir()}

    monkeypatch.setattr(safetensors.torch, "save_file", _safetensors_full_disk)  # diffusers' LoRA writer
    with pytest.raises(UserError, match=f"^could not write the LoRA '{out}': no space left on the device; free space"):
        trainer.save_lora(tmp_path / "lora")
    assert out.read_bytes() == old_lora and sorted(p.name for p in out.parent.iterdir()) == [lora.WEIGHT_NAME]

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", _safetensors_full_disk)  # transformers' writer
    with pytest.raises(
        UserError, match=f"^could not write the ICT model '{tmp_path / 'ict'}': no space left on the device"
    ):
        models.write_ict(clip, state, world["backbone"], tmp_path / "ict", official=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "ict").iterdir()} == old_ict  # and no .staging


def _file_size_limit(limit: int):
    def apply():  # in the child: writes past ``limit`` bytes fail with EFBIG, as a full disk fails them with ENOSPC
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_failed_model_write_over_a_finished_run_keeps_its_model_and_config(world, tmp_path):
    """A second train-reward into a finished run's directory whose model write fails (a real kernel error:
    a file size limit below the model's size, EFBIG, at the write inside safetensors): one line, exit 2; the
    finished model and its config.yaml stay as they were and no .staging is left. Before, config.yaml was
    rewritten at the start, and the failure was a traceback."""

    out = tmp_path / "run"
    train_reward(_reward_cfg(world, out, eval_split=""))
    kept = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert (out / "model.safetensors").stat().st_size > 128 * 1024 and "config.yaml" in kept
    res = run_cli(
        *_reward_cli(world, out, "--steps", 2, "--lr", "5e-4", "--eval-split", ""),
        preexec_fn=_file_size_limit(128 * 1024),
    )
    _one_line_error(res, "train-reward", "could not write the ", "file size limit")  # its checkpoint or model
    assert all((out / name).read_bytes() == kept[name] for name in ("model.safetensors", "config.yaml"))
    assert not (out / ".staging").exists()

"""ICT then HP training end to end on a tiny CLIP and a synthetic Pick-High set; two processes; kill and
resume; the output layouts the scorers read."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import CLIPModel

from rewardtune.cli import main
from rewardtune.config import build_config
from rewardtune.data import TripletDataset, collate, load_triplets
from rewardtune.data.synthetic import WORDS, make_pick_high
from rewardtune.errors import UserError
from rewardtune.images import load_image
from rewardtune.losses import ict_loss
from rewardtune.reward_training import TrainRewardConfig, evaluate_rewards, train, train_reward
from rewardtune.reward_training.models import ICTTrainee, setup_hp, setup_ict, tokenize
from rewardtune.rewards import load_reward, load_rewards
from rewardtune.rewards.clip_tower import ClipTower, embedding
from rewardtune.rewards.icthp import HPReward, ICTReward
from rewardtune.rundir import RunDir, read_state
from rewardtune.testing import SMALL_IMAGE_CLIP, save_tiny_clip
from rewardtune.testing.cli import HANG_SECONDS, cli_command, offline_env, run_cli

QUIET = dict(num_workers=0, progress=False)


def checkpoints(out: Path) -> list:
    return RunDir(out).checkpoints()


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A 32 px CLIP (patch 8, width 32, two layers, the synthetic set's words) and 64/16/32 triplets."""

    d = tmp_path_factory.mktemp("world")
    save_tiny_clip(
        d / "backbone",
        seed=0,
        words=WORDS,
        **SMALL_IMAGE_CLIP,
    )
    make_pick_high(d / "data", {"train": 64, "val": 16, "test": 32}, size=32, formats=("parquet",))
    return {"backbone": d / "backbone", "data": d / "data", "root": d}


@pytest.fixture(scope="module")
def trained(world) -> dict:
    """ICT through the Python API, then HP on it through the CLI."""
    root = world["root"]
    ict_metrics = train_reward(
        TrainRewardConfig(
            stage="ict",
            data=str(world["data"]),
            backbone=str(world["backbone"]),
            output=str(root / "ict"),
            steps=16,
            batch_size=8,
            lr=1e-3,
            eval_every=8,
            checkpoint_every=0,
            export_official=True,
            **QUIET,
        )
    )
    code = main(
        [
            "train-reward",
            "--stage",
            "hp",
            "--data",
            str(world["data"]),
            "--backbone",
            str(world["backbone"]),
            "--ict",
            str(root / "ict"),
            "--output",
            str(root / "hp"),
            "--steps",
            "48",
            "--batch-size",
            "8",
            "--lr",
            "1e-3",
            "--eval-every",
            "24",
            "--checkpoint-every",
            "0",
            "--num-workers",
            "0",
            "--no-progress",
            "--export-official",
        ]
    )
    assert code == 0
    hp_metrics = json.loads((root / "hp" / "metrics.json").read_text())
    return {"ict": root / "ict", "hp": root / "hp", "ict_metrics": ict_metrics, "hp_metrics": hp_metrics}


def _ict_batch_loss(ict_dir: Path, data: Path) -> float:
    """The paper's ICT loss of a CLIP directory on the first 16 training triplets."""

    tower = ClipTower.from_dir(ict_dir, "ICT")
    table = load_triplets(data, "train").head(16)
    batch = collate([TripletDataset(table, {"ict": tower.preprocess})[i] for i in range(16)])
    px = batch["pixels_ict"].transpose(0, 1).reshape(48, 3, 32, 32)
    tok = tower.tokenize(batch["easy_prompt"] + batch["refine_prompt"])
    with torch.no_grad():
        text, image = ICTTrainee(tower.model)(tok["input_ids"], tok["attention_mask"], px)
    return ict_loss(text[:16], text[16:], image[:16], image[16:32], image[32:], *batch["labels"].unbind(-1)).item()


def test_ict_training_lowers_the_ict_loss_and_writes_a_full_clip_dir(trained, world):
    out = trained["ict"]
    for name in (
        "model.safetensors",
        "config.json",
        "vocab.json",
        "merges.txt",
        "preprocessor_config.json",
        "pytorch_model.bin",
        "config.yaml",
        "metrics.json",
    ):
        assert (out / name).is_file(), name
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    m = trained["ict_metrics"]
    assert m["step"] == 16 and math.isfinite(m["train/loss"]) and m["global_batch"] == 8
    assert m["negatives_per_prompt"] == 3 * 7 and m["val/ict_n"] == 16
    assert _ict_batch_loss(out, world["data"]) < 0.8 * _ict_batch_loss(world["backbone"], world["data"])


def test_hp_accuracy_on_held_out_split_is_well_above_chance(trained, world):
    m = trained["hp_metrics"]
    assert m["step"] == 48 and math.isfinite(m["train/loss"]) and math.isfinite(m["train/icthp_loss"])
    rewards = load_rewards(["hp", "icthp"], ict=str(trained["ict"]), hp=str(trained["hp"]))
    table = evaluate_rewards(world["data"], "test", rewards, progress=False)
    assert table["hp"]["n"] == 32
    assert table["hp"]["avg"] >= 0.8, table
    assert table["hp"]["I2>I1"] > 0.6 and table["hp"]["I3>I2"] > 0.6, table
    assert table["icthp"]["avg"] > 0.6, table


def test_hp_output_layouts_and_what_stayed_frozen(trained, world):
    hp = trained["hp"]
    for name in (
        "hp_backbone/model.safetensors",
        "hp_backbone/config.json",
        "hp_backbone/vocab.json",
        "hp_backbone/preprocessor_config.json",
        "hp_scorer/mlp_pytorch_model.safetensors",
        "hp_backbone/pytorch_model.bin",
        "hp_scorer/mlp_pytorch_model.bin",
    ):
        assert (hp / name).is_file(), name
    head = load_file(hp / "hp_scorer" / "mlp_pytorch_model.safetensors")
    assert set(head) == {f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")}
    official = torch.load(hp / "hp_scorer" / "mlp_pytorch_model.bin", weights_only=True)
    assert all(torch.equal(official[k], head[k]) for k in head)
    before = load_file(world["backbone"] / "model.safetensors")
    after = load_file(hp / "hp_backbone" / "model.safetensors")
    same = {k for k in before if torch.equal(before[k], after[k])}
    # Text tower and both projections frozen; freeze 0.5 of (2 layers + final norm) = layer 0. As released,
    # the patch embedding below it still trains.
    assert {k for k in before if k.startswith(("text_model.", "text_projection", "visual_projection"))} <= same
    assert {k for k in before if k.startswith("vision_model.encoder.layers.0.")} <= same
    assert not any(k.startswith(("vision_model.encoder.layers.1.", "vision_model.embeddings.patch")) for k in same)


def test_freeze_options_choose_what_trains(world):
    def trainable(trainee):
        return {
            n.split(".")[1] + "." + n.split(".")[2]
            for n, p in trainee.named_parameters()
            if p.requires_grad and n.startswith("clip.")
        }

    clip = CLIPModel.from_pretrained(world["backbone"])
    hp = setup_hp(clip, 0.5, freeze_embeddings=True)
    assert all(p.requires_grad for p in hp.head.parameters())
    assert trainable(hp) == {"vision_model.encoder", "vision_model.post_layernorm"}
    assert not any(p.requires_grad for p in clip.vision_model.encoder.layers[0].parameters())
    ict = setup_ict(CLIPModel.from_pretrained(world["backbone"]), 0.0)
    assert not ict.clip.logit_scale.requires_grad
    assert sum(p.numel() for p in ict.parameters() if p.requires_grad) == sum(p.numel() for p in ict.parameters()) - 1
    ict = setup_ict(CLIPModel.from_pretrained(world["backbone"]), 1.0)
    names = {n for n, p in ict.clip.named_parameters() if p.requires_grad}
    assert {
        "text_projection.weight",
        "visual_projection.weight",
        "vision_model.embeddings.patch_embedding.weight",
    } <= names
    assert all(
        n.startswith(
            (
                "text_model.embeddings",
                "vision_model.embeddings",
                "vision_model.pre_layrnorm",
                "text_projection",
                "visual_projection",
            )
        )
        for n in names
    )


def test_outputs_score_without_a_backbone_and_match_the_official_export(trained, world, tmp_path):
    img = load_image(world["data"] / "pick_refine_img" / "test" / "00000.png")[None]
    ours = load_reward("icthp", ict=str(trained["ict"]), hp=str(trained["hp"]))  # the runs' best/
    # The released layout alone (pytorch_model.bin files), laid over the backbone as the authors load it.
    (tmp_path / "ict").mkdir()
    os.link(trained["ict"] / "best" / "pytorch_model.bin", tmp_path / "ict" / "pytorch_model.bin")
    for sub, name in (("hp_backbone", "pytorch_model.bin"), ("hp_scorer", "mlp_pytorch_model.bin")):
        (tmp_path / "hp" / sub).mkdir(parents=True)
        os.link(trained["hp"] / "best" / sub / name, tmp_path / "hp" / sub / name)
    released = load_reward(
        "icthp", ict=str(tmp_path / "ict"), hp=str(tmp_path / "hp"), backbone=str(world["backbone"])
    )
    with torch.no_grad():
        torch.testing.assert_close(ours(img, ["a red circle"]), released(img, ["a red circle"]))


def test_training_tokens_pad_to_the_longest_prompt_with_the_same_embeddings(world):
    tower = ClipTower.from_dir(world["backbone"], "backbone")
    prompts = ["a red circle", "a blue cross on a purple background"]
    short = tokenize(tower, prompts)
    assert short["input_ids"].shape[1] < 77
    with torch.no_grad():
        torch.testing.assert_close(embedding(tower.model.get_text_features(**short)), tower.encode_text(prompts))


def test_mixed_precision_accumulation_and_checkpointing_run(world, tmp_path):
    m = train_reward(
        TrainRewardConfig(
            stage="ict",
            data=str(world["data"]),
            backbone=str(world["backbone"]),
            output=str(tmp_path / "o"),
            steps=2,
            batch_size=4,
            grad_accum=2,
            mixed_precision="bf16",
            gradient_checkpointing=True,
            eval_limit=4,
            checkpoint_every=0,
            lr_schedule="cosine",
            **QUIET,
        )
    )
    assert m["step"] == 2 and math.isfinite(m["train/loss"]) and m["val/ict_n"] == 4


def test_resumed_run_matches_an_uninterrupted_one(world, tmp_path, capsys):
    """Optimizer, scheduler and data order all continue: 2 + 2 resumed steps give the 4-step weights."""
    common = dict(
        stage="ict",
        data=str(world["data"]),
        backbone=str(world["backbone"]),
        batch_size=8,
        lr=1e-3,
        lr_schedule="constant",
        warmup_steps=0,
        eval_split="",
        **QUIET,
    )
    train_reward(TrainRewardConfig(output=str(tmp_path / "a"), steps=4, checkpoint_every=0, **common))
    train_reward(TrainRewardConfig(output=str(tmp_path / "b"), steps=2, checkpoint_every=2, **common))
    ckpts = tmp_path / "b" / "checkpoints"
    assert [p.name for p in ckpts.iterdir()] == ["step_000002"]
    (ckpts / "step_000002").rename(ckpts / "step-2")  # the name train-reward gave checkpoints before 0.1
    m = train_reward(TrainRewardConfig(output=str(tmp_path / "b"), steps=4, checkpoint_every=2, resume=True, **common))
    assert (m["start_step"], m["steps_run"], m["step"]) == (2, 2, 4)
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    assert [(s, p.name) for s, p in checkpoints(tmp_path / "b")] == [(2, "step-2"), (4, "step_000004")]
    # without validation data no best/ is kept, and the run directory loads its last step, saying so
    assert not (tmp_path / "b" / "best").exists() and "best_step" not in m
    assert "no validation data: no best/ kept" in capsys.readouterr().out
    load_reward("ict", ict=str(tmp_path / "b"))
    assert "kept no best/ (it trained without validation data); using its last step's model" in capsys.readouterr().err
    with pytest.raises(UserError, match=r"holds a finished run \(4 steps\); pass --overwrite to replace it, --resume"):
        train_reward(TrainRewardConfig(output=str(tmp_path / "b"), steps=6, **common))
    again = train_reward(TrainRewardConfig(output=str(tmp_path / "b"), steps=4, resume=True, **common))
    assert (
        again["nothing_to_do"] and again["step"] == 4
    )  # a job script that always passes --resume, rerun after the end


def _cli(world, out: Path, *extra: str) -> list[str]:
    return [
        "train-reward",
        "--data",
        str(world["data"]),
        "--backbone",
        str(world["backbone"]),
        "--output",
        str(out),
        "--batch-size",
        "4",
        "--lr",
        "1e-3",
        "--num-workers",
        "0",
        "--no-progress",
        *extra,
    ]


def test_kill_and_resume_continues_from_the_saved_step(world, tmp_path):
    out = tmp_path / "run"
    args = cli_command(*_cli(world, out, "--steps", "500", "--checkpoint-every", "2", "--eval-split", ""))
    proc = subprocess.Popen(args, env=offline_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + HANG_SECONDS  # a hang guard: a checkpoint every 2 steps comes in seconds
    try:
        while not checkpoints(out) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
    finally:
        proc.kill()
        err = proc.communicate()[1].decode()
    saved = checkpoints(out)
    assert saved, err[-2000:]
    step = saved[-1][0]
    assert step < 500 and len(saved) <= 2  # killed mid-run; rotation keeps the newest two
    res = run_cli(
        *_cli(world, out, "--steps", str(step + 2), "--resume", "--checkpoint-every", "2", "--eval-split", ""),
    )
    assert res.returncode == 0, res.stderr[-2000:]
    m = json.loads((out / "metrics.json").read_text())
    assert (m["start_step"], m["steps_run"], m["step"]) == (step, 2, step + 2)
    assert f"trained ict to step {step + 2}" in res.stdout


def test_two_processes_share_ict_negatives(world, tmp_path, launch_two_processes):
    """``accelerate launch`` with two CPU processes (gloo): each sees the other's rows as negatives."""
    out = tmp_path / "ddp"
    res = launch_two_processes(*_cli(world, out, "--steps", "3", "--checkpoint-every", "3", "--eval-limit", "6"))
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["num_processes"] == 2 and m["step"] == 3 and math.isfinite(m["train/loss"])
    assert m["global_batch"] == 2 * 4 and m["negatives_per_prompt"] == 3 * (2 * 4 - 1)
    assert m["val/ict_n"] == 6  # validation gathered from both processes without duplicates
    ckpt = checkpoints(out)[-1][1]
    assert (ckpt / "random_states_0.safetensors").is_file() and (ckpt / "random_states_1.safetensors").is_file()
    assert not [p for p in ckpt.iterdir() if p.suffix not in (".safetensors", ".json")]  # nothing that needs pickle
    assert (out / "model.safetensors").is_file()
    # best/ is written by both processes together (a barrier each side of the main process's write)
    assert read_state(out / "best")["step"] == m["best_step"] and (out / "best" / "model.safetensors").is_file()
    # each process ends without the interpreter's teardown (rewardtune.cli._exit_without_finalizing): what the main
    # process printed to the pipe still arrives
    assert "trained ict to step 3" in res.stdout


def test_a_two_process_run_that_fails_exits_with_its_code_and_its_line(world, tmp_path, launch_two_processes):
    """A user error in a distributed launch: the first process to fail exits 2 with its one line on stderr (the exit
    without interpreter teardown keeps both), and the launcher fails with it (torchrun then stops the other process,
    which may not have printed its own line yet)."""
    out = tmp_path / "bad"
    res = launch_two_processes(*_cli(world, out, "--steps", "3"), "--data", str(tmp_path / "missing"))
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("rewardtune train-reward: error: ")]
    assert 1 <= len(lines) <= 2 and all(f"'{tmp_path / 'missing'}' is not a directory" in ln for ln in lines), (
        res.stderr[-2000:]
    )
    assert "exitcode  : 2 " in res.stderr  # the root cause torchrun names: our code, not a signal
    assert not (out / "metrics.json").exists()


def test_recipes_and_user_errors(world, tmp_path, capsys):
    ict = build_config(TrainRewardConfig, None, config="train_ict", data="d", output="o")
    hp = build_config(TrainRewardConfig, None, config="train_hp", data="d", output="o", ict="i")
    # the released config's schedule and batch (docs/reward_training.md): 500 DeepSpeed log-warmup steps, then
    # linear decay to 0; 32 per GPU with accelerate's gradient accumulation of 1
    for recipe in (ict, hp):
        assert (recipe.warmup, recipe.warmup_type, recipe.lr_schedule, recipe.grad_accum) == (500, "log", "linear", 1)
    assert (ict.stage, ict.peak_lr, ict.batch_size, ict.mixed_precision, ict.frozen_fraction) == (
        "ict",
        3e-5,
        32,
        "bf16",
        0.0,
    )
    assert (hp.stage, hp.peak_lr, hp.steps, hp.margin, hp.frozen_fraction) == ("hp", 3e-6, 50000, 0.3, 0.5)
    assert "CLIP-ViT-H-14" in ict.backbone == hp.backbone
    with pytest.raises(UserError, match="--stage 'ictt' is not one of ict, hp"):
        train_reward(TrainRewardConfig(stage="ictt", data="d", output="o"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage: ict\nlearning_rate: 1e-4\n")
    assert main(["train-reward", "--config", str(bad), "--data", "d", "--output", "o"]) == 2
    assert "unknown key(s)" in capsys.readouterr().err
    assert main(_cli(world, tmp_path / "x", "--stage", "hp")) == 2
    assert "needs --ict" in capsys.readouterr().err
    assert main(_cli(world, tmp_path / "x", "--batch-size", "100", "--steps", "1")) == 2
    assert "fewer than one global batch" in capsys.readouterr().err


def _logged(out: Path, tag: str) -> dict[int, float]:
    """{step: value} of a scalar the run logged to TensorBoard."""

    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    return {e.step: e.value for e in events.Scalars(tag)}


def _val_steps(out: Path) -> list[int]:
    """The steps at which validation accuracy was logged to TensorBoard."""
    return list(_logged(out, "val/ict_avg"))


def test_eval_every_zero_validates_only_before_and_after(world, tmp_path):
    common = dict(
        stage="ict",
        data=str(world["data"]),
        backbone=str(world["backbone"]),
        batch_size=4,
        lr=1e-3,
        eval_limit=4,
        checkpoint_every=0,
        **QUIET,
    )
    m = train_reward(TrainRewardConfig(output=str(tmp_path / "zero"), steps=3, eval_every=0, **common))
    assert _val_steps(tmp_path / "zero") == [0, 3] and m["val/ict_n"] == 4
    train_reward(TrainRewardConfig(output=str(tmp_path / "two"), steps=3, eval_every=2, **common))
    assert _val_steps(tmp_path / "two") == [2, 3]  # every N steps and after the last, none before


def test_deprecated_checkpoint_flags_and_keys_still_work(world, tmp_path, capsys):
    """--save-every / save_every and --keep-checkpoints / keep_checkpoints are the old names of
    --checkpoint-every / --checkpoints-keep: accepted with a warning; old and new together are an error."""
    recipe = tmp_path / "old.yaml"
    recipe.write_text("stage: ict\nkeep_checkpoints: 1\n")
    out = tmp_path / "run"
    assert (
        main(_cli(world, out, "--config", str(recipe), "--steps", "2", "--save-every", "1", "--eval-split", "")) == 0
    )
    err = capsys.readouterr().err
    assert "--save-every on the command line is deprecated; use --checkpoint-every" in err
    assert "'keep_checkpoints' in" in err and "is deprecated; use 'checkpoints_keep'" in err
    assert [(s, p.name) for s, p in checkpoints(out)] == [(2, "step_000002")]  # every step, the newest one kept
    cfg = TrainRewardConfig(**{k: v for k, v in yaml.safe_load((out / "config.yaml").read_text()).items()})
    assert (cfg.checkpoint_every, cfg.checkpoints_keep) == (1, 1)  # config.yaml speaks the new names
    assert main(_cli(world, tmp_path / "both", "--save-every", "1", "--checkpoint-every", "2")) == 2
    assert "--save-every and --checkpoint-every both given" in capsys.readouterr().err


def test_duplicated_triplets_are_noted_once_by_train_reward(world, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(world["data"], data)
    frame = pd.read_parquet(data / "train.parquet")
    pd.concat([frame, frame, frame], ignore_index=True).to_parquet(data / "train.parquet")  # each triplet three times
    out = tmp_path / "run"
    assert (
        main(
            [
                "train-reward",
                "--data",
                str(data),
                "--backbone",
                str(world["backbone"]),
                "--output",
                str(out),
                "--batch-size",
                "4",
                "--num-workers",
                "0",
                "--no-progress",
                "--steps",
                "1",
                "--eval-split",
                "",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert err.count("note: 128 of 192 triplets in split 'train'") == 1 and err.count("exact duplicates") == 1, err


# ----- best/: the best validation step beside the last -------------------------------------------------
# A learning rate too high for the tiny CLIP makes validation go up and down, so the best step is not the last.
WOBBLY = dict(batch_size=8, lr=1e-2, lr_schedule="constant", warmup_steps=0, eval_every=1, **QUIET)


def _ict_label_mse(reward, data: Path) -> float:
    """The paper's ICT label error on the 'val' split (its Parquet file read here), written out: the mean over
    triplets of the mean squared error of the easy prompt's cosines with (I1, I2, I3) to (E1, E2, 1) plus the
    refined prompt's to (R1, R2, 1), scored through a loaded reward on the image files."""
    table = pd.read_parquet(data / "val.parquet")
    images = [torch.stack([load_image(data / p) for p in table[col]]) for col in ICT_IMAGES]
    with torch.no_grad():
        easy = torch.stack([reward(im, list(table["easy_prompt"])) for im in images], -1)
        refine = torch.stack([reward(im, list(table["refine_prompt"])) for im in images], -1)
    label = {k: torch.tensor(table[k].to_numpy(), dtype=torch.float32) for k in ("E1", "E2", "R1", "R2")}
    ones = torch.ones(len(table))
    err_easy = (easy - torch.stack([label["E1"], label["E2"], ones], -1)).square().mean(-1)
    err_refine = (refine - torch.stack([label["R1"], label["R2"], ones], -1)).square().mean(-1)
    return float((err_easy + err_refine).mean())


ICT_IMAGES = ("easy_image_0", "easy_image_1", "refine_image")


def test_ict_best_is_the_lowest_validation_loss_and_the_run_directory_loads_it(world, tmp_path, capsys):
    out = tmp_path / "ict"
    common = dict(stage="ict", data=str(world["data"]), backbone=str(world["backbone"]))
    m = train_reward(
        TrainRewardConfig(output=str(out), steps=8, checkpoint_every=1, checkpoints_keep=8, **common, **WOBBLY)
    )
    logged = _logged(out, "val/ict_loss")
    assert list(logged) == list(range(1, 9))
    best = min(logged, key=logged.get)
    assert best != 8 and logged[best] < logged[8]  # the run's best step is not its last
    record = read_state(out / "best")
    assert (record["step"], record["metric"], record["mode"]) == (best, "val/ict_loss", "min")
    assert record["value"] == pytest.approx(logged[best]) and (m["best_step"], m["best_value"]) == (
        best,
        record["value"],
    )
    # best/ holds that step's weights (those of its checkpoint), the top level the last step's
    weights, kept = (
        load_file(out / "best" / "model.safetensors"),
        load_file(out / "checkpoints" / f"step_{best:06d}" / "model.safetensors"),
    )
    assert all(torch.equal(weights[k], kept[f"clip.{k}"]) for k in weights)
    last = load_file(out / "model.safetensors")
    assert not all(torch.equal(weights[k], last[k]) for k in weights)
    # --ict DIR loads best/ and says so; the metric recomputed from the files agrees with what was logged
    from_dir = load_reward("ict", ict=str(out))
    assert f"using the best validation model of the run in '{out}'" in capsys.readouterr().err
    assert _ict_label_mse(from_dir, world["data"]) == pytest.approx(logged[best], rel=1e-4)
    assert _ict_label_mse(ICTReward(ClipTower.from_dir(out, "last")), world["data"]) == pytest.approx(
        logged[8], rel=1e-4
    )


def test_hp_best_is_the_highest_icthp_accuracy_and_score_loads_it(trained, world, tmp_path):
    out = tmp_path / "hp"
    train_reward(
        TrainRewardConfig(
            stage="hp",
            data=str(world["data"]),
            backbone=str(world["backbone"]),
            ict=str(trained["ict"]),
            output=str(out),
            steps=8,
            checkpoint_every=0,
            **WOBBLY,
        )
    )
    logged = _logged(out, "val/icthp_avg")
    best = max(logged, key=logged.get)  # the first of equals, as a later tie does not replace best/
    assert logged[best] > logged[8]
    record = read_state(out / "best")
    assert (record["step"], record["metric"], record["mode"]) == (best, "val/icthp_avg", "max")
    # `rewardtune score --hp DIR` (a real subprocess) scores with best/ and says so; the last step scores otherwise
    image = world["data"] / "pick_refine_img" / "val" / "00000.png"
    res = run_cli("score", image, "--prompt", "a red circle", "--reward", "hp", "--hp", out, "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"HP checkpoint: using the best validation model of the run in '{out}'" in res.stderr
    for sub in ("hp_backbone", "hp_scorer"):  # the last step alone
        shutil.copytree(out / sub, tmp_path / "last" / sub)
    with torch.no_grad():
        best_score, last_score = (
            HPReward.load(hp=str(d))(load_image(image)[None], [""]).item() for d in (out / "best", tmp_path / "last")
        )
    assert (
        json.loads(res.stdout)[0]["hp"] == pytest.approx(best_score, abs=1e-6) and abs(best_score - last_score) > 1e-4
    )


def test_resume_keeps_best_consistent_with_the_checkpoint(world, tmp_path, monkeypatch, capsys):
    """A run killed after best/ moved past its last checkpoint resumes with the checkpoint's best/ and ends
    with the uninterrupted run's best."""
    common = dict(stage="ict", data=str(world["data"]), backbone=str(world["backbone"]), steps=6, **WOBBLY)
    train_reward(TrainRewardConfig(output=str(tmp_path / "a"), checkpoint_every=0, **common))
    whole = read_state(tmp_path / "a" / "best")
    real = train.Run._checkpoint

    def killed_at_6(run, step):
        if step == 6:
            raise KeyboardInterrupt("killed as it was about to save step 6")
        real(run, step)

    monkeypatch.setattr(train.Run, "_checkpoint", killed_at_6)
    out = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        train_reward(TrainRewardConfig(output=str(out), checkpoint_every=3, **common))
    monkeypatch.undo()
    recorded = read_state(out / "checkpoints" / "step_000003")["best"]
    assert recorded["step"] <= 3 < read_state(out / "best")["step"]  # best/ moved on after the last checkpoint
    capsys.readouterr()
    train_reward(TrainRewardConfig(output=str(out), checkpoint_every=3, resume=True, **common))
    assert f"best/ restored to the checkpoint's best (step {recorded['step']})" in capsys.readouterr().out
    again = read_state(out / "best")
    assert again["step"] == whole["step"] and again["value"] == pytest.approx(whole["value"], rel=1e-5)
    a, b = load_file(tmp_path / "a" / "best" / "model.safetensors"), load_file(out / "best" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    assert not (out / ".best.prev").exists()


def _deepspeed_warmup_decay(i: int, total: int, warmup: int, kind: str) -> float:
    """DeepSpeed WarmupDecayLR's multiplier of warmup_max_lr at ``last_batch_iteration`` i with warmup_min_lr 0,
    as deepspeed/runtime/lr_schedules.py (v0.8.3) defines it: warmup over max(2, warmup) steps, log-shaped
    ln(i+1)/ln(warmup) (its default) or linear i/warmup, then (total - i) / (total - warmup), not below 0."""
    warmup = max(2, warmup)
    if i < warmup:
        return math.log(i + 1) / math.log(warmup) if kind == "log" else i / warmup
    return max(0.0, (total - i) / max(1.0, total - warmup))


def test_warmup_follows_deepspeed_warmup_decay_in_optimizer_steps(world, tmp_path):
    for kind in ("log", "linear"):
        factor = train.make_schedule(TrainRewardConfig(steps=40, warmup_steps=10, warmup_type=kind))
        for step in (0, 1, 2, 5, 9, 10, 11, 25, 39):
            want = _deepspeed_warmup_decay(step, 40, 10, kind)
            if kind == "log" or step >= 10:
                assert factor(step) == pytest.approx(want, abs=1e-12), (kind, step)
            else:  # ours starts one increment above 0 (no update at lr 0) and reaches the peak at the same step
                assert 0 < factor(step) - want <= 1 / 11 and factor(step) < factor(step + 1), (kind, step)
    # a real run applies it per optimizer step, not per micro-batch (2 per step here)
    out = tmp_path / "run"
    m = train_reward(
        TrainRewardConfig(
            stage="ict",
            data=str(world["data"]),
            backbone=str(world["backbone"]),
            output=str(out),
            steps=6,
            batch_size=4,
            grad_accum=2,
            lr=1e-3,
            warmup_steps=4,
            warmup_type="log",
            log_every=1,
            eval_split="",
            checkpoint_every=0,
            **QUIET,
        )
    )
    assert m["step"] == 6
    used = _logged(out, "train/lr")  # at step n, the rate of its update: DeepSpeed's multiplier at index n - 1
    assert list(used) == list(range(1, 7))
    for n, lr in used.items():
        assert lr == pytest.approx(1e-3 * _deepspeed_warmup_decay(n - 1, 6, 4, "log"), abs=1e-9), n

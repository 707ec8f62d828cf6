"""The demo's model builder end to end at toy sizes, and the preference set through ``rewardtune train-reward``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from rewardtune.demo import world
from rewardtune.demo.build import UNET_ALWAYS_NAMED, calibrate_hp, caption, train_pickscore
from rewardtune.demo.data import write_preference_set
from rewardtune.reward_training import evaluate_rewards
from rewardtune.rewards import load_reward, load_rewards
from rewardtune.testing import SMALL_IMAGE_CLIP, save_tiny_clip
from rewardtune.testing.cli import HANG_SECONDS, offline_env

ENV = offline_env()
ROOT = Path(__file__).resolve().parent.parent


def world_tiny_clip(directory: Path) -> None:
    """A random tiny CLIP over the world's words, at the world's image size."""
    save_tiny_clip(
        directory,
        seed=0,
        words=world.world_words(),
        **SMALL_IMAGE_CLIP,
    )


def run(*args, timeout=HANG_SECONDS) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=ENV, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """Every part of the bundle, from scratch, with a few steps each (the real script as a subprocess)."""
    d = tmp_path_factory.mktemp("build")
    done = run(
        "scripts/build_demo_models.py",
        "--output",
        str(d / "models"),
        "--work",
        str(d / "work"),
        "--pool",
        "96",
        "--clip-steps",
        "3",
        "--heldout-steps",
        "3",
        "--vae-steps",
        "3",
        "--unet-steps",
        "3",
        "--ict-steps",
        "2",
        "--hp-steps",
        "2",
        "--pickscore-steps",
        "2",
        "--triplets",
        "40",
        "--val-triplets",
        "12",
        "--test-triplets",
        "4",
        "--threads",
        "1",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return d / "models"


def test_build_writes_every_part_with_timings(built):
    for f in (
        "pipeline/model_index.json",
        "pipeline/unet/diffusion_pytorch_model.safetensors",
        "ict/model.safetensors",
        "hp/hp_backbone/model.safetensors",
        "hp/hp_scorer/mlp_pytorch_model.safetensors",
        "heldout_clip/model.safetensors",
        "clip/model.safetensors",
        "pickscore/model.safetensors",
    ):
        assert (built / f).is_file(), f
    record = json.loads((built / "build.json").read_text())
    assert set(record["seconds"]) == {
        "render_pool",
        "world_clip",
        "heldout_clip",
        "vae",
        "unet",
        "preference_set",
        "rewards",
        "baselines",
    }
    for name in ("clip", "pickscore"):  # the comparison's baselines, measured on the validation split
        assert record["baseline_metrics"][name][f"val/{name}_n"] == 12
        assert 0 <= record["baseline_metrics"][name][f"val/{name}_avg"] <= 1
    assert record["total_seconds"] == pytest.approx(sum(record["seconds"].values()), abs=0.5)
    assert record["config"]["unet_steps"] == 3
    # nothing but safetensors weights (no pickles) in the bundle
    assert not [p for p in built.rglob("*") if p.suffix in (".bin", ".pt", ".pkl", ".ckpt")]


def test_built_models_load_with_the_public_loaders(built):
    pipe = StableDiffusionPipeline.from_pretrained(
        str(built / "pipeline"), safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        ["a red circle"], num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0)
    ).images
    assert images.shape == (1, 3, world.IMAGE_SIZE, world.IMAGE_SIZE)
    sources = dict(ict=str(built / "ict"), hp=str(built / "hp"), clip=str(built / "clip"))
    for name in ("icthp", "pickscore", "clip"):
        reward = load_reward(name, pickscore=str(built / "pickscore"), **sources)
        assert torch.isfinite(reward(images, ["a red circle"])).all(), name


def test_hp_calibration_sets_the_reference_images_score(built, tmp_path):
    shutil.copytree(built / "hp", tmp_path / "hp")
    data = built.parent / "work" / "preference_set"
    offset = calibrate_hp(tmp_path / "hp", data, target=0.8)
    frame = pd.read_parquet(data / "val.parquet")
    x = torch.from_numpy(
        np.stack([np.asarray(Image.open(data / p).convert("RGB"), np.float32) / 255 for p in frame["refine_image"]])
    ).permute(0, 3, 1, 2)
    with torch.no_grad():
        after = load_reward("hp", hp=str(tmp_path / "hp")).logits(x).flatten()
        before = load_reward("hp", hp=str(built / "hp")).logits(x).flatten()
    assert torch.sigmoid(after.mean()) == pytest.approx(0.8, abs=1e-4)
    assert torch.allclose(after - before, torch.full_like(after, offset), atol=1e-4)  # a shift: rankings unchanged


def test_build_names_an_unknown_part(tmp_path):
    done = run("scripts/build_demo_models.py", "--output", str(tmp_path / "m"), "--only", "vea")
    assert done.returncode == 2 and "vea" in done.stderr and "Traceback" not in done.stderr


def test_train_reward_accepts_the_demo_preference_set(tmp_path):
    """``rewardtune data check`` and both ``train-reward`` stages read the generator's set (rendered images only)."""

    write_preference_set(tmp_path / "set", {"train": 16, "val": 8}, seed=2)
    world_tiny_clip(tmp_path / "clip")
    check = run("-m", "rewardtune.cli", "data", "check", str(tmp_path / "set"), "--split", "train")
    assert check.returncode == 0, check.stderr[-2000:]
    common = [
        "--data",
        str(tmp_path / "set"),
        "--backbone",
        str(tmp_path / "clip"),
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--num-workers",
        "0",
        "--save-every",
        "0",
        "--no-progress",
    ]
    ict = run("-m", "rewardtune.cli", "train-reward", "--stage", "ict", "--output", str(tmp_path / "ict"), *common)
    assert ict.returncode == 0, ict.stderr[-2000:]
    hp = run(
        "-m",
        "rewardtune.cli",
        "train-reward",
        "--stage",
        "hp",
        "--ict",
        str(tmp_path / "ict"),
        "--output",
        str(tmp_path / "hp"),
        *common,
    )
    assert hp.returncode == 0, hp.stderr[-2000:]
    metrics = json.loads((tmp_path / "hp" / "metrics.json").read_text())
    assert metrics["step"] == 2 and 0 <= metrics["val/icthp_avg"] <= 1


def test_pickscore_recipe_learns_the_preference_pairs(tmp_path):
    """The baselines' PickScore-style fine-tuning ranks the training pairs' winners above their losers better
    than the CLIP it starts from (in-sample: what the pairwise loss optimises)."""
    write_preference_set(tmp_path / "set", {"train": 32}, seed=3)
    world_tiny_clip(tmp_path / "clip")
    torch.set_num_threads(1)
    train_pickscore(tmp_path / "ps", tmp_path / "set", tmp_path / "clip", steps=40, seed=0, batch=16, lr=2e-3)
    rewards = load_rewards(["clip", "pickscore"], clip=str(tmp_path / "clip"), pickscore=str(tmp_path / "ps"))
    table = evaluate_rewards(tmp_path / "set", "train", rewards, batch_size=32, progress=False)
    assert table["pickscore"]["I2>I1"] >= 0.9 > table["clip"]["I2>I1"], table


def test_partial_rebuild_keeps_the_full_builds_record(built, tmp_path):
    """``--only``: the part is rebuilt, and build.json keeps the full build's settings and timings, with the
    partial run recorded beside them."""
    shutil.copytree(built, tmp_path / "models")
    before = json.loads((built / "build.json").read_text())
    done = run(
        "scripts/build_demo_models.py",
        "--output",
        str(tmp_path / "models"),
        "--work",
        str(built.parent / "work"),
        "--only",
        "baselines",
        "--pickscore-steps",
        "3",
        "--threads",
        "1",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / "models" / "build.json").read_text())
    assert {k: record[k] for k in ("config", "seconds", "total_seconds")} == {
        k: before[k] for k in ("config", "seconds", "total_seconds")
    }
    (partial,) = record["partial_builds"]
    assert partial["config"]["only"] == ["baselines"] and partial["config"]["pickscore_steps"] == 3
    assert set(partial["seconds"]) == {"baselines"} and partial["total_seconds"] == partial["seconds"]["baselines"]
    assert record["baseline_metrics"]["pickscore"]["val/pickscore_n"] == 12


def test_generator_captions_always_name_the_shape_and_the_position():
    rng = np.random.default_rng(0)
    scenes = [world.random_scene(rng) for _ in range(200)]
    named = [world.parse_prompt(caption(s, rng, noise=0.25, always=UNET_ALWAYS_NAMED)) for s in scenes]
    assert all("shape" in n and "position" in n for n in named)
    # the other attributes are named sometimes, and a named attribute is sometimes wrong, as in web captions
    assert 0.5 < np.mean(["colour" in n for n in named]) < 0.9
    wrong = np.mean([n["position"] != s.position for n, s in zip(named, scenes)])
    assert 0.15 < wrong < 0.35

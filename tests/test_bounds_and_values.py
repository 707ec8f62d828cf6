"""Issue #21's minor cases, each once a traceback or a silent wrong result: sizes that cannot fit refused before
any weights load, oversized and extreme images, seeds and eta out of range, prompts split where they should be,
YAML 1.1's surprises in recipes, strict JSON, and the pieces of the clean stop and the lock that the process tests
(test_run_safety.py) reach only through timing."""

from __future__ import annotations

import json
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from rewardtune import images, jsonio, preflight, stops
from rewardtune.cli import main
from rewardtune.config import build_config, load_yaml
from rewardtune.data.synthetic import make_pick_high
from rewardtune.errors import UserError
from rewardtune.finetune import FinetuneConfig
from rewardtune.finetune.prompts import load_prompts
from rewardtune.reward_training import TrainRewardConfig
from rewardtune.rewards.clip_tower import ClipPreprocess
from rewardtune.rundir import RunDir


def _err(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) >= 1 and "Traceback" not in "\n".join(lines)
    return lines[-1]


# ----- bounds before cost ---------------------------------------------------------------------------------------
def _finetune(model, out, *extra) -> list[str]:
    return ["finetune", "--model", str(model), "--output", str(out), "--steps", "1", *map(str, extra)]


def test_sizes_that_cannot_fit_are_refused_before_the_model_loads(sd_model, tmp_path, capsys, monkeypatch):
    """--resolution 100000 loaded the model and took 18 GB before the kernel killed it. The floor: three
    full-resolution maps of the VAE decoder's first block per image (the tiny VAE's width below)."""
    width = min(json.loads((sd_model / "vae" / "config.json").read_text())["block_out_channels"])
    monkeypatch.setattr(preflight, "available_bytes", lambda device: (8 * 2**30, "available on this host"))
    loaded = []
    monkeypatch.setattr("rewardtune.finetune.models.pipeline_class", lambda family: loaded.append(family))
    assert main(_finetune(sd_model, tmp_path / "a", "--resolution", 100000, "--mixed-precision", "no")) == 2
    need = 3 * width * 100000**2 * 4 / 2**30
    assert _err(capsys) == (
        f"rewardtune finetune: error: --resolution 100000 with --batch-size 1 needs at least {need:,.1f} GiB for the "
        "VAE decode alone, and 8.0 GiB is available on this host; lower --resolution or --batch-size "
        "(`rewardtune plan` predicts the whole step), or pass --force to run anyway"
    )
    assert main(_finetune(sd_model, tmp_path / "a", "--resolution", 64, "--batch-size", 10**6)) == 2
    assert "--resolution 64 with --batch-size 1000000 needs at least" in _err(capsys)
    assert not loaded and not (tmp_path / "a").exists()  # refused before the pipeline class was even looked up
    monkeypatch.undo()
    # --force goes past the check (here, to the model's own resolution rule: a tiny UNet)
    assert main(_finetune(sd_model, tmp_path / "b", "--resolution", 8, "--force")) == 2
    assert "--resolution 8 is too small for this model" in _err(capsys)


def test_sd3_position_limit_is_read_from_the_config_before_weights(tmp_path, capsys):
    """A directory with SD3's configs and no weights at all: the refusal comes from the configs alone."""
    model = tmp_path / "sd3"
    for rel, data in {
        "model_index.json": {"_class_name": "StableDiffusion3Pipeline"},
        "transformer/config.json": {"pos_embed_max_size": 192, "patch_size": 2},
        "vae/config.json": {"block_out_channels": [128, 256, 512, 512]},
    }.items():
        (model / rel).parent.mkdir(parents=True, exist_ok=True)
        (model / rel).write_text(json.dumps(data))
    assert preflight.positional_limit(model, "sd3") == 192 * 2 * 8 == 3072
    assert main(_finetune(model, tmp_path / "out", "--resolution", 4096, "--force")) == 2
    assert _err(capsys).endswith(
        "--resolution 4096 is larger than this model's position embedding allows (its transformer's "
        "pos_embed_max_size); use at most 3072"
    )


def test_train_reward_batch_that_cannot_fit_is_refused(tiny_backbone, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(preflight, "available_bytes", lambda device: (2**30, "available on this host"))
    vision = json.loads((tiny_backbone / "config.json").read_text())["vision_config"]
    per_image = ((vision["image_size"] // vision["patch_size"]) ** 2 + 1) * vision["hidden_size"]
    per_image *= vision["num_hidden_layers"]
    assert preflight.tower_floor_bytes(tiny_backbone, 3, "no") == 3 * per_image * 4
    make_pick_high(tmp_path / "d", {"train": 4}, size=32, formats=("parquet",))
    args = [
        "train-reward",
        "--data",
        str(tmp_path / "d"),
        "--backbone",
        str(tiny_backbone),
        "--output",
        str(tmp_path / "o"),
    ]
    assert main([*args, "--batch-size", str(10**7)]) == 2
    assert "--batch-size 10000000 (30000000 images) needs at least" in _err(capsys)
    assert not (tmp_path / "o").exists()


# ----- images ----------------------------------------------------------------------------------------------------
def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width`` x ``height`` (a decompression bomb is such a file, with its data)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )
    return path


def test_oversized_images_are_one_line_errors_from_the_header(tmp_path, capsys):
    bomb = _png_header_only(tmp_path / "bomb.png", 20000, 20000)
    with pytest.raises(UserError, match=r"has 400 million pixels, over the limit of 179 million pixels \(a possible"):
        images.load_image(bomb)
    assert main(["score", str(bomb), "--prompt", "a cat", "--reward", "clip", "--clip", str(tmp_path)]) == 2
    assert "image '" in _err(capsys)


def test_large_images_are_reduced_on_load(tmp_path, monkeypatch):
    monkeypatch.setattr(images, "KEEP_SIDE", 16)
    arr = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "big.png")
    loaded = images.load_image(tmp_path / "big.png")
    assert tuple(loaded.shape) == (3, 20, 30)  # 40 // 16 = 2: halved, the shorter side stays >= 16
    expect = arr.reshape(20, 2, 30, 2, 3).astype(np.float64).mean(axis=(1, 3))  # a 2 x 2 box average
    assert np.abs(loaded.permute(1, 2, 0).numpy() * 255 - expect).max() <= 1.0


def test_extreme_aspect_ratios_are_cropped_before_clip_resizes():
    """A 100000 x 1 image was resized to 22400000 x 224 on the way to the centre crop (60 GB). Over 4:1 the
    centre is cropped to 4:1 first; the centre square CLIP keeps is what the full resize gives."""
    pre = ClipPreprocess(224)
    out = pre(torch.rand(1, 3, 1, 100000))
    assert tuple(out.shape) == (1, 3, 224, 224)
    noise = torch.rand(1, 3, 6, 80, generator=torch.Generator().manual_seed(0))  # a smooth 13:1 picture
    image = F.interpolate(noise, size=(30, 400), mode="bilinear", align_corners=False)
    full = F.interpolate(image, size=(224, round(400 * 224 / 30)), mode="bicubic", antialias=True, align_corners=False)
    left = (full.shape[-1] - 224) // 2
    full = (full[..., left : left + 224] - pre.mean) / pre.std
    # the same picture: cropping first moves CLIP's sampling grid by less than a source pixel
    assert (pre(image) - full).abs().mean() < 0.02
    square = torch.rand(1, 3, 300, 300)
    plain = F.interpolate(square, size=(224, 224), mode="bicubic", antialias=True, align_corners=False)
    assert torch.equal(pre(square), (plain - pre.mean) / pre.std)  # up to 4:1 nothing changes


# ----- values ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, expect",
    [
        (
            ["--seed", "99999999999999999999999"],
            "--seed must be in [0, 9223372036854775807], got 99999999999999999999999",
        ),
        (["--seed", "-1"], "--seed must be in [0, 9223372036854775807], got -1"),
        (["--eta", "5"], "--eta must be in [0, 1], got 5.0"),
    ],
)
def test_seed_and_eta_ranges_are_checked_before_anything_loads(args, expect, tmp_path, capsys):
    assert main(["finetune", "--model", str(tmp_path / "none"), "--output", str(tmp_path / "o"), *args]) == 2
    assert _err(capsys) == f"rewardtune finetune: error: {expect}"
    with pytest.raises(UserError, match=r"--seed must be in \[0, 4294967295\], got 4294967296"):
        TrainRewardConfig(data="d", output="o", seed=2**32).validate()


def test_prompts_split_on_newlines_only(tmp_path):
    path = tmp_path / "prompts.txt"
    odd = ["a cat\x85on a mat", "a dog\u2028in a field", "a form\ffeed", "a file\x1cseparator", "a\u2029b"]
    path.write_bytes(("\r\n".join(odd) + "\r\n\nlast one\n").encode("utf-8"))
    assert load_prompts(str(path)) == [*odd, "last one"]


@pytest.mark.parametrize(
    "text, expect",
    [
        ("steps: 010\n", "line 1: '010' reads as an octal number in YAML 1.1 (8)"),
        ("lr: 0.1\nsteps: 1:30\n", "line 2: '1:30' reads as a base-60 number in YAML 1.1 (90)"),
        ("steps: 10\nlr: 0.1\nsteps: 20\n", "line 3: 'steps' is given twice (lines 1 and 3); keep one"),
    ],
)
def test_recipes_refuse_yaml_1_1_surprises(text, expect, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as info:
        build_config(FinetuneConfig, None, config=str(path), output="o")
    assert str(info.value).startswith(f"config: '{path}' {expect}")
    path.write_text("steps: '010'\nlr: 1.0e-4\nseed: 0x10\neta: 0\nmixed_precision: 'no'\n")  # what 1.2 reads alike
    assert load_yaml(path) == {"steps": "010", "lr": 1e-4, "seed": 16, "eta": 0, "mixed_precision": "no"}
    path.write_text("mixed_precision: no\n")  # the existing no/off check stays
    with pytest.raises(UserError, match="got the boolean false"):
        build_config(FinetuneConfig, None, config=str(path), output="o")


def test_json_outputs_are_strict(tmp_path):
    text = jsonio.dumps({"before": {"reward": float("nan"), "ok": 1.0}, "after": [float("inf")]})
    data = jsonio.loads(text)
    assert data == {"before": {"reward": None, "ok": 1.0}, "after": [None], "nonfinite": ["before.reward", "after[0]"]}
    with pytest.raises(ValueError, match="NaN is not JSON"):
        jsonio.loads('{"reward": NaN}')
    run = RunDir(tmp_path)
    run.write_json("summary.json", {"x": -math.inf})
    assert json.loads((tmp_path / "summary.json").read_text(), parse_constant=lambda c: 1 / 0) == {
        "x": None,
        "nonfinite": ["x"],
    }


# ----- the stop and the lock, without the timing of real signals ---------------------------------------------
def test_a_stop_says_whether_a_checkpoint_was_written(tmp_path):
    run = RunDir(tmp_path / "out", command="finetune")
    written = []
    with pytest.raises(stops.Stopped) as info:
        run.stop(15, 7, 100, lambda: written.append(7))
    assert written == [7] and info.value.exit_code == 143
    assert str(info.value) == (
        f"stopped by SIGTERM after step 7 of 100; checkpoint '{tmp_path / 'out' / 'checkpoints' / 'step_000007'}' "
        "written: run the same command with --resume to continue"
    )
    with pytest.raises(stops.Stopped) as info:
        run.stop(2, 3, 100, None)
    assert info.value.exit_code == 130 and str(info.value) == (
        "stopped by SIGINT (Ctrl-C) after step 3 of 100; no checkpoint written (--checkpoint-every and "
        "--checkpoint-minutes are 0): a new run starts from step 0"
    )


def test_the_lock_notices_its_file_or_directory_replaced(tmp_path):
    root = tmp_path / "out"
    run = RunDir(root, command="finetune")
    with run.lock() as lock:
        assert lock.problem() is None and run.interruption() == 0
        (root / ".rewardtune.lock").unlink()
        (root / ".rewardtune.lock").write_text("{}")  # another run's lock file now
        assert "its lock file" in lock.problem() and "was removed or replaced" in lock.problem()
        assert run.interruption() != 0
        with pytest.raises(UserError, match="stopped after step 4 without writing more"):
            run.stop(run.interruption(), 4, 10, None)
    assert (root / ".rewardtune.lock").read_text() == "{}"  # not ours: left where it is
    (root / ".rewardtune.lock").unlink()
    with run.lock() as lock:
        root.rename(tmp_path / "moved")
        root.mkdir()
        assert f"--output '{root}' was removed or replaced" in lock.problem()

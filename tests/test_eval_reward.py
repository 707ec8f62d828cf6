"""Triplet accuracy as in the paper's table: ties are wrong, icthp ranks by ICT x softmax(HP) over the
triplet, any registry reward can be compared, and the CLI's --json prints only the table."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from transformers import CLIPModel

from rewardtune.cli import main
from rewardtune.data import load_triplets
from rewardtune.data.synthetic import WORDS, make_pick_high
from rewardtune.errors import UserError
from rewardtune.images import load_image
from rewardtune.reward_training import evaluate_rewards, triplet_accuracy
from rewardtune.rewards import load_rewards
from rewardtune.rewards.icthp import HPHead
from rewardtune.testing import SMALL_IMAGE_CLIP, perturbed_state_dict, save_tiny_clip

KEYS = {"I2>I1", "I3>I2", "I3>I1", "avg", "n"}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A 32 px CLIP, ICT and HP in the released layouts over it, and 16 test triplets (one image 40x48)."""

    d = tmp_path_factory.mktemp("evalworld")
    save_tiny_clip(
        d / "backbone",
        seed=0,
        words=WORDS,
        **SMALL_IMAGE_CLIP,
    )
    base = CLIPModel.from_pretrained(d / "backbone")
    (d / "ict").mkdir()
    torch.save(perturbed_state_dict(base, seed=1, scale=0.3), d / "ict" / "pytorch_model.bin")
    for sub in ("hp_backbone", "hp_scorer"):
        (d / "hp" / sub).mkdir(parents=True)
    torch.save(perturbed_state_dict(base, seed=2, scale=0.3), d / "hp" / "hp_backbone" / "pytorch_model.bin")
    torch.manual_seed(3)
    head = HPHead(32)
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.3)
    torch.save(head.state_dict(), d / "hp" / "hp_scorer" / "mlp_pytorch_model.bin")
    make_pick_high(d / "data", {"test": 16}, size=32, seed=5, formats=("pickle", "parquet"))
    odd = d / "data" / pd.read_parquet(d / "data" / "test.parquet").loc[0, "refine_image"]
    Image.fromarray((np.random.default_rng(0).random((40, 48, 3)) * 255).astype("uint8")).save(odd)
    return {"root": d, "backbone": d / "backbone", "ict": d / "ict", "hp": d / "hp", "data": d / "data"}


def test_ties_and_nans_count_as_wrong():
    scores = torch.tensor(
        [[0.0, 1.0, 2.0], [1.0, 1.0, 1.0], [2.0, 1.0, 0.0], [0.0, 1.0, 1.0], [float("nan"), 1.0, 2.0]]
    )
    acc = triplet_accuracy(scores)
    # I2>I1: right on rows 0 and 3 (row 1 ties, row 4 has a NaN); I3>I2: rows 0 and 4 (row 3 ties); I3>I1: rows 0, 3
    assert (acc["I2>I1"], acc["I3>I2"], acc["I3>I1"], acc["n"]) == (0.4, 0.4, 0.4, 5)
    assert acc["avg"] == pytest.approx(0.4)
    assert triplet_accuracy(torch.tensor([[0.0, 0.0, 0.0]]))["avg"] == 0.0


@pytest.fixture(scope="module")
def by_hand(world):
    """Per-triplet scores computed image by image, as a reader of the paper would."""

    r = load_rewards(
        ["ict", "hp", "clip"],
        ict=str(world["ict"]),
        hp=str(world["hp"]),
        backbone=str(world["backbone"]),
        clip=str(world["backbone"]),
    )
    table = load_triplets(world["data"], "test")
    rows = {"ict": [], "hp": [], "clip": [], "icthp": []}
    with torch.no_grad():
        for prompt, paths in zip(table.easy_prompt, table.images):
            ims = [load_image(p)[None] for p in paths]
            ict = [r["ict"](im, [prompt]).item() for im in ims]
            logits = [r["hp"].logits(im).item() for im in ims]
            soft = [math.exp(v) / sum(math.exp(u) for u in logits) for v in logits]
            rows["ict"].append(ict)
            rows["hp"].append([r["hp"](im, [prompt]).item() for im in ims])
            rows["clip"].append([r["clip"](im, [prompt]).item() for im in ims])
            rows["icthp"].append([c * s for c, s in zip(ict, soft)])
    return {k: triplet_accuracy(torch.tensor(v)) for k, v in rows.items()}


def test_every_reward_matches_a_by_hand_ranking(world, by_hand):
    rewards = load_rewards(
        ["ict", "hp", "icthp", "clip"],
        ict=str(world["ict"]),
        hp=str(world["hp"]),
        backbone=str(world["backbone"]),
        clip=str(world["backbone"]),
    )
    got = evaluate_rewards(world["data"], "test", rewards, batch_size=5, progress=False)
    expected = by_hand
    assert list(got) == ["ict", "hp", "icthp", "clip"]
    for name, row in got.items():
        assert set(row) == KEYS and row["n"] == 16
        for k in KEYS - {"n"}:
            assert row[k] == pytest.approx(expected[name][k], abs=1e-9), (name, k)
    assert len({json.dumps(row, sort_keys=True) for row in got.values()}) > 1  # the rewards do disagree here


def test_cli_json_prints_only_the_table(world, by_hand, capsys):
    args = [
        "eval-reward",
        "--data",
        str(world["data"]),
        "--split",
        "test",
        "--reward",
        "ict,icthp,clip",
        "--ict",
        str(world["ict"]),
        "--hp",
        str(world["hp"]),
        "--backbone",
        str(world["backbone"]),
        "--clip",
        str(world["backbone"]),
        "--num-workers",
        "0",
        "--batch-size",
        "4",
    ]
    assert main(args + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    expected = by_hand
    assert list(out) == ["ict", "icthp", "clip"]
    for name, row in out.items():
        assert set(row) == KEYS and row["n"] == 16 and row["avg"] == pytest.approx(expected[name]["avg"])
    assert main(args + ["--limit", "5"]) == 0
    text = capsys.readouterr().out
    assert "I2>I1" in text and "avg" in text and f"{100 * _limited_avg(world):6.2f}" in text


def _limited_avg(world) -> float:
    r = load_rewards(["ict"], ict=str(world["ict"]), backbone=str(world["backbone"]))
    return evaluate_rewards(world["data"], "test", r, limit=5, progress=False)["ict"]["avg"]


def test_pickle_needs_the_flag_and_then_agrees_with_parquet(world, by_hand, tmp_path, capsys):
    root = tmp_path / "pkl"
    shutil.copytree(world["data"], root, ignore=shutil.ignore_patterns("*.parquet"))
    args = [
        "eval-reward",
        "--data",
        str(root),
        "--reward",
        "ict",
        "--ict",
        str(world["ict"]),
        "--backbone",
        str(world["backbone"]),
        "--num-workers",
        "0",
        "--json",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--trust-pickle" in err and "rewardtune data convert" in err and "Traceback" not in err
    assert main(args + ["--trust-pickle"]) == 0
    from_pickle = json.loads(capsys.readouterr().out)
    assert from_pickle["ict"]["avg"] == pytest.approx(by_hand["ict"]["avg"])


def test_unchecked_missing_image_still_stops_with_its_path(world, tmp_path):
    root = tmp_path / "d"
    shutil.copytree(world["data"], root)
    gone = sorted((root / "pick_easy_img" / "test").iterdir())[3]
    gone.unlink()
    r = load_rewards(["ict"], ict=str(world["ict"]), backbone=str(world["backbone"]))
    with pytest.raises(UserError, match="1 of 16 rows"):
        evaluate_rewards(root, "test", r, progress=False)
    with pytest.raises(UserError, match=f"image '{gone}' does not exist"):
        evaluate_rewards(root, "test", r, check_images=False, progress=False)


def test_user_mistakes_exit_2(world, tmp_path, capsys):
    base = ["eval-reward", "--split", "test", "--num-workers", "0"]
    assert main(base + ["--data", str(tmp_path / "nowhere"), "--reward", "ict"]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert main(base + ["--data", str(world["data"]), "--reward", "ictt"]) == 2
    assert "did you mean 'ict'" in capsys.readouterr().err
    assert main(base + ["--data", str(world["data"]), "--reward", "ict:1,hp:1"]) == 2
    assert "plain names" in capsys.readouterr().err
    assert main(base + ["--data", str(world["data"]), "--split", "val", "--reward", "ict"]) == 2
    assert "no 'val' split" in capsys.readouterr().err


def test_long_prompts_and_duplicates_are_noted_once_and_json_stays_clean(world, tmp_path, capsys):
    root = tmp_path / "d"
    shutil.copytree(world["data"], root)
    frame = pd.read_parquet(root / "test.parquet")
    frame.loc[[0, 1, 2], "easy_prompt"] = [("a red circle on a blue square " * 12) + str(i) for i in range(3)]
    frame.loc[3, "refine_prompt"] = "a red circle " * 40  # the refined prompt is not scored by eval-reward
    pd.concat([frame, frame.iloc[:2]], ignore_index=True).to_parquet(root / "test.parquet")
    args = [
        "eval-reward",
        "--data",
        str(root),
        "--split",
        "test",
        "--reward",
        "ict,hp,icthp",
        "--ict",
        str(world["ict"]),
        "--hp",
        str(world["hp"]),
        "--backbone",
        str(world["backbone"]),
        "--num-workers",
        "0",
        "--batch-size",
        "4",
        "--json",
    ]
    assert main(args) == 0
    cap = capsys.readouterr()
    assert json.loads(cap.out)["ict"]["n"] == 18
    notes = [line for line in cap.err.splitlines() if line.startswith("note:")]
    distinct = len(set(frame["easy_prompt"]))
    assert notes[0].startswith("note: 2 of 18 triplets in split 'test'") and "exact duplicates" in notes[0]
    assert notes[1:] == [
        f"note: 3 of {distinct} prompts in split 'test' are longer than the CLIP text encoder's 77 tokens "
        "(rewards ict, icthp) and are cut there"
    ], cap.err

"""`rewardtune score` as a user runs it: a real subprocess, real files."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from transformers import CLIPModel, CLIPTokenizerFast

from rewardtune.images import load_image
from rewardtune.rewards import load_reward
from rewardtune.rewards.clip_tower import ClipTower
from rewardtune.rewards.icthp import HPHead
from rewardtune.sources import save_state_dict
from rewardtune.testing import perturbed_state_dict
from rewardtune.testing.cli import offline_env, run_cli
from rewardtune.testing.clip import write_clip_processor


@pytest.fixture(scope="module")
def srcs(tiny_backbone, released_ict, released_hp):
    return ["--ict", released_ict, "--hp", released_hp, "--backbone", tiny_backbone]


def test_score_json(sample_images, srcs):
    r = run_cli("score", *sample_images, "--prompt", "a red cube", *srcs, "--json", "--batch-size", "2")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)  # stdout holds only the JSON array
    assert [row["image"] for row in rows] == [str(p) for p in sample_images]
    for row in rows:
        assert set(row) == {"image", "prompt", "ict", "hp", "icthp"}
        assert row["prompt"] == "a red cube"
        assert abs(row["icthp"] - row["ict"] * row["hp"]) < 1e-5
        assert 0 < row["hp"] < 1 and -1 <= row["ict"] <= 1


def test_score_json_matches_python_api(sample_images, srcs, tiny_backbone, released_ict):
    r = run_cli("score", sample_images[0], "--prompt", "a cat", *srcs, "--reward", "ict", "--json")
    assert r.returncode == 0, r.stderr
    with torch.no_grad():
        want = load_reward("ict", ict=str(released_ict), backbone=str(tiny_backbone))(
            load_image(sample_images[0])[None], ["a cat"]
        ).item()
    assert abs(json.loads(r.stdout)[0]["ict"] - want) < 1e-5


def test_score_table(sample_images, srcs):
    r = run_cli("score", *sample_images[:2], "--prompt", "one", "--prompt", "two", *srcs, "--reward", "hp")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0].split()[:2] == ["image", "hp"] and len(lines) == 4
    assert lines[2].endswith("one") and lines[3].endswith("two")


@pytest.mark.parametrize(
    "case, pattern",
    [
        ("missing_image", "does not exist"),
        ("corrupt_image", "unreadable or corrupt"),
        ("bad_ckpt_dir", "none of \\[model.safetensors, pytorch_model.safetensors, pytorch_model.bin\\]"),
        ("hub_offline", "not in the local cache"),
        ("unknown_reward", "unknown reward 'ictt'.*valid rewards"),
        ("prompt_count", "got 2 prompts for 3 images"),
    ],
)
def test_bad_input_one_line_error(case, pattern, sample_images, srcs, tmp_path, tiny_backbone):
    images, extra = list(sample_images[:3]), list(srcs)
    prompts = ["--prompt", "x"]
    if case == "missing_image":
        images[1] = tmp_path / "nope.png"
    elif case == "corrupt_image":
        bad = tmp_path / "bad.png"
        bad.write_bytes(b"\x89PNG not really")
        images[1] = bad
    elif case == "bad_ckpt_dir":
        extra = ["--ict", tmp_path, "--hp", srcs[3], "--backbone", tiny_backbone]
    elif case == "hub_offline":
        extra = ["--ict", "someone/missing-model", "--hp", srcs[3], "--backbone", tiny_backbone]
    elif case == "unknown_reward":
        extra += ["--reward", "ictt"]
    elif case == "prompt_count":
        prompts = ["--prompt", "a", "--prompt", "b"]
    env_home = {"HF_HOME": str(tmp_path / "hf")}
    r = run_cli("score", *images, *prompts, *extra, env=offline_env(**env_home))
    assert r.returncode == 2
    err = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert len(err) == 1, r.stderr  # one line, no traceback
    assert re.search(pattern, err[0]), err[0]
    assert "Traceback" not in r.stderr and r.stdout == ""


LONG = "a small red cube on a big blue table " * 12  # about 110 CLIP tokens: past the encoder's 77


def _notes(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("note:")]


def test_long_prompts_are_counted_once_per_command(sample_images, srcs):
    # Four images in four batches, two of them with a prompt past 77 tokens: one note, not one per batch.
    prompts = ["a cat", LONG, "a dog", LONG + "again"]
    r = run_cli(
        "score", *sample_images, *[a for p in prompts for a in ("--prompt", p)], *srcs, "--batch-size", "1", "--json"
    )
    assert r.returncode == 0, r.stderr
    assert _notes(r.stderr) == [
        "note: 2 of 4 prompts are longer than the CLIP text encoder's 77 tokens (rewards ict, icthp) and are cut there"
    ], r.stderr
    assert [row["prompt"] for row in json.loads(r.stdout)] == prompts  # reported, still scored
    r = run_cli("score", *sample_images[:2], "--prompt", "a cat", *srcs, "--reward", "ict,hp", "--json")
    assert r.returncode == 0 and _notes(r.stderr) == [], r.stderr


def test_count_truncated_agrees_with_what_the_tower_cuts(tiny_backbone):
    tower = ClipTower.from_dir(tiny_backbone, "backbone")
    words = ["red"] * 200
    # 75 words + start and end tokens fill the 77 exactly; one more word is cut.
    prompts = [" ".join(words[:75]), " ".join(words[:76]), LONG, "a cat", ""]
    assert tower.max_tokens == 77
    assert tower.count_truncated(prompts) == 2
    full = tower.tokenizer(prompts, truncation=False)["input_ids"]
    kept = tower.tokenize(prompts)["attention_mask"].sum(-1).tolist()
    assert [len(ids) > kept[i] for i, ids in enumerate(full)] == [False, True, True, False, False]


@pytest.mark.parametrize(
    "prompts, which",
    [
        ([""], "--prompt is empty"),
        (["   "], "--prompt is empty"),
        (["\u200b"], "--prompt is empty"),  # a zero-width space: nothing to read
        (["a cat", " ", "a dog"], "--prompt number 2 (for '{img1}') is empty"),
    ],
)
def test_empty_prompt_is_a_one_line_error(prompts, which, sample_images, srcs):
    r = run_cli("score", *sample_images[:3], *[a for p in prompts for a in ("--prompt", p)], *srcs)
    assert r.returncode == 2, r.stderr
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and which.format(img1=sample_images[1]) in err[0], r.stderr
    assert r.stdout == ""


def test_a_directory_scores_its_images_sorted_by_name(sample_images, srcs, tmp_path):
    d = tmp_path / "shots"
    d.mkdir()
    for name, src in (("b.png", sample_images[0]), ("a.png", sample_images[1]), ("c.PNG", sample_images[3])):
        shutil.copyfile(src, d / name)
    (d / "notes.txt").write_text("not an image")
    (d / "sub").mkdir()
    shutil.copyfile(sample_images[2], d / "sub" / "deeper.png")  # not recursed into
    r = run_cli("score", d, "--prompt", "a red cube", *srcs, "--reward", "ict", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [row["image"] for row in rows] == [str(d / n) for n in ("a.png", "b.png", "c.PNG")]
    assert all(row["prompt"] == "a red cube" for row in rows)
    assert _notes(r.stderr) == [
        f"note: '{d}': scoring its 3 image files, skipping 2 other entries "
        "(not .png/.jpg/.jpeg/.webp/.bmp/.gif/.tif/.tiff)"
    ], r.stderr
    # The same scores as naming the files; a directory mixes with files and takes one prompt per image.
    files = run_cli(
        "score",
        sample_images[1],
        sample_images[0],
        sample_images[3],
        "--prompt",
        "a red cube",
        *srcs,
        "--reward",
        "ict",
        "--json",
    )
    assert [row["ict"] for row in json.loads(files.stdout)] == pytest.approx([row["ict"] for row in rows], abs=1e-6)
    mixed = run_cli(
        "score", sample_images[2], d, *[a for p in "wxyz" for a in ("--prompt", p)], *srcs, "--reward", "ict", "--json"
    )
    assert mixed.returncode == 0, mixed.stderr
    assert [row["prompt"] for row in json.loads(mixed.stdout)] == list("wxyz")


@pytest.mark.parametrize(
    "content, pattern",
    [
        ([], "image directory '.*' holds no image files .*; it is empty"),
        (["readme.txt", "sub/"], "image directory '.*' holds no image files .*; it holds 2 other entries"),
    ],
)
def test_a_directory_without_images_is_a_one_line_error(content, pattern, sample_images, srcs, tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    for name in content:
        (d / name).mkdir() if name.endswith("/") else (d / name).write_text("x")
    r = run_cli("score", d, "--prompt", "x", *srcs)
    assert r.returncode == 2
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and re.search(pattern, err[0]), r.stderr
    assert "does not exist" not in r.stderr and r.stdout == ""


def test_a_train_reward_output_with_only_tokenizer_json_needs_no_backbone_nor_the_hub(
    tiny_backbone, sample_images, tmp_path
):
    """transformers 5 saves a tokenizer as tokenizer.json alone; such an output is a full CLIP all the same."""

    base = CLIPModel.from_pretrained(tiny_backbone)
    tokenizer = CLIPTokenizerFast.from_pretrained(tiny_backbone)

    def clip_dir(d, seed):
        model = CLIPModel.from_pretrained(tiny_backbone)
        model.load_state_dict(perturbed_state_dict(base, seed=seed))
        model.save_pretrained(d)
        tokenizer.save_pretrained(d)
        write_clip_processor(d, model.config.vision_config.image_size)
        for name in ("vocab.json", "merges.txt"):
            (d / name).unlink(missing_ok=True)
        assert (d / "tokenizer.json").is_file() and (d / "model.safetensors").is_file()

    ict, hp = tmp_path / "ict", tmp_path / "hp"
    clip_dir(ict, 1)
    clip_dir(hp / "hp_backbone", 2)
    torch.manual_seed(3)
    save_state_dict(HPHead(1024).state_dict(), hp / "hp_scorer" / "mlp_pytorch_model.safetensors")
    home = tmp_path / "hf_home"  # empty: a hub attempt finds nothing, offline it cannot download
    home.mkdir()
    r = run_cli(
        "score",
        str(sample_images[0]),
        "--prompt",
        "a cat",
        "--ict",
        str(ict),
        "--hp",
        str(hp),
        "--json",
        env=offline_env(HF_HOME=str(home)),
    )
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout)[0]

    with torch.no_grad():
        want = load_reward("ict", ict=str(ict), backbone=str(ict))(
            load_image(sample_images[0])[None], ["a cat"]
        ).item()
    assert row["ict"] == pytest.approx(want, abs=1e-5) and 0 < row["hp"] < 1
    assert not any(home.rglob("*.safetensors"))

"""The shapes world: renderer and oracle agree, prompts round-trip, the preference set loads."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from rewardtune.data import load_triplets
from rewardtune.demo import data, world
from rewardtune.demo.data import write_preference_set, write_split
from rewardtune.errors import UserError


def scenes(n: int, seed: int = 0, **kw) -> list[world.Scene]:
    rng = np.random.default_rng(seed)
    return [world.random_scene(rng, **kw) for _ in range(n)]


@pytest.mark.parametrize("detail", [0, 1, 2])
def test_oracle_reads_back_every_attribute_of_rendered_scenes(detail):
    for s in scenes(60, seed=detail, detail=detail):
        assert world.read_scene(world.render(s)) == s.attributes()


def test_rendered_image_scores_one_on_its_prompt_and_low_on_others():
    batch = scenes(40, seed=3)
    images = [world.render(s) for s in batch]
    prompts = [world.make_prompt(s.attributes(), detailed=bool(i % 2)) for i, s in enumerate(batch)]
    own = [world.oracle_score(im, p) for im, p in zip(images, prompts)]
    assert own == [1.0] * len(batch)
    others = [world.oracle_score(images[i], prompts[(i + 1) % len(batch)]) for i in range(len(batch))]
    assert np.mean(others) < 0.5
    # a prompt that gets every attribute wrong scores 0
    rng = np.random.default_rng(0)
    wrong = world.perturb(batch[0], rng, list(world.ATTRIBUTES))
    assert world.oracle_score(images[0], world.make_prompt(wrong.attributes())) == 0.0


def test_oracle_partial_credit_and_scene_score_agree():
    s = scenes(1, seed=5)[0]
    image = world.render(s)
    for k in range(1, len(world.ATTRIBUTES) + 1):
        rng = np.random.default_rng(k)
        wrong = list(rng.choice(world.ATTRIBUTES, size=k - 1, replace=False))
        prompt = world.make_prompt(world.perturb(s, rng, wrong).attributes())
        expected = 1 - (k - 1) / len(world.ATTRIBUTES)
        assert world.oracle_score(image, prompt) == pytest.approx(expected)
        assert world.scene_score(s, prompt) == pytest.approx(expected)


def test_oracle_tolerates_noise_and_other_sizes():
    rng = np.random.default_rng(1)
    errors = 0
    for s in scenes(40, seed=7):
        noisy = np.clip(world.render(s) + rng.normal(0, 0.05, (32, 32, 3)), 0, 1)
        errors += sum(world.read_scene(noisy)[a] != v for a, v in s.attributes().items())
        assert world.read_scene(world.render(s, size=64)) == s.attributes()
    assert errors <= 4  # of 200 attributes


def test_blank_image_shows_no_object():
    blank = np.full((32, 32, 3), 240 / 255, np.float32)
    seen = world.read_scene(blank)
    assert seen["background"] == "white" and seen["colour"] is None and seen["shape"] is None
    assert world.oracle_score(blank, "a red circle") == 0.0
    assert world.oracle_score(blank, "a red circle on a white background") == pytest.approx(1 / 3)


def test_rendering_and_scenes_are_deterministic_by_seed():
    a, b = scenes(5, seed=11), scenes(5, seed=11)
    assert a == b and all(x.jitter == y.jitter for x, y in zip(a, b))
    assert np.array_equal(world.render_batch(a), world.render_batch(b))
    assert scenes(5, seed=12) != a


def test_prompts_round_trip_and_overlap():
    for s in scenes(30, seed=2):
        attrs = s.attributes()
        assert world.parse_prompt(world.make_prompt(attrs, detailed=True)) == attrs
        part = {"shape": attrs["shape"], "colour": attrs["colour"]}
        assert world.parse_prompt(world.make_prompt(part)) == part
    assert world.prompt_overlap(
        "a red circle", "a small red circle on the left on a white background"
    ) == pytest.approx(2 / 5)
    assert world.prompt_overlap("a red circle", "a blue square") == 0.0
    words = set(world.world_words())
    assert all(
        w in words for w in "a large purple triangle at the bottom on a gray background highly detailed".split()
    )


def test_preference_set_labels_follow_the_paper(tmp_path):
    rng = np.random.default_rng(0)
    for _ in range(50):
        t = data.make_triplet(rng)
        i1, i2, i3 = t["scenes"]
        assert world.scene_score(i3, t["refine_prompt"]) == 1.0 and i3.detail == 2
        s1, s2 = (world.oracle_score(world.render(s), t["easy_prompt"]) for s in (i1, i2))
        assert s2 > s1 and i2.detail >= i1.detail
        sim = world.prompt_overlap(t["easy_prompt"], t["refine_prompt"])
        assert t["E2"] == pytest.approx(s2) and t["E1"] == pytest.approx(min(s1, s2))
        assert t["R2"] == pytest.approx(t["E2"] * sim) and t["R1"] == pytest.approx(t["E1"] * sim)


def test_preference_set_loads_with_the_triplet_loader(tmp_path):
    sizes = write_preference_set(tmp_path, {"train": 12, "test": 6}, seed=1, pickle=True)
    assert sizes == {"train": 12, "test": 6}
    table = load_triplets(tmp_path, "train")
    assert len(table) == 12 and table.path.suffix == ".parquet"
    assert all(os.path.isfile(p) for row in table.images for p in row)
    assert float(table.labels.min()) >= 0 and float(table.labels.max()) <= 1
    assert len(load_triplets(tmp_path, "test")) == 6
    # the published pickle layout (no Parquet beside it), behind the explicit flag
    pkl_root = tmp_path / "pkl"
    shutil.copytree(tmp_path / "Pick-High", pkl_root / "Pick-High")
    for sub in ("pick_easy_img", "pick_refine_img"):
        shutil.copytree(tmp_path / sub, pkl_root / sub)
    with pytest.raises(UserError, match="pickle"):
        load_triplets(pkl_root, "train")
    assert load_triplets(pkl_root, "train", trust_pickle=True).easy_prompt == table.easy_prompt


def test_same_seed_same_split(tmp_path):
    a = write_split(tmp_path / "a", "val", 5, seed=3)
    b = write_split(tmp_path / "b", "val", 5, seed=3)
    assert a.equals(b)
    assert (tmp_path / "a" / a["refine_image"][0]).read_bytes() == (tmp_path / "b" / b["refine_image"][0]).read_bytes()

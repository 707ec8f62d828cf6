"""The reward-hacking monitors: each measure on made-up images with a known answer, the threshold and stop
logic, and one ``rewardtune demo --stop-on-hacking`` run end to end."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file

from rewardtune.demo.build import MODELS_DIR
from rewardtune.finetune.monitors import (
    Thresholds,
    Watch,
    caption,
    find_embedder,
    hf_energy,
    measure,
    middle_frames,
    pixel_embedding,
    saturation,
    similarities,
)
from rewardtune.rewards import load_reward
from rewardtune.rewards.compose import WeightedSum
from rewardtune.testing.cli import run_cli
from rewardtune.testing.clip import save_tiny_clip


def natural(n: int, shapes: int = 6, seed: int = 0, size: int = 64) -> torch.Tensor:
    """Natural-ish images: a tinted background with a gentle ramp, soft-edged discs and rotated squares, faint noise."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    out = []
    for _ in range(n):
        im = torch.rand(3, 1, 1, generator=g) * 0.6 + 0.2 + (x / size * 0.3 * torch.rand(1, generator=g))[None]
        for s in range(shapes):
            cx, cy = torch.rand(2, generator=g) * size
            r = torch.rand(1, generator=g) * size / 4 + 3
            if s % 2 == 0:
                d = ((x - cx) ** 2 + (y - cy) ** 2).sqrt() - r
            else:
                a = torch.rand(1, generator=g) * math.pi
                u, v = (x - cx) * a.cos() + (y - cy) * a.sin(), -(x - cx) * a.sin() + (y - cy) * a.cos()
                d = torch.maximum(u.abs(), v.abs()) - r
            alpha = torch.sigmoid(-d / 0.7)[None]
            im = im * (1 - alpha) + torch.rand(3, 1, 1, generator=g) * alpha
        out.append((im + 0.01 * torch.randn(3, size, size, generator=g)).clamp(0, 1))
    return torch.stack(out)


def checkerboard(size: int = 64) -> torch.Tensor:
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return ((x + y) % 2 * 2 - 1).float()[None, None]


def test_saturation_of_known_colours():
    grey = torch.full((2, 3, 8, 8), 0.4)
    assert saturation(grey) == pytest.approx(0.0)
    red = torch.zeros(2, 3, 8, 8)
    red[:, 0] = 0.9
    assert saturation(red) == pytest.approx(1.0)
    pink = torch.tensor([1.0, 0.5, 0.5])[None, :, None, None].expand(2, 3, 8, 8)
    assert saturation(pink) == pytest.approx(0.5)  # (max - min) / max
    assert saturation(torch.cat([grey, red])) == pytest.approx(0.5)  # the mean over pixels


def test_hf_energy_rises_with_a_checkerboard_not_with_smooth_or_natural_detail():
    base = natural(8)
    b = hf_energy(base)
    assert 0.01 < b < 0.2  # natural detail: a minor share along its diagonal and curved edges
    faint = hf_energy((base + 0.01 * checkerboard()).clamp(0, 1))  # 2.5/255: barely visible
    assert faint > 3 * b
    assert hf_energy((base + 0.05 * checkerboard()).clamp(0, 1)) > 0.8  # most of the fine detail
    assert hf_energy((0.5 + 0.3 * checkerboard()).expand(2, 3, 64, 64)) == pytest.approx(1.0)
    y, x = torch.meshgrid(torch.arange(64).float(), torch.arange(64).float(), indexing="ij")
    ramps = torch.stack([x / 63, y / 63, (x + y) / 126])[None].expand(4, 3, 64, 64)
    assert hf_energy(ramps) < 1e-6  # linear ramps have no checkerboard component
    limit = Thresholds().limit("hf_energy", {"hf_energy": b})
    for other in (natural(8, shapes=12, seed=1), natural(8, shapes=3, seed=2), ramps, base[:, :, 8:56, 8:56]):
        assert hf_energy(other) < limit  # other natural-ish or smoother images do not trip the default
    assert faint > limit


def test_similarity_of_duplicates_and_distinct_images(tmp_path):
    save_tiny_clip(tmp_path / "clip", image_size=32, projection_dim=16)
    reward = load_reward("clip", clip=str(tmp_path / "clip"))
    name, embed = find_embedder(None, reward)
    assert name.startswith("ClipReward") and embed.__self__ is reward.tower
    prompts = natural(4, seed=3)
    same = measure(torch.cat([prompts, prompts]), 2, embed)  # every seed draws the same image
    assert same["seed_similarity"] == pytest.approx(1.0, abs=1e-5)
    assert same["prompt_similarity"] < 0.999
    differ = measure(torch.cat([prompts, natural(4, seed=4)]), 2, embed)
    assert differ["seed_similarity"] < same["seed_similarity"] - 1e-3
    one = measure(prompts[:1].expand(4, 3, 64, 64), 1, embed)  # every prompt the same image
    assert one["prompt_similarity"] == pytest.approx(1.0, abs=1e-5) and "seed_similarity" not in one
    # the held-out reward's tower first, a mix's part found inside it, and a fallback without any tower
    other = load_reward("clip", clip=str(tmp_path / "clip"))
    assert find_embedder(other, reward)[1].__self__ is other.tower
    mix = WeightedSum({"clip": reward}, {"clip": 1.0})
    assert find_embedder(None, mix)[1].__self__ is reward.tower
    assert find_embedder(None, torch.nn.Linear(2, 2))[1] is pixel_embedding


def test_similarities_by_hand():
    e = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 1.0]]])  # (2 seeds, 2 prompts, 2)
    s = similarities(e)
    assert s["seed_similarity"] == pytest.approx((1.0 + 1 / math.sqrt(2)) / 2)
    assert s["prompt_similarity"] == pytest.approx((0.0 + 1 / math.sqrt(2)) / 2)


def test_thresholds_are_relative_to_the_base():
    t = Thresholds(saturation=0.1, seed_similarity=0.2, prompt_similarity=0, hf_energy=1.5, eval_reward=0.5)
    base = {"saturation": 0.3, "seed_similarity": 0.5, "prompt_similarity": 0.4, "hf_energy": 0.02}
    base |= {"eval_reward": 1.0, "eval_reward_std": 0.4}
    assert t.limit("saturation", base) == pytest.approx(0.4)
    assert t.limit("seed_similarity", base) == pytest.approx(0.7)
    assert t.limit("prompt_similarity", base) is None  # 0: off
    assert t.limit("hf_energy", base) == pytest.approx(0.03)
    assert t.limit("eval_reward", base) == pytest.approx(0.8)  # a fall of 0.5 base standard deviations
    assert t.limit("eval_reward", {"eval_reward": 1.0}) is None  # no spread measured: not watched


def test_watch_keeps_the_last_evaluation_before_the_first_crossing():
    watch = Watch(Thresholds())
    base = {"saturation": 0.2, "hf_energy": 0.02, "seed_similarity": 0.3, "prompt_similarity": 0.3}
    assert watch.observe(0, base) == [] and watch.clean_step == 0
    assert watch.observe(25, {**base, "saturation": 0.29}) == [] and watch.clean_step == 25  # within 0.1
    trips = watch.observe(50, {**base, "saturation": 0.31, "prompt_similarity": 0.35})
    assert [t.name for t in trips] == ["saturation"] and watch.clean_step == 25
    assert trips[0].describe() == "saturation 0.3100 > 0.3000 at step 50"
    assert "saturation 0.310 TRIPPED" in caption({**base, "saturation": 0.31}, watch, 50)
    again = watch.observe(75, {**base, "saturation": 0.35, "hf_energy": 0.05})  # each monitor once
    assert [t.name for t in again] == ["hf_energy"]
    assert watch.observe(100, base) == [] and watch.clean_step == 25  # back within: the kept step stays
    assert watch.first_trips["saturation"].step == 50 and watch.first_trips["hf_energy"].step == 75
    restored = Watch(Thresholds())
    restored.restore(json.loads(json.dumps(watch.state())))  # through a checkpoint's JSON
    assert restored.clean_step == 25 and restored.first_trips == watch.first_trips and restored.base == base


def test_temporal_consistency_trips_on_a_fall_and_videos_are_read_at_their_middle_frame():
    watch = Watch(Thresholds(temporal_consistency=0.1))
    base = {"saturation": 0.2, "temporal_consistency": 0.9}
    assert watch.observe(0, base) == [] and watch.observe(25, {**base, "temporal_consistency": 0.95}) == []
    trips = watch.observe(50, {**base, "temporal_consistency": 0.75})  # flicker: consecutive frames less alike
    assert trips[0].describe() == "temporal_consistency 0.7500 < 0.8000 at step 50" and watch.clean_step == 25
    video = torch.rand(2, 3, 5, 8, 8)
    assert torch.equal(middle_frames(video), video[:, :, 2]) and middle_frames(video[:, :, 0]).shape == (2, 3, 8, 8)


@pytest.mark.skipif(not (MODELS_DIR / "pipeline" / "model_index.json").is_file(), reason="bundled demo models missing")
def test_demo_stops_on_hacking_and_keeps_the_last_clean_lora(tmp_path):
    """One step with the monitors off, then on with --resume and --stop-on-hacking under thresholds so tight that
    any monitor moving the wrong way by anything trips: the LoRA left is the last clean evaluation's, which
    is then a checkpoint's (the one resumed from, or the next), and nothing past it is left to resume from."""
    monitors = ["saturation", "seed-similarity", "prompt-similarity", "hf-energy", "eval-reward"]
    out = tmp_path / "demo"
    args = ["demo", "--output", str(out), "--eval-every", "1", "--eval-size", "3", "--eval-seeds", "2"]
    args += ["--train-prompts", "4", "--batch-size", "2", "--checkpoint-every", "1", "--threads", "1"]
    off = [x for m in monitors for x in (f"--monitor-{m}", "0")]
    first = run_cli(*args, "--steps", "1", *off)
    assert first.returncode == 0, first.stderr[-2000:]
    tight = [x for m in monitors for x in (f"--monitor-{m}", "1.0000001" if m == "hf-energy" else "1e-9")]
    proc = run_cli(*args, "--steps", "3", "--resume", "--stop-on-hacking", *tight)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = re.search(r"finetune: stop on hacking: (.*); keeping the LoRA of step (\d+)", proc.stdout)
    assert line, proc.stdout[-3000:]
    kept = int(line.group(2))
    assert kept in (1, 2)
    summary = json.loads((out / "finetune" / "summary.json").read_text())
    stop = summary["stopped_on_hacking"]
    assert stop["kept_step"] == kept and stop["step"] == kept + 1 and summary["steps"] == kept + 1
    assert summary["stopped_early"] and summary["after"]["step"] == kept
    for name, trip in stop["tripped"].items():
        assert f"{name} {trip['value']:.4f}" in line.group(1) and trip["step"] == kept + 1
    assert summary["monitors"]["first_trips"] == stop["tripped"] and summary["monitors"]["clean_step"] == kept
    rows = [json.loads(x) for x in (out / "finetune" / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r for r in rows if r["kind"] == "eval"}
    assert sorted(evals) == list(range(kept + 2))
    for key in ("saturation", "seed_similarity", "prompt_similarity", "hf_energy", "eval_reward", "eval_reward_std"):
        assert all(isinstance(r[key], float) for r in evals.values()), key
        assert summary["before"][key] == evals[0][key]
    # the LoRA the run leaves is the kept step's checkpoint's, and no checkpoint past it is left
    ckpts = out / "finetune" / "checkpoints"
    assert max(int(p.name.split("_")[1]) for p in ckpts.iterdir()) == kept
    lora = load_file(out / "finetune" / "pytorch_lora_weights.safetensors")
    saved = load_file(ckpts / f"step_{kept:06d}" / "pytorch_lora_weights.safetensors")
    assert saved.keys() == lora.keys() and all(torch.equal(saved[k], lora[k]) for k in lora)
    assert any(
        v.any() for k, v in lora.items() if ".lora.up." in k or "lora_B" in k
    )  # a trained LoRA, not the untrained one
    demo = json.loads((out / "summary.json").read_text())
    assert demo["oracle_after"] == evals[kept]["oracle"] and demo["stopped_on_hacking"] == stop
    assert (out / "finetune" / "samples" / f"step_{kept + 1:06d}.png").is_file()

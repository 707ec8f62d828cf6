#!/usr/bin/env python
"""Measure the demo's targets on the bundled models and record them in benchmarks/results/demo_targets.{json,md}.

Targets (issue 5): ICT-HP triplet accuracy on the generated test split >= 0.9; the base pipeline's oracle
score in [0.2, 0.7]; after the default ``rewardtune demo`` the oracle up by >= 0.15 with the held-out reward
not lower; the whole default demo <= 10 minutes on a 2-core CPU.

    python benchmarks/demo_targets.py            # about 10-15 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rewardtune.demo.build import MODELS_DIR, machine
from rewardtune.demo.data import pipeline_sampler, write_split
from rewardtune.reward_training import evaluate_rewards
from rewardtune.rewards import load_rewards

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def reward_accuracy(models: Path, seed: int, test_size: int, generated: bool) -> dict:
    """Triplet accuracy of ICT, HP, ICT-HP and the held-out CLIP on a regenerated test split: as the build
    writes it (half the I1/I2 pairs drawn by the base pipeline) or with rendered images only."""

    with tempfile.TemporaryDirectory() as tmp:
        write_split(
            Path(tmp), "test", test_size, seed, generate=pipeline_sampler(models / "pipeline") if generated else None
        )
        rewards = load_rewards(["ict", "hp", "icthp"], ict=str(models / "ict"), hp=str(models / "hp"))
        rewards["heldout_clip"] = load_rewards(["clip"], clip=str(models / "heldout_clip"))["clip"]
        return evaluate_rewards(tmp, "test", rewards, batch_size=64, progress=False)


def run_demo(models: Path, extra: list[str]) -> tuple[dict, float]:
    """The default demo as a user runs it (a subprocess); (summary, wall seconds)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "rewardtune.cli",
            "demo",
            "--models",
            str(models),
            "--output",
            tmp + "/demo",
            *extra,
        ]
        t0 = time.time()
        subprocess.run(cmd, check=True)
        seconds = time.time() - t0
        return json.loads(Path(tmp, "demo", "summary.json").read_text()), seconds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=str(MODELS_DIR), help="models directory (default: the bundled one)")
    p.add_argument("--test-size", type=int, default=1000, help="triplets in the regenerated test split")
    p.add_argument("--output", default=str(RESULTS / "demo_targets"), help="results path without extension")
    p.add_argument("demo_args", nargs="*", help="extra flags for rewardtune demo (after --)")
    args = p.parse_args()
    models = Path(args.models)
    build = json.loads((models / "build.json").read_text()) if (models / "build.json").is_file() else {}
    seed = build.get("config", {}).get("seed", 0)
    load_before = load_average()
    t0 = time.time()
    accuracy = reward_accuracy(models, seed, args.test_size, generated=True)
    rendered = reward_accuracy(models, seed, args.test_size, generated=False)
    accuracy_seconds = time.time() - t0
    summary, demo_seconds = run_demo(models, args.demo_args)
    s = summary
    results = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine(),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "build": {
            "date": build.get("date"),
            "seconds": build.get("seconds"),
            "total_seconds": build.get("total_seconds"),
        },
        "reward_accuracy": accuracy,
        "reward_accuracy_rendered_only": rendered,
        "reward_accuracy_seconds": round(accuracy_seconds, 1),
        "demo": {
            k: s[k]
            for k in (
                "oracle_before",
                "oracle_after",
                "reward_before",
                "reward_after",
                "heldout_reward_before",
                "heldout_reward_after",
                "attributes_before",
                "attributes_after",
                "steps",
            )
        },
        "demo_config": s["config"],
        "demo_seconds": round(demo_seconds, 1),
    }
    results["targets"] = {
        "icthp_accuracy >= 0.9": accuracy["icthp"]["avg"] >= 0.9,
        "0.2 <= base oracle <= 0.7": 0.2 <= s["oracle_before"] <= 0.7,
        "oracle gain >= 0.15": s["oracle_after"] - s["oracle_before"] >= 0.15,
        "held-out reward not lower": s["heldout_reward_after"] >= s["heldout_reward_before"],
        "demo <= 600 s": demo_seconds <= 600,
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))
    return 0


def markdown(r: dict) -> str:
    d, a = r["demo"], r["reward_accuracy"]

    def table(acc_by_reward: dict) -> str:
        return "\n".join(
            f"| {name} | {acc['I2>I1']:.3f} | {acc['I3>I2']:.3f} | {acc['I3>I1']:.3f} | {acc['avg']:.3f} |"
            for name, acc in acc_by_reward.items()
        )

    attribute_rows = "\n".join(
        f"| {a} right | {v:.3f} | {d['attributes_after'][a]:.3f} | {d['attributes_after'][a] - v:+.3f} |"
        for a, v in d["attributes_before"].items()
        if v is not None
    )
    targets = "\n".join(f"| {k} | {'met' if v else 'MISSED'} |" for k, v in r["targets"].items())
    return f"""# Demo targets

Measured {r["date"]} on {r["machine"]}; load average {r["load_average_before"]} before, {r["load_average_after"]} after
(the machine is shared; a load above the core count slows every timing here).

## Targets

| target | result |
|---|---|
{targets}

## Reward models on the generated test split ({a["icthp"]["n"]} triplets)

As the build writes it: half the I1/I2 pairs drawn by the base pipeline and ordered by the oracle, a quarter
of the losers with junk strokes.

| reward | I2>I1 | I3>I2 | I3>I1 | avg |
|---|---|---|---|---|
{table(a)}

The same split with rendered images only:

| reward | I2>I1 | I3>I2 | I3>I1 | avg |
|---|---|---|---|---|
{table(r["reward_accuracy_rendered_only"])}

## Default `rewardtune demo` ({d["steps"]} steps, {r["demo_seconds"]:.0f} s wall clock)

| metric | before | after | change |
|---|---|---|---|
| oracle (fraction of attributes shown) | {d["oracle_before"]:.3f} | {d["oracle_after"]:.3f} | {d["oracle_after"] - d["oracle_before"]:+.3f} |
| {r["demo_config"]["reward"]} reward (trained on) | {d["reward_before"]:.3f} | {d["reward_after"]:.3f} | {d["reward_after"] - d["reward_before"]:+.3f} |
| held-out CLIP (never trained on) | {d["heldout_reward_before"]:.3f} | {d["heldout_reward_after"]:.3f} | {d["heldout_reward_after"] - d["heldout_reward_before"]:+.3f} |
{attribute_rows}

Bundled models built {r["build"]["date"]} in {r["build"]["total_seconds"]} s: {r["build"]["seconds"]}.
"""


if __name__ == "__main__":
    sys.exit(main())

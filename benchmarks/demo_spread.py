#!/usr/bin/env python
"""The default demo over seeds and thread counts: how far its outcome spreads, and how often the one-colour
background collapse (or another sign of reward hacking) happens. Records benchmarks/results/demo_spread.{json,md}.

CPU numerics differ with the thread count (and the machine), so the same seed gains differently at 1 and 2
threads; each run is the default ``rewardtune demo`` with ``--seed S --threads T`` and nothing else.

    python benchmarks/demo_spread.py                      # seeds 0 1 2 x threads 1 2: six demos, ~20-60 minutes
    python benchmarks/demo_spread.py --seeds 3 4 --threads 1

The record is rewritten after every run, so an interrupted measurement keeps what it finished; runs already in
the record (same seed and threads, same commit) are not repeated.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_targets import commit, load_average  # noqa: E402

from rewardtune.demo.build import machine  # noqa: E402
from rewardtune.demo.compare import OUTCOME_KEYS  # noqa: E402
from rewardtune.demo.report import hacking_signs  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def one_run(seed: int, threads: int, extra: list[str]) -> dict:
    """``rewardtune demo --seed S --threads T`` in a subprocess (its own output directory, removed after)."""
    with tempfile.TemporaryDirectory(prefix="demo-spread-") as tmp:
        cmd = [sys.executable, "-m", "rewardtune.cli", "demo", "--output", f"{tmp}/demo"]
        cmd += ["--seed", str(seed), "--threads", str(threads), *extra]
        before, t0 = load_average(), time.time()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        seconds = time.time() - t0
        summary = json.loads(Path(tmp, "demo", "summary.json").read_text())
    return {
        "seed": seed,
        "threads": threads,
        **{k: summary[k] for k in OUTCOME_KEYS},
        "seconds": round(seconds, 1),
        "hacking_signs": hacking_signs(summary),
        "load_average_before": before,
        "load_average_after": load_average(),
        "finished": time.strftime("%Y-%m-%d %H:%M"),
    }


def spread(values: list[float]) -> str:
    return f"{min(values):+.3f} to {max(values):+.3f}" if len(values) > 1 else f"{values[0]:+.3f}"


def markdown(record: dict) -> str:
    runs = record["runs"]
    rows = []
    for r in runs:
        attrs = ", ".join(
            f"{a} {r['attributes_before'][a]:.2f}→{r['attributes_after'][a]:.2f}"
            for a in r["attributes_before"]
            if r["attributes_before"][a] is not None
        )
        rows.append(
            f"| {r['seed']} | {r['threads']} | {r['oracle_before']:.3f} → {r['oracle_after']:.3f} "
            f"({r['oracle_after'] - r['oracle_before']:+.3f}) | {r['heldout_reward_before']:.3f} → "
            f"{r['heldout_reward_after']:.3f} | {attrs} | {'; '.join(r['hacking_signs']) or 'none'} | "
            f"{r['seconds']:.0f} | {r['load_average_before'][0]:.1f} |"
        )
    gains = [r["oracle_after"] - r["oracle_before"] for r in runs]
    collapsed = [r for r in runs if any(s.startswith("background right") for s in r["hacking_signs"])]
    hacked = [r for r in runs if r["hacking_signs"]]
    by_threads = {}
    for r in runs:
        by_threads.setdefault(r["threads"], []).append(r)
    per_threads = "; ".join(
        f"{t} thread{'s' if t > 1 else ''}: gain {spread([x['oracle_after'] - x['oracle_before'] for x in rs])}, "
        f"{min(x['seconds'] for x in rs):.0f}-{max(x['seconds'] for x in rs):.0f} s"
        for t, rs in sorted(by_threads.items())
    )
    return f"""# The default demo over seeds and thread counts

Commit `{record["commit"]}`, {record["machine"]}; each run `rewardtune demo --seed S --threads T` at its defaults
(300 steps, batch 8, lr 1e-3, K = all 6 DDIM steps, guidance 1.0, 64 held-out prompts), one after another, on a
machine other work shared (the 1-minute load average before each run is in the table).

{len(runs)} runs: oracle gain {spread(gains)} (mean {sum(gains) / len(gains):+.3f}); {per_threads}.
Background collapse (background right down 0.15 or more while the reward rose): {len(collapsed)} of {len(runs)} runs.
Any sign of reward hacking: {len(hacked)} of {len(runs)}.

| seed | threads | oracle before → after | held-out CLIP | per attribute (right, before→after) | signs of hacking | s | load |
|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--output", default=str(RESULTS / "demo_spread"), help="results path without extension")
    p.add_argument("demo_args", nargs="*", help="extra flags for rewardtune demo (after --)")
    args = p.parse_args()
    out = Path(args.output)
    path = out.with_suffix(".json")
    record = json.loads(path.read_text()) if path.is_file() else {}
    if record.get("commit") != commit():
        record = {"commit": commit(), "machine": machine(), "cpu_count": os.cpu_count(), "runs": []}
    done = {(r["seed"], r["threads"]) for r in record["runs"]}
    for seed in args.seeds:
        for threads in args.threads:
            if (seed, threads) in done:
                continue
            record["runs"].append(one_run(seed, threads, args.demo_args))
            out.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(record, indent=2) + "\n")
            out.with_suffix(".md").write_text(markdown(record))
            r = record["runs"][-1]
            print(
                f"seed {seed} threads {threads}: oracle {r['oracle_before']:.3f} -> {r['oracle_after']:.3f}, "
                f"{r['seconds']:.0f} s, signs: {'; '.join(r['hacking_signs']) or 'none'}",
                flush=True,
            )
    print(markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""How long ``rewardtune --help``, ``rewardtune COMMAND --help`` and ``rewardtune --version`` take, as a user
starts them (a fresh ``rewardtune`` process each time). Records benchmarks/results/cli_startup.{json,md}.

Target (issue #26): each at most 1 s on this repository's 2-core machine. For scale the record also times a bare
``python -c pass`` and ``python -c "import torch"`` (what every command paid before: each imported torch).

    python benchmarks/cli_startup.py            # about a minute
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_targets import commit, load_average, write_record  # noqa: E402

from rewardtune.cli import COMMANDS  # noqa: E402
from rewardtune.demo.build import machine  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TARGET_SECONDS = 1.0


def cases() -> dict[str, list[str]]:
    """What is timed: the installed ``rewardtune`` entry point (as a user types it), and the bare interpreter."""
    exe = shutil.which("rewardtune") or str(Path(sys.executable).with_name("rewardtune"))
    out = {"rewardtune --help": [exe, "--help"], "rewardtune --version": [exe, "--version"]}
    out.update({f"rewardtune {c.replace('_', '-')} --help": [exe, c.replace("_", "-"), "--help"] for c in COMMANDS})
    out["python -c pass"] = [sys.executable, "-c", "pass"]
    out['python -c "import torch"'] = [sys.executable, "-c", "import torch"]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--output", default=str(RESULTS / "cli_startup"), help="results path without extension")
    args = p.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    results = {}
    load_before = load_average()
    for name, cmd in cases().items():
        walls = []
        for _ in range(args.repeats):  # round-robin would spread the load drift; each case is a second or two
            t0 = time.perf_counter()
            subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
            walls.append(time.perf_counter() - t0)
        results[name] = {"median": round(statistics.median(walls), 3), "max": round(max(walls), 3), "all": walls}
        print(f"{name:<32} median {results[name]['median']:.3f} s, max {results[name]['max']:.3f} s", flush=True)
    record = {
        "commit": commit(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine(),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "target_seconds": TARGET_SECONDS,
        "met": all(r["max"] <= TARGET_SECONDS for n, r in results.items() if n.startswith("rewardtune")),
        "results": results,
    }
    rows = "\n".join(f"| `{n}` | {r['median']:.3f} | {r['max']:.3f} |" for n, r in results.items())
    md = f"""# CLI startup: help and version without torch

Commit `{record["commit"]}`, {record["date"]}, {record["machine"]}; load average {load_before} before,
{record["load_average_after"]} after. {args.repeats} fresh processes each. Target: every `rewardtune` line at most
{TARGET_SECONDS:g} s — **{"met" if record["met"] else "MISSED"}**.

| command | median s | max s |
|---|---|---|
{rows}
"""
    write_record(Path(args.output), record, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

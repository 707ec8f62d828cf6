"""How long ``rewardtune plan`` takes for every bundled finetune recipe, and whether it still gives the numbers it
gave before it traced one layer per stack (issue #22: at most 10 s; within 1 % of the earlier numbers).

Per recipe, two fresh ``rewardtune plan --config RECIPE --json`` processes on an empty cache directory: the first
traces (and stores its answer), the second finds it. Each records wall and CPU seconds (``/usr/bin/time``) and the
1-minute load average before it started (the machine is shared; a CPU-bound run's wall time grows with the load,
its CPU seconds much less). The peak, weights, resident bytes and trainable parameters are compared with
``results/plan_b5c763f.json``: the same command's answers at commit b5c763f, which traced every layer::

    python benchmarks/plan_speed.py      # writes benchmarks/results/plan_speed.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from checkpoint_calls import git_commit
from common import environment, write_results

from rewardtune.config import RECIPES_DIR

HERE = Path(__file__).resolve().parent
BEFORE = HERE / "results" / "plan_b5c763f.json"
KEYS = ("peak_mib", "weights_mib", "resident_mib", "trainable_params")
TARGET_SECONDS = 10.0
# Recipes changed since b5c763f: compared with the flags that give b5c763f's config, and also run as they are now.
AS_BEFORE = {"sd35m_icthp_draftk": ["--k", "1"]}  # K 1 -> 2 (issue #22)


def timed_plan(recipe: str, cache: Path, flags: list[str]) -> dict:
    """One ``rewardtune plan`` process: its answer, wall and CPU seconds, and the load before it."""
    load = os.getloadavg()[0]
    env = {**os.environ, "REWARDTUNE_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = ["/usr/bin/time", "-f", "TIME %e %U %S", sys.executable, "-m", "rewardtune.cli", "plan"]
    res = subprocess.run([*cmd, "--config", recipe, *flags, "--json"], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise SystemExit(f"plan {recipe} failed:\n{res.stderr[-3000:]}")
    wall, user, system = map(float, re.search(r"TIME ([\d.]+) ([\d.]+) ([\d.]+)", res.stderr).groups())
    pred = json.loads(res.stdout)["prediction"]
    return {"load_before": load, "wall_s": wall, "cpu_s": user + system, **{k: pred[k] for k in KEYS}}


def report(data: dict) -> str:
    env = data["env"]
    lines = [
        "# `rewardtune plan` for the bundled recipes: time and numbers",
        "",
        f"Commit `{data['commit']}`, {env['date']}, {env['cpu']} ({env['cpu_count']} cores, shared with other "
        f"jobs: the load average before each run is shown), torch {env['versions']['torch']}, one torch thread. "
        "`python benchmarks/plan_speed.py`. First run: an empty cache (the trace); second: the same command again "
        f"(the cached answer). Target: at most {TARGET_SECONDS:g} s. Before: the same command's answers at b5c763f "
        "(every layer traced; `results/plan_b5c763f.json`).",
        "",
        "| recipe | first run: wall s (CPU s, load) | second run: wall s (CPU s, load) | at b5c763f: wall s (CPU s) "
        "| peak GiB | peak vs b5c763f | weights, resident, trainable vs b5c763f |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in data["records"]:
        first, second, before = r["first"], r["second"], r["before"]
        name = " ".join([f"`{r['recipe']}`", *r["flags"]])
        if before:
            same = "equal" if all(first[k] == before[k] for k in KEYS[1:]) else "DIFFER"
            was = f"{before['wall_s']:.1f} ({before['cpu_s']:.1f})"
            vs = f"{first['peak_mib'] / before['peak_mib'] - 1:+.4%}"
        else:
            same, was, vs = "-", "- (changed since)", "-"
        lines.append(
            f"| {name} | {first['wall_s']:.1f} ({first['cpu_s']:.1f}, {first['load_before']:.1f}) "
            f"| {second['wall_s']:.1f} ({second['cpu_s']:.1f}, {second['load_before']:.1f}) "
            f"| {was} | {first['peak_mib'] / 1024:.2f} | {vs} | {same} |"
        )
    compared = [r for r in data["records"] if r["before"]]
    firsts = [r["first"]["wall_s"] for r in data["records"]]
    seconds = [r["second"]["wall_s"] for r in data["records"]]
    lines += [
        "",
        f"- First runs: {min(firsts):.0f}-{max(firsts):.0f} s wall; within {TARGET_SECONDS:g} s: "
        f"{sum(x <= TARGET_SECONDS for x in firsts)} of {len(firsts)}. Second runs: {min(seconds):.1f}-"
        f"{max(seconds):.1f} s; within {TARGET_SECONDS:g} s: {sum(x <= TARGET_SECONDS for x in seconds)} of "
        f"{len(seconds)}.",
        "- Largest peak difference from b5c763f: "
        f"{max(abs(r['first']['peak_mib'] / r['before']['peak_mib'] - 1) for r in compared):.4%} "
        f"({len(compared)} runs compared).",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(HERE / "results" / "plan_speed"), help="results path without suffix")
    p.add_argument("--recipes", nargs="*", help="recipe names (default: every bundled finetune recipe)")
    args = p.parse_args(argv)
    recipes = args.recipes or sorted(x.stem for x in RECIPES_DIR.glob("*.yaml") if not x.stem.startswith("train_"))
    before = json.loads(BEFORE.read_text())["records"]
    data = {"commit": git_commit(), "env": environment(), "records": []}
    runs = [(r, AS_BEFORE.get(r, []), True) for r in recipes] + [(r, [], False) for r in recipes if r in AS_BEFORE]
    for recipe, flags, compare in runs:
        cache = Path(tempfile.mkdtemp(prefix="rewardtune-plan-cache-"))
        first, second = timed_plan(recipe, cache, flags), timed_plan(recipe, cache, flags)
        old = before[recipe] if compare else None
        data["records"].append({"recipe": recipe, "flags": flags, "first": first, "second": second, "before": old})
        print(recipe, flags, first["wall_s"], second["wall_s"], flush=True)
        write_results(args.out, data, report)
    print(Path(args.out + ".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

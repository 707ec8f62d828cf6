#!/usr/bin/env python
"""Validate the hacking monitors (issue 24) in the demo world, where the oracle says what really happened.

Runs ``rewardtune demo`` once per (reward, seed) with the monitors on and not stopping (``--eval-every 25``, two
seeds per held-out prompt), at most ``--jobs`` at a time with ``--threads 1`` each, then reads every run's
evaluations back from its ``finetune/metrics.jsonl`` and compares when each monitor first tripped with when
the oracle first fell. Writes ``benchmarks/results/hacking_monitors.{json,md}`` after each finished run.

Definitions (one evaluation = the 64 held-out prompts, the oracle reading the first seed's images):

- the oracle *fell* at the first evaluation after step 0 where background right is 0.15 or more below its
  step-0 value (the demo's ``ATTRIBUTE_DROP``, ~2.5 standard errors on 64 prompts) or the oracle's mean score
  is 0.05 or more below its step-0 value;
- a run *collapsed* when background right at its last evaluation is 0.15 or more below step 0's while the
  trained reward rose (the demo's own sign of the one-colour background);
- a run is *fine* when the oracle never fell;
- a monitor *fired in time* on a run whose oracle fell when it first tripped at an earlier evaluation.

    python benchmarks/hacking_monitors.py                      # the default 8 runs, 2 at a time
    python benchmarks/hacking_monitors.py --analyze-only       # re-read the run directories, rewrite the results
    python benchmarks/hacking_monitors.py --monitor-saturation 0.08 --analyze-only   # other thresholds
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rewardtune.finetune.config import FinetuneConfig  # noqa: E402
from rewardtune.finetune.monitors import MONITORS, Thresholds, Watch  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "hacking_monitors"
RUNS = ["clip:0", "icthp:0", "pickscore:0", "icthp:1", "icthp:2", "icthp:3", "icthp:4", "icthp:5"]
BACKGROUND_DROP = 0.15
ORACLE_DROP = 0.05


def commit() -> str:
    """The commit measured (``+dirty`` when the tree differs); a copy outside git (``git archive``) names it in
    ``REWARDTUNE_COMMIT``."""
    if os.environ.get("REWARDTUNE_COMMIT"):
        return os.environ["REWARDTUNE_COMMIT"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "-uno"], cwd=ROOT, capture_output=True, text=True).stdout
    return head + ("+dirty" if dirty.strip() else "")


def run_name(spec: str) -> str:
    reward, seed = spec.split(":")
    return f"{reward}-seed{seed}"


def command(spec: str, work: Path, args) -> list[str]:
    reward, seed = spec.split(":")
    return [
        sys.executable, "-m", "rewardtune.cli", "demo", "--output", str(work / run_name(spec)),
        "--reward", reward, "--seed", seed, "--threads", "1", "--steps", str(args.steps),
        "--eval-every", str(args.eval_every), "--eval-seeds", "2", "--overwrite", *args.extra,
    ]  # fmt: skip


def read_run(directory: Path, partial: bool = False) -> dict | None:
    """A finished run's evaluations (metrics.jsonl) and rewards, or None when it has not finished (``partial``:
    an unfinished run's evaluations so far, None when it has none past step 0)."""
    metrics = directory / "finetune" / "metrics.jsonl"
    done = (directory / "summary.json").is_file()
    if not done and not (partial and metrics.is_file()):
        return None
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    evals = [{k: v for k, v in r.items() if k != "kind"} for r in rows if r["kind"] == "eval"]
    if not done:
        if len(evals) < 2:
            return None
        return {
            "evals": evals,
            "seconds": None,
            "reward_before": evals[0]["reward"],
            "reward_after": evals[-1]["reward"],
        }
    summary = json.loads((directory / "summary.json").read_text())
    return {
        "evals": evals,
        "seconds": summary.get("seconds"),
        "reward_before": summary["reward_before"],
        "reward_after": summary["reward_after"],
    }


def analyze(spec: str, run: dict, thresholds: Thresholds) -> dict:
    evals = sorted(run["evals"], key=lambda e: e["step"])
    base = evals[0]
    watch = Watch(thresholds)
    for e in evals:
        watch.observe(e["step"], e)
    trips = {n: t.step for n, t in watch.first_trips.items()}
    bg0, or0 = base["oracle_background"], base["oracle"]
    fell = next(
        (
            e["step"]
            for e in evals[1:]
            if e["oracle_background"] <= bg0 - BACKGROUND_DROP or e["oracle"] <= or0 - ORACLE_DROP
        ),
        None,
    )
    last = evals[-1]
    collapsed = last["oracle_background"] <= bg0 - BACKGROUND_DROP and run["reward_after"] > run["reward_before"]
    first_trip = min(trips.values()) if trips else None
    return {
        "run": run_name(spec),
        "steps": [e["step"] for e in evals],
        "oracle": [e["oracle"] for e in evals],
        "background": [e["oracle_background"] for e in evals],
        "reward": [e["reward"] for e in evals],
        "monitors": {n: [e.get(n) for e in evals] for n in MONITORS},
        "eval_reward_std": [e.get("eval_reward_std") for e in evals],
        "limits": watch.limits(),
        "first_trip": trips,
        "first_trip_any": first_trip,
        "oracle_fell": fell,
        "collapsed": collapsed,
        "fine": fell is None,
        "in_time": fell is not None and first_trip is not None and first_trip < fell,
        "seconds": run["seconds"],
    }


def fmt(x, digits=3):
    return "—" if x is None else f"{x:.{digits}f}"


def write(
    results: list[dict], specs: list[str], thresholds: Thresholds, args, started: str, partial: list[dict] = ()
) -> None:
    hacked = [r for r in results if not r["fine"]]
    collapsed = [r for r in results if r["collapsed"]]
    fine = [r for r in results if r["fine"]]
    in_time = [r for r in hacked if r["in_time"]]
    collapse_in_time = [r for r in collapsed if r["in_time"]]
    alarms = [r for r in fine if r["first_trip"]]
    lines = [
        "# Hacking monitors in the demo world (issue 24)",
        "",
        f"Commit `{commit()}`, started {started}, written {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; "
        f"x86_64, {os.cpu_count()} CPUs shared with other work. Each run: `rewardtune demo --reward R --seed S "
        f"--threads 1 --steps {args.steps} --eval-every {args.eval_every} --eval-seeds 2` (the demo's other "
        f"defaults: batch 8, lr 1e-3, K = all 6 DDIM steps, guidance 1.0, 64 held-out prompts), the monitors on, "
        f"not stopping; {args.jobs} runs at a time.",
        "",
        f"N = {len(results)} finished of {len(specs)} planned ({', '.join(run_name(s) for s in specs)}).",
        "",
        "Thresholds (relative to each run's step-0 evaluation): "
        + ", ".join(f"{n} {getattr(thresholds, n)}" for n in MONITORS)
        + " (saturation and similarities: rise; hf_energy: times the base; eval_reward: fall in base standard "
        "deviations of the per-image held-out CLIP).",
        "",
        f"- oracle fell (background right down >= {BACKGROUND_DROP} or oracle mean down >= {ORACLE_DROP} from "
        f"step 0, at some evaluation): {len(hacked)} of {len(results)} runs; a monitor fired at an earlier "
        f"evaluation on {len(in_time)} of them",
        f"- collapsed (background right down >= {BACKGROUND_DROP} at the end while the trained reward rose): "
        f"{len(collapsed)} of {len(results)}; a monitor fired before the oracle fell on {len(collapse_in_time)} of them",
        f"- fine (the oracle never fell): {len(fine)} of {len(results)}; any monitor fired (a false alarm) on "
        f"{len(alarms)} of them",
        "",
        "| run | oracle 0 → end | background right 0 → end | oracle fell at | collapsed | first trip per monitor | "
        "in time | s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        trips = ", ".join(f"{n} @{s}" for n, s in sorted(r["first_trip"].items(), key=lambda x: x[1])) or "none"
        lines.append(
            f"| {r['run']} | {fmt(r['oracle'][0])} → {fmt(r['oracle'][-1])} | {fmt(r['background'][0], 2)} → "
            f"{fmt(r['background'][-1], 2)} | {r['oracle_fell'] if r['oracle_fell'] is not None else 'never'} | "
            f"{'yes' if r['collapsed'] else 'no'} | {trips} | "
            f"{'yes' if r['in_time'] else ('—' if r['fine'] else 'no')} | {fmt(r['seconds'], 0)} |"
        )
    if partial:
        lines += [
            "",
            "Unfinished when this was written (not counted above; their evaluations so far):",
            "",
            "| run | evaluated up to step | oracle | background right | first trip per monitor |",
            "|---|---|---|---|---|",
        ]
        for r in partial:
            trips = ", ".join(f"{n} @{s}" for n, s in sorted(r["first_trip"].items(), key=lambda x: x[1])) or "none"
            lines.append(
                f"| {r['run']} | {r['steps'][-1]} | {fmt(r['oracle'][0])} → {fmt(r['oracle'][-1])} | "
                f"{fmt(r['background'][0], 2)} → {fmt(r['background'][-1], 2)} | {trips} |"
            )
    lines += ["", "## Curves (each evaluation, steps as listed)", ""]
    for r in [*results, *partial]:
        lines.append(f"**{r['run']}** (steps {' '.join(map(str, r['steps']))})")
        lines.append("")
        lines.append("| measure | values | limit |")
        lines.append("|---|---|---|")
        lines.append(f"| oracle | {' '.join(fmt(v) for v in r['oracle'])} | |")
        lines.append(f"| background right | {' '.join(fmt(v, 2) for v in r['background'])} | |")
        lines.append(f"| trained reward | {' '.join(fmt(v) for v in r['reward'])} | |")
        for n in MONITORS:
            lines.append(f"| {n} | {' '.join(fmt(v) for v in r['monitors'][n])} | {fmt(r['limits'].get(n))} |")
        lines.append("")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    record = {
        "commit": commit(),
        "started": started,
        "thresholds": vars(thresholds),
        "runs": results,
        "unfinished": list(partial),
    }
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", default=RUNS, help="reward:seed pairs")
    p.add_argument("--work", default="/tmp/hacking-monitors", help="where the demo runs write (kept)")
    p.add_argument("--output", default=str(RESULTS), help="results path without suffix")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--extra", nargs="*", default=[], help="more demo options (a quick check: --eval-size 8 ...)")
    p.add_argument(
        "--analyze-only", action="store_true", help="run nothing; read the runs in --work (unfinished ones apart)"
    )
    p.add_argument("--started", help="--analyze-only: when the runs were started (for the record)")
    defaults = Thresholds.from_config(FinetuneConfig())
    for n in MONITORS:
        p.add_argument(f"--monitor-{n.replace('_', '-')}", type=float, default=getattr(defaults, n))
    args = p.parse_args()
    thresholds = Thresholds(**{n: getattr(args, f"monitor_{n}") for n in MONITORS})
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    started = args.started or f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

    def finished() -> list[dict]:
        out = []
        for spec in args.runs:
            run = read_run(work / run_name(spec))
            if run is not None:
                out.append(analyze(spec, run, thresholds))
        return out

    if not args.analyze_only:
        todo = [s for s in args.runs if read_run(work / run_name(s)) is None]
        running: dict[str, subprocess.Popen] = {}
        while todo or running:
            while todo and len(running) < args.jobs:
                spec = todo.pop(0)
                log = open(work / f"{run_name(spec)}.log", "w")  # noqa: SIM115 - open while the run goes
                running[spec] = subprocess.Popen(
                    command(spec, work, args), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT
                )
                print(f"started {run_name(spec)}", flush=True)
            time.sleep(10)
            for spec, proc in list(running.items()):
                if proc.poll() is not None:
                    del running[spec]
                    print(f"{run_name(spec)} ended with {proc.returncode}", flush=True)
                    write(finished(), args.runs, thresholds, args, started)
    partial = [
        analyze(s, run, thresholds)
        for s in args.runs
        if read_run(work / run_name(s)) is None and (run := read_run(work / run_name(s), partial=True)) is not None
    ]
    write(finished(), args.runs, thresholds, args, started, partial)
    print(Path(args.output).with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

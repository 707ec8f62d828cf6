#!/usr/bin/env python
"""The demo's default thread setting against --threads 1 on a busy CPU, and against the setting before issue #26
(two OpenMP threads that spin while they wait) on a quieter one. Records benchmarks/results/threads.{json,md}.

Targets (issue #26): on a machine whose cores other work uses, the default demo within 1.5x of ``--threads 1``
there; on an idle one, no slower than before. Each run is a short demo (``--steps`` steps, ``--eval-size`` held-out
prompts; the default demo's batch, K and sampling otherwise), a fresh process as a user starts it; the settings are
alternated run by run within each phase, so the load drifts evenly over them:

- ``default``: what ``rewardtune demo`` does now (no ``--threads``, no ``OMP_NUM_THREADS``: the thread count chosen
  from the cores and their load, waiting threads asleep);
- ``threads1``: ``--threads 1``;
- ``before``: ``--threads 2`` with libgomp's own spin-wait (``GOMP_SPINCOUNT=300000``, its default when no wait
  policy is set), the default before issue #26.

The busy phase starts ``--burners`` CPU-burning processes of its own (each a Python loop with a deadline, killed at
the end of the phase), on top of whatever else the machine runs; the quiet phase starts none. The load averages
before each run are recorded: on a shared machine "quiet" means only what the others ran then.

    python benchmarks/threads.py                       # ~20-40 minutes on 2 busy cores
    python benchmarks/threads.py --rounds 2 --steps 10 --phases busy
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_targets import commit, load_average, write_record  # noqa: E402

from rewardtune.demo.build import machine  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SETTINGS = {
    "default": ([], {}),
    "threads1": (["--threads", "1"], {}),
    "before": (["--threads", "2"], {"GOMP_SPINCOUNT": "300000"}),
}
LABELS = {"default": "default", "threads1": "--threads 1", "before": "before #26"}
BURN = "import sys, time\nend = time.time() + float(sys.argv[1])\nwhile time.time() < end:\n    pass\n"


def environment(extra: dict) -> dict:
    """This environment, offline, without the thread variables a run's setting decides."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    return {**env, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": "", **extra}


def one_run(setting: str, steps: int, eval_size: int) -> dict:
    args, extra = SETTINGS[setting]
    with tempfile.TemporaryDirectory(prefix="threads-bench-") as tmp:
        cmd = [sys.executable, "-m", "rewardtune.cli", "demo", "--output", f"{tmp}/demo", "--steps", str(steps)]
        cmd += ["--eval-every", "0", "--eval-size", str(eval_size), "--train-prompts", "64", *args]
        load, cpu0, t0 = load_average(), resource.getrusage(resource.RUSAGE_CHILDREN), time.time()
        done = subprocess.run(cmd, env=environment(extra), capture_output=True, text=True)
        wall = time.time() - t0
        cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        raise SystemExit(f"{setting}: rewardtune demo failed:\n{done.stderr[-3000:]}")
    used = re.search(r"; (\d+) torch threads? \(([^)]*)\)", done.stdout)
    return {
        "setting": setting,
        "wall_seconds": round(wall, 2),
        "cpu_seconds": round(cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime, 2),
        "threads": int(used.group(1)) if used else None,
        "why": used.group(2) if used else None,
        "load_average_before": load,
    }


def phase(
    name: str, settings: list[str], burners: int, rounds: int, steps: int, eval_size: int, settle: float
) -> list[dict]:
    procs = []
    if burners:
        budget = 3600 * 3  # a hard end for the burners, whatever happens to this process
        procs = [subprocess.Popen([sys.executable, "-c", BURN, str(budget)]) for _ in range(burners)]
        time.sleep(settle)  # the 1-minute load average the default reads catches up with the burners
    runs = []
    try:
        for r in range(rounds):
            order = settings if r % 2 == 0 else settings[::-1]
            for setting in order:
                run = {"phase": name, "round": r, "burners": burners, **one_run(setting, steps, eval_size)}
                runs.append(run)
                print(json.dumps(run), flush=True)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    return runs


def summarise(runs: list[dict]) -> dict:
    out = {}
    for name in dict.fromkeys(r["phase"] for r in runs):
        walls = {s: [r["wall_seconds"] for r in runs if r["phase"] == name and r["setting"] == s] for s in SETTINGS}
        med = {s: statistics.median(w) for s, w in walls.items() if w}
        out[name] = {
            "median_wall_seconds": med,
            **{
                f"default_over_{other}": round(med["default"] / med[other], 3)
                for other in ("threads1", "before")
                if "default" in med and other in med
            },
            "loads": [r["load_average_before"][0] for r in runs if r["phase"] == name],
            "default_threads": sorted(
                {r["threads"] for r in runs if r["phase"] == name and r["setting"] == "default"}
            ),
        }
    return out


def markdown(record: dict) -> str:
    s = record["summary"]
    rows = "\n".join(
        f"| {r['phase']} | {r['round']} | {r['setting']} | {r['threads']} ({r['why']}) | {r['wall_seconds']:.1f} | "
        f"{r['cpu_seconds']:.1f} | {r['load_average_before'][0]:.2f} |"
        for r in record["runs"]
    )
    lines = []
    for name, p in s.items():
        m = p["median_wall_seconds"]
        walls = ", ".join(f"{LABELS[k]} {v:.1f} s" for k, v in m.items())
        ratios = ", ".join(
            f"default / {LABELS[k.split('_over_')[1]]} = **{v:.2f}**" for k, v in p.items() if "_over_" in k
        )
        lines.append(
            f"- **{name}** (load {min(p['loads']):.1f}-{max(p['loads']):.1f}; the default chose "
            f"{'/'.join(map(str, p['default_threads']))} thread(s)): median wall {walls}: {ratios}"
        )
    c = record["config"]
    return f"""# Threads: the default against --threads 1 and against the setting before issue #26

Commit `{record["commit"]}`, {record["date"]}, {record["machine"]}. Each run: `rewardtune demo --steps {c["steps"]}
--eval-every 0 --eval-size {c["eval_size"]} --train-prompts 64` (otherwise the default demo: batch 8, K = 6, guidance
1.0) in a fresh process; settings alternated within each phase (busy: {", ".join(c["busy_settings"])}; quiet:
{", ".join(c["quiet_settings"])}), {c["rounds"]} rounds; the busy phase ran
{c["burners"]} CPU burners of its own besides the machine's other work. Targets: busy, default / --threads 1 at most
1.5; quiet, default / before at most 1.0 (within the noise of a shared machine).

{chr(10).join(lines)}

| phase | round | setting | torch threads | wall s | CPU s | load before |
|---|---|---|---|---|---|---|
{rows}
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3, help="runs of each setting per phase")
    p.add_argument("--steps", type=int, default=20, help="demo steps per run")
    p.add_argument("--eval-size", type=int, default=16, help="held-out prompts evaluated before and after")
    p.add_argument("--burners", type=int, default=2, help="CPU-burning processes of the busy phase")
    p.add_argument("--settle", type=float, default=60.0, help="seconds the burners run before the first run")
    p.add_argument("--phases", nargs="+", default=["busy", "quiet"], choices=["busy", "quiet"])
    for name, default in (("busy", ["default", "threads1", "before"]), ("quiet", ["default", "threads1", "before"])):
        p.add_argument(f"--{name}-settings", nargs="+", default=default, choices=list(SETTINGS))
    p.add_argument("--output", default=str(RESULTS / "threads"), help="results path without extension")
    args = p.parse_args()
    runs = []
    for name in args.phases:
        burners = args.burners if name == "busy" else 0
        settings = getattr(args, f"{name}_settings")
        runs += phase(name, settings, burners, args.rounds, args.steps, args.eval_size, args.settle)
    record = {
        "commit": commit(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine(),
        "cpu_count": os.cpu_count(),
        "config": {
            k: getattr(args, k)
            for k in ("rounds", "steps", "eval_size", "burners", "settle", "phases", "busy_settings", "quiet_settings")
        },
        "summary": summarise(runs),
        "runs": runs,
    }
    write_record(Path(args.output), record, markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())

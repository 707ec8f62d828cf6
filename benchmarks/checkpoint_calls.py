"""Peak memory and step time against K, with and without whole-call checkpointing (issue #13).

Each configuration is a real ``rewardtune finetune`` process under ``/usr/bin/time -v`` (peak RSS is per
process), on the tiny SD 1.x pipeline whose sizes are committed beside this script
(``configs/checkpoint_calls_pipeline.json``: UNet 32/64 channels, a 2-block VAE, so 32x32 latents at 64 px:
1024-token attention like a real model's) and the tiny ICT-HP reward of ``rewardtune.testing``::

    python benchmarks/checkpoint_calls.py            # writes benchmarks/results/checkpoint_calls.{json,md}

Step time is the median wall time of the optimizer steps after the first (``metrics.jsonl``); the processes
run one at a time. Targets: peak RSS at K=20 at most 1.15x K=1 with checkpointing on; K=1 no slower than
without whole-call checkpointing (at K=1 no call is checkpointed, so the code path is the same).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, environment  # noqa: F401  (puts the repository on sys.path)

from rewardtune.testing import save_tiny_pipeline, write_tiny_reward_world

HERE = Path(__file__).resolve().parent
PIPELINE = json.loads((HERE / "configs" / "checkpoint_calls_pipeline.json").read_text())
# The setting of the issue's measurement: 20 DDIM steps with guidance 5 and eta 1, batch 2, LoRA rank 4, fp32.
SETTING = [
    "--sample-steps",
    "20",
    "--guidance-scale",
    "5",
    "--eta",
    "1",
    "--batch-size",
    "2",
    "--lora-rank",
    "4",
    "--lora-alpha",
    "4",
    "--mixed-precision",
    "no",
    "--resolution",
    "64",
    "--eval-every",
    "0",
    "--eval-size",
    "1",
    "--checkpoint-every",
    "0",
    "--prompts",
    "builtin:simple",
]
CONFIGS = [  # (K, whole-call checkpointing, the model's block checkpointing)
    (1, True, True),
    (20, True, True),
    (1, False, True),
    (20, False, True),
    (1, False, False),
    (20, False, False),
    (20, True, False),
]


def git_commit() -> str:
    out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
    ).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")


def run_one(work: Path, model: Path, world: Path, k: int, calls: bool, blocks: bool, steps: int) -> dict:
    out = work / f"k{k}_calls{int(calls)}_blocks{int(blocks)}"
    cmd = [
        "/usr/bin/time",
        "-v",
        sys.executable,
        "-m",
        "rewardtune.cli",
        "finetune",
        "--model",
        str(model),
        "--output",
        str(out),
        "--reward",
        "icthp",
        "--ict",
        str(world / "ict"),
        "--hp",
        str(world / "hp"),
        "--backbone",
        str(world / "backbone"),
        "--k",
        str(k),
        "--steps",
        str(steps),
        *SETTING,
        "--checkpoint-calls" if calls else "--no-checkpoint-calls",
        "--gradient-checkpointing" if blocks else "--no-gradient-checkpointing",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=work)
    if res.returncode != 0:
        raise SystemExit(f"finetune failed ({k=}, {calls=}, {blocks=}):\n{res.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", res.stderr).group(1))
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    times = [x["step_time"] for x in lines if x["kind"] == "train"][1:]
    return {
        "k": k,
        "checkpoint_calls": calls,
        "gradient_checkpointing": blocks,
        "peak_rss_mb": rss_kb / 1024,
        "step_seconds_median": statistics.median(times),
        "step_seconds": times,
    }


def report(records: list[dict], meta: dict) -> str:
    by = {(r["k"], r["checkpoint_calls"], r["gradient_checkpointing"]): r for r in records}
    lines = [
        "# Whole-call checkpointing: peak RSS and step time against K (issue #13)",
        "",
        f"Commit `{meta['commit']}`, {meta['env']['date']}, {meta['env']['cpu']} ({meta['env']['cpu_count']} cores), "
        f"torch {meta['env']['versions']['torch']}. `python benchmarks/checkpoint_calls.py`; tiny SD 1.x "
        f"({json.dumps(PIPELINE)}), 64 px, 20 DDIM steps, guidance 5, eta 1, batch 2, LoRA rank 4, fp32, tiny ICT-HP, "
        f"{meta['steps']} optimizer steps per process.",
        "",
        "| K | whole-call checkpointing | block checkpointing | peak RSS (MB) | step (s, median) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in records:
        lines.append(
            f"| {r['k']} | {'on' if r['checkpoint_calls'] else 'off'} | {'on' if r['gradient_checkpointing'] else 'off'} "
            f"| {r['peak_rss_mb']:.0f} | {r['step_seconds_median']:.2f} |"
        )
    on1, on20 = by.get((1, True, True)), by.get((20, True, True))
    off1, off20 = by.get((1, False, True)), by.get((20, False, True))
    lines.append("")
    if on1 and on20:
        ratio = on20["peak_rss_mb"] / on1["peak_rss_mb"]
        lines.append(
            f"- Peak RSS K=20 / K=1 with both checkpointings: **{ratio:.3f}** (target <= 1.15: "
            f"{'met' if ratio <= 1.15 else 'MISSED'})."
        )
    if off1 and off20:
        lines.append(
            f"- Without whole-call checkpointing (as before): K=20 / K=1 = {off20['peak_rss_mb'] / off1['peak_rss_mb']:.3f}."
        )
    if on1 and off1:
        t = on1["step_seconds_median"] / off1["step_seconds_median"]
        lines.append(f"- Step time at K=1, on / off: {t:.3f} (the same code path: no call is checkpointed at K=1).")
    if on20 and off20:
        lines.append(
            f"- Step time at K=20, on / off: {on20['step_seconds_median'] / off20['step_seconds_median']:.3f} "
            f"(the recomputation of 19 calls)."
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per process (the first is not timed)")
    p.add_argument("--out", default=str(HERE / "results" / "checkpoint_calls"), help="results path without suffix")
    p.add_argument(
        "--quick", action="store_true", help="only K=1 and K=20 with both checkpointings, and K=20 without calls"
    )
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="rewardtune-ckpt-calls-"))
    model = save_tiny_pipeline(
        work / "pipe", "sd", seed=0, **{k: tuple(v) if isinstance(v, list) else v for k, v in PIPELINE.items()}
    )
    world = write_tiny_reward_world(work / "reward")
    meta = {"commit": git_commit(), "env": environment(), "steps": args.steps}
    records = []
    configs = [(1, True, True), (20, True, True), (20, False, True)] if args.quick else CONFIGS
    for k, calls, blocks in configs:
        records.append(run_one(work, model, world, k, calls, blocks, args.steps))
        print(json.dumps(records[-1]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(
        json.dumps({**meta, "pipeline": PIPELINE, "setting": SETTING, "records": records}, indent=2)
    )
    Path(args.out + ".md").write_text(report(records, meta))
    print(report(records, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Peak memory and step time against K, with and without whole-call checkpointing (issue #13), and --compile.

Each configuration is a real ``rewardtune finetune`` process under ``/usr/bin/time -v`` (peak RSS is per
process), on the tiny SD 1.x pipeline whose sizes are committed beside this script
(``configs/checkpoint_calls_pipeline.json``: UNet 32/64 channels, a 2-block VAE, so 32x32 latents at 64 px:
1024-token attention like a real model's) and the tiny ICT-HP reward of ``rewardtune.testing``, or with
``--family sd3|flux`` on the tiny SD3.5-Medium-like or FLUX.1-dev-like pipeline of ``rewardtune.testing`` at 128 px
(SD3: 16x16 latents, 256 image tokens; FLUX: 64 packed tokens), the Euler sampler (no eta), T5 prompts of 64
tokens::

    python benchmarks/checkpoint_calls.py --quick --compile   # writes benchmarks/results/checkpoint_calls.{json,md}
    python benchmarks/checkpoint_calls.py --quick --family sd3  # -> benchmarks/results/checkpoint_calls_sd3.*

Per configuration it records

- peak RSS twice: under glibc malloc's defaults, and with ``MALLOC_MMAP_THRESHOLD_=131072`` (every block of
  128 KiB or more is its own mapping, returned to the system when freed; the default raises that threshold
  as large blocks are freed, after which they come from the heap, whose freed space stays resident unless
  handed back: since 8b02241 each checkpointed call does so first, ``rewardtune/finetune/host_heap.py``);
- the peak of live tensor storage over one optimizer step (a process of its own: ``finetune_step``'s
  ``tracked_peak_mib``, counted as the planner counts), which is what K costs, free of the allocator;
- the planner's predictions: ``rewardtune plan --json`` (its default GPU target) and
  ``predict_peak_memory(target="cpu")`` (CPU kernels, no allocator rounding: like for like with the count);
- the step time: the median wall time of the CLI's optimizer steps after the first (``metrics.jsonl``), and
  the CPU seconds of two steps after a warm-up one in the live-count process (one torch thread: on a shared
  machine the CPU seconds hold where wall times do not); the configurations run one at a time, in reversed
  order on every other round (``--repeats``);
- with ``--compile``: no CLI run (memory is the eager step's), the live-count process's step CPU seconds, its
  first step (the compilation, from an empty inductor cache) and its losses against the eager run's.

Targets: peak RSS at K=20 at most 1.15x K=1 with checkpointing on; K=1 no slower than without whole-call
checkpointing (at K=1 no call is checkpointed, so the code path is the same).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, environment  # noqa: F401  (puts the repository on sys.path)
from finetune_step import tracked_peak_mib

from rewardtune.config import add_config_args, build_config
from rewardtune.finetune.config import FinetuneConfig
from rewardtune.finetune.trainer import Trainer
from rewardtune.plan import predict_peak_memory
from rewardtune.testing import save_tiny_flow_pipeline, save_tiny_pipeline, write_tiny_reward_world

HERE = Path(__file__).resolve().parent
PIPELINE = json.loads((HERE / "configs" / "checkpoint_calls_pipeline.json").read_text())
# The setting of the measurement: 20 DDIM steps with guidance 5 and eta 1, batch 2, LoRA rank 4, fp32.
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
    "2",
    "--checkpoint-every",
    "0",
    "--prompts",
    "builtin:simple",
]
# (K, whole-call checkpointing, the model's block checkpointing, --compile)
CONFIGS = [
    (1, True, True, False),
    (20, True, True, False),
    (1, False, True, False),
    (20, False, True, False),
    (1, False, False, False),
    (20, False, False, False),
    (20, True, False, False),
]
QUICK = [(1, True, True, False), (1, False, True, False), (20, True, True, False), (20, False, True, False)]
COMPILED = [(1, True, True, True), (20, True, True, True)]
# The flow families: the same setting on their own sampler (Euler: no eta) and model size.
_ETA = SETTING.index("--eta")
FLOW_SETTING = [*SETTING[:_ETA], *SETTING[_ETA + 2 :], "--max-sequence-length", "64"]
FLOW_SETTING[FLOW_SETTING.index("--resolution") + 1] = "128"
FAMILIES = {"sd": "tiny SD 1.x", "sd3": "tiny SD3.5-Medium-like", "flux": "tiny FLUX.1-dev-like"}
ALLOCATORS = {"default": {}, "mmap_threshold": {"MALLOC_MMAP_THRESHOLD_": "131072"}}
ENV = {
    "OMP_NUM_THREADS": "1",
    "OMP_WAIT_POLICY": "PASSIVE",  # rewardtune.threads: waiting threads sleep on a shared CPU
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "CUDA_VISIBLE_DEVICES": "",
}


def git_commit() -> str:
    out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
    ).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")


def finetune_flags(
    model: Path, world: Path, k: int, calls: bool, blocks: bool, compiled: bool, family: str = "sd"
) -> list[str]:
    """The ``rewardtune finetune`` flags of one configuration (``--output`` and ``--steps`` aside)."""
    return [
        "--model",
        str(model),
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
        *(SETTING if family == "sd" else FLOW_SETTING),
        "--checkpoint-calls" if calls else "--no-checkpoint-calls",
        "--gradient-checkpointing" if blocks else "--no-gradient-checkpointing",
        "--compile" if compiled else "--no-compile",
    ]


def _run(cmd: list[str], what: str, env: dict | None = None, cwd: Path | None = None):
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env={**os.environ, **ENV, **(env or {})})
    if res.returncode != 0:
        raise SystemExit(f"{what} failed:\n{res.stderr[-3000:]}")
    return res


def run_cli(work: Path, flags: list[str], steps: int, allocator: str) -> dict:
    """Peak RSS and step times of one ``rewardtune finetune`` process."""
    out = Path(tempfile.mkdtemp(prefix="run-", dir=work)) / "out"
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "rewardtune.cli", "finetune", "--output", str(out)]
    res = _run([*cmd, "--steps", str(steps), *flags], f"finetune {flags}", ALLOCATORS[allocator], work)
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", res.stderr).group(1))
    h, m, sec = ([0, 0] + re.search(r"Elapsed \(wall clock\) time.*: ([\d:.]+)", res.stderr).group(1).split(":"))[-3:]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    times = [x["step_time"] for x in lines if x["kind"] == "train"]
    return {
        "peak_rss_mb": rss_kb / 1024,
        "first_step_seconds": times[0],
        "step_seconds": times[1:],
        "losses": [x["loss"] for x in lines if x["kind"] == "train"],
        "process_seconds": 3600 * float(h) + 60 * float(m) + float(sec),
        "process_cpu_seconds": sum(
            float(re.search(rf"{kind} time \(seconds\): ([\d.]+)", res.stderr).group(1)) for kind in ("User", "System")
        ),
    }


def live_and_predicted(flags: list[str]) -> dict:
    """Run in a process of its own (``--live``): the live tensor peak of one optimizer step after a warm-up step,
    and the planner's CPU-target prediction of the same config."""
    parser = argparse.ArgumentParser()
    add_config_args(parser, FinetuneConfig, skip=("output", "steps"))
    cfg = build_config(FinetuneConfig, parser.parse_args(flags), output=tempfile.mkdtemp(), steps=10)
    out = {}
    if not cfg.compile:
        out["predicted_cpu_mib"] = predict_peak_memory(dataclasses.replace(cfg), target="cpu")["peak_mib"]
    trainer = Trainer(cfg)
    cpu, wall, losses = [], [], []
    for _ in range(3):  # the first warms up (compiles); the optimizer's states exist after it, as at every later step
        start, start_cpu = time.perf_counter(), time.process_time()
        losses.append(trainer.step()["loss"])
        cpu.append(time.process_time() - start_cpu)
        wall.append(time.perf_counter() - start)
    out.update(first_step_cpu_seconds=cpu[0], first_step_wall_seconds=wall[0], step_cpu_seconds=cpu[1:], losses=losses)
    if not cfg.compile:  # a compiled step keeps the eager step's tensors
        out["peak_tensor_mib"] = tracked_peak_mib(trainer)
    return out


def planned(flags: list[str]) -> float:
    """``rewardtune plan --json``'s peak (MiB) for the configuration: what a user is shown."""
    res = _run([sys.executable, "-m", "rewardtune.cli", "plan", "--json", *flags], f"plan {flags}")
    return json.loads(res.stdout)["prediction"]["peak_mib"]


def measure(work: Path, model: Path, world: Path, config: tuple, steps: int, runs: dict, family: str = "sd") -> None:
    """One round of one configuration; appends to ``runs[config]``."""
    flags = finetune_flags(model, world, *config, family=family)
    rec = runs.setdefault(config, {"cli": {name: [] for name in ALLOCATORS}})
    for name in [] if config[3] else ALLOCATORS:  # compiled: time, not memory, is the question (the live run)
        rec["cli"][name].append(run_cli(work, flags, steps, name))
    if "step_cpu_seconds" not in rec:
        cache = {"TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(prefix="inductor-", dir=work)}  # a cold compilation
        res = _run([sys.executable, __file__, "--live", "--", *flags], f"live tensors {flags}", cache)
        rec.update(json.loads(res.stdout.strip().splitlines()[-1]))
        if not config[3]:
            rec["plan_cli_mib"] = planned(flags)


def summarize(config: tuple, rec: dict) -> dict:
    k, calls, blocks, compiled = config
    out = {"k": k, "checkpoint_calls": calls, "gradient_checkpointing": blocks, "compile": compiled}

    def median(runs, key):
        values = [v for r in runs for v in (r[key] if isinstance(r[key], list) else [r[key]])]
        return statistics.median(values) if values else None

    default, fixed = rec["cli"]["default"], rec["cli"]["mmap_threshold"]
    out.update(
        {
            "peak_rss_mb": median(default, "peak_rss_mb"),
            "peak_rss_mb_mmap_threshold": median(fixed, "peak_rss_mb"),
            "step_seconds_median": median(default, "step_seconds"),
            "step_seconds_median_mmap_threshold": median(fixed, "step_seconds"),
            "process_seconds": median(default, "process_seconds"),
            "process_cpu_seconds": median(default, "process_cpu_seconds"),
            "runs": rec["cli"],
        }
    )
    out["step_cpu_seconds_median"] = statistics.median(rec["step_cpu_seconds"])
    for key in ("peak_tensor_mib", "predicted_cpu_mib", "plan_cli_mib", "step_cpu_seconds", "losses"):
        out[key] = rec.get(key)
    for key in ("first_step_cpu_seconds", "first_step_wall_seconds"):
        out[key] = rec.get(key)
    return out


def report(records: list[dict], meta: dict) -> str:
    by = {(r["k"], r["checkpoint_calls"], r["gradient_checkpointing"], r["compile"]): r for r in records}
    env = meta["env"]
    family = meta.get("family", "sd")
    model = (
        f"tiny SD 1.x ({json.dumps(PIPELINE)}), 64 px, 20 DDIM steps, guidance 5, eta 1"
        if family == "sd"
        else f"{FAMILIES[family]} pipeline of rewardtune.testing, 128 px, 20 Euler steps, guidance 5, T5 64 tokens"
    )
    lines = [
        f"# Whole-call checkpointing: peak memory and step time against K (issue #13; {FAMILIES[family]})",
        "",
        f"Commit `{meta['commit']}`, {env['date']}, {env['cpu']} ({env['cpu_count']} cores, shared with other jobs), "
        f"torch {env['versions']['torch']}, one torch thread. `python benchmarks/checkpoint_calls.py "
        f"{' '.join(meta['argv'])}`; {model}, "
        f"batch 2, LoRA rank 4, fp32, tiny ICT-HP, {meta['steps']} optimizer steps per process, {meta['repeats']} "
        f"round(s) of every configuration (two processes per round: the two allocator settings). Live tensors count "
        f"the models a step keeps on the accelerator, as the planner does (a flow model's cached text encoders not).",
        "",
        "| K | whole-call ckpt | block ckpt | compile | peak RSS (MB) | peak RSS, fixed mmap threshold (MB) "
        "| live tensors (MiB) | planner, CPU target (MiB) | `rewardtune plan` (MiB) | step (s, median) "
        "| step, fixed mmap threshold (s) | step (CPU s, median) | process (s, CPU s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def cell(r, key, fmt="{:.2f}"):
        return fmt.format(r[key]) if r.get(key) is not None else "-"

    for r in records:
        onoff = ["on" if r[x] else "off" for x in ("checkpoint_calls", "gradient_checkpointing", "compile")]
        lines.append(
            f"| {r['k']} | {' | '.join(onoff)} | {cell(r, 'peak_rss_mb', '{:.0f}')} "
            f"| {cell(r, 'peak_rss_mb_mmap_threshold', '{:.0f}')} "
            f"| {cell(r, 'peak_tensor_mib')} | {cell(r, 'predicted_cpu_mib')} | {cell(r, 'plan_cli_mib')} "
            f"| {cell(r, 'step_seconds_median')} | {cell(r, 'step_seconds_median_mmap_threshold')} "
            f"| {r['step_cpu_seconds_median']:.2f} | {cell(r, 'process_seconds', '{:.0f}')}, "
            f"{cell(r, 'process_cpu_seconds', '{:.0f}')} |"
        )
    lines.append("")
    on1, on20 = by.get((1, True, True, False)), by.get((20, True, True, False))
    off1, off20 = by.get((1, False, True, False)), by.get((20, False, True, False))

    def ratio(a, b, key):
        return a[key] / b[key]

    def fixed_cost(r):
        return r["step_seconds_median_mmap_threshold"] / r["step_seconds_median"]

    if on1 and on20:
        rss = ratio(on20, on1, "peak_rss_mb")
        lines += [
            f"- K=20 / K=1 with both checkpointings: peak RSS **{rss:.3f}** (target <= 1.15: "
            f"{'met' if rss <= 1.15 else 'MISSED'}); with the fixed mmap threshold "
            f"**{ratio(on20, on1, 'peak_rss_mb_mmap_threshold'):.3f}**; live tensors "
            f"**{ratio(on20, on1, 'peak_tensor_mib'):.3f}** ({on1['peak_tensor_mib']:.2f} -> "
            f"{on20['peak_tensor_mib']:.2f} MiB).",
        ]
        for r in (on1, on20):
            lines.append(
                f"- Planner at K={r['k']}: CPU target {r['predicted_cpu_mib'] / r['peak_tensor_mib'] - 1:+.2%}, "
                f"`rewardtune plan` (GPU target) {r['plan_cli_mib'] / r['peak_tensor_mib'] - 1:+.2%} against the "
                f"live tensor peak."
            )
    if off1 and off20:
        lines.append(
            f"- Without whole-call checkpointing: K=20 / K=1 peak RSS {ratio(off20, off1, 'peak_rss_mb'):.3f}, "
            f"fixed mmap threshold {ratio(off20, off1, 'peak_rss_mb_mmap_threshold'):.3f}, live tensors "
            f"{ratio(off20, off1, 'peak_tensor_mib'):.3f}."
        )
    if on1 and on20:
        lines.append(
            f"- The fixed mmap threshold's price in time: step {fixed_cost(on1):.2f}x the default's at K=1, "
            f"{fixed_cost(on20):.2f}x at K=20 "
            f"(every large block is a fresh mapping the kernel zeroes)."
        )
    if on1 and off1:
        lines.append(
            f"- Step time at K=1, whole-call checkpointing on / off: {ratio(on1, off1, 'step_cpu_seconds_median'):.3f} "
            f"in CPU seconds, {ratio(on1, off1, 'step_seconds_median'):.3f} in wall seconds (the same code path: no "
            f"call is checkpointed at K=1)."
        )
    if on20 and off20:
        lines.append(
            f"- Step time at K=20, on / off: {ratio(on20, off20, 'step_cpu_seconds_median'):.3f} in CPU seconds, "
            f"{ratio(on20, off20, 'step_seconds_median'):.3f} in wall seconds (the recomputation of 19 calls)."
        )
    for k, eager in ((1, on1), (20, on20)):
        comp = by.get((k, True, True, True))
        if comp and eager:  # both from the live-count processes: 3 steps each, same seeds
            loss_diff = max(abs(a - b) / abs(b) for a, b in zip(comp["losses"], eager["losses"]))
            lines.append(
                f"- --compile at K={k}: step {ratio(comp, eager, 'step_cpu_seconds_median'):.3f}x eager in CPU seconds "
                f"({comp['step_cpu_seconds_median']:.2f} against {eager['step_cpu_seconds_median']:.2f}); the first "
                f"step, compiling from an empty cache, {comp['first_step_wall_seconds']:.0f} s wall against "
                f"{eager['first_step_wall_seconds']:.0f} s; the same seeds' losses agree within {loss_diff:.1e} "
                f"(relative, largest of 3 steps)."
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per process (the first is not timed)")
    p.add_argument("--repeats", type=int, default=1, help="rounds of all configurations (every other one reversed)")
    p.add_argument(
        "--out", default=None, help="results path without suffix (default results/checkpoint_calls[_FAMILY])"
    )
    p.add_argument("--family", choices=tuple(FAMILIES), default="sd", help="the tiny pipeline's family")
    p.add_argument("--quick", action="store_true", help="K=1 and K=20 with block checkpointing, whole calls on/off")
    p.add_argument("--compile", action="store_true", help="also K=1 and K=20 with --compile (minutes of compiling)")
    p.add_argument("--report", metavar="JSON", help="only rewrite the Markdown of a results JSON")
    p.add_argument("--live", action="store_true", help=argparse.SUPPRESS)  # one live-tensor count: finetune flags
    args, rest = p.parse_known_args(argv)
    if args.report:
        data = json.loads(Path(args.report).read_text())
        Path(args.report).with_suffix(".md").write_text(report(data["records"], data))
        return 0
    if args.live:
        print(json.dumps(live_and_predicted([x for x in rest if x != "--"])))
        return 0
    args.out = args.out or str(
        HERE / "results" / ("checkpoint_calls" + ("" if args.family == "sd" else f"_{args.family}"))
    )
    work = Path(tempfile.mkdtemp(prefix="rewardtune-ckpt-calls-"))
    if args.family == "sd":
        model = save_tiny_pipeline(
            work / "pipe", "sd", seed=0, **{k: tuple(v) if isinstance(v, list) else v for k, v in PIPELINE.items()}
        )
    else:
        model = save_tiny_flow_pipeline(work / "pipe", args.family)
    world = write_tiny_reward_world(work / "reward")
    argv_shown = [x for x in (argv if argv is not None else sys.argv[1:]) if not x.startswith("--out")]
    meta = {"commit": git_commit(), "env": environment(), "steps": args.steps, "repeats": args.repeats}
    meta["family"] = args.family
    meta["argv"] = argv_shown
    configs = (QUICK if args.quick else CONFIGS) + (COMPILED if args.compile else [])
    runs: dict = {}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for round_ in range(args.repeats):
        for config in configs if round_ % 2 == 0 else configs[::-1]:
            measure(work, model, world, config, args.steps, runs, args.family)
            print(round_, config, flush=True)
            records = [summarize(c, runs[c]) for c in configs if c in runs]  # written as they come: hours of work
            Path(args.out + ".json").write_text(
                json.dumps(
                    {
                        **meta,
                        "pipeline": PIPELINE if args.family == "sd" else args.family,
                        "setting": SETTING if args.family == "sd" else FLOW_SETTING,
                        "records": records,
                    },
                    indent=2,
                )
            )
            Path(args.out + ".md").write_text(report(records, meta))
    print(Path(args.out + ".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``rewardtune demo``: reward fine-tuning of the bundled shapes-world pipeline, judged by the oracle.

The same code paths as a real run: ``run_finetune`` (DRaFT-K, LoRA) on the bundled diffusers pipeline
with the bundled ICT-HP reward; a held-out CLIP the training never sees, and the oracle reading each
evaluation image's attributes from its pixels, tell real improvement from reward hacking. Its output
directory follows the same table as finetune's and train-reward's (``rundir``; docs/reliability.md).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .. import jsonio, threads
from ..errors import UserError
from ..finetune import run_finetune
from ..finetune.config import FinetuneConfig
from ..finetune.monitors import MONITORS
from ..rewards import load_reward, parse_spec
from ..rundir import FINETUNE_STATE, HISTORY, RunDir, Start, config_settings
from ..sources import atomic_write_text, load_state_dict
from . import world
from .config import DemoConfig
from .report import hacking_signs, reward_label, verdict, write_report

# The files the demo needs from a models directory (what scripts/build_demo_models.py writes).
REQUIRED = ["pipeline/model_index.json", "ict/config.json", "hp/hp_backbone/config.json", "heldout_clip/config.json"]
HP_HEADS = ["hp/hp_scorer/mlp_pytorch_model.safetensors", "hp/hp_scorer/mlp_pytorch_model.bin"]
# The bundled source of each reward the demo trains on (the builder's ``baselines`` part writes clip/ and pickscore/)
REWARD_DIRS = {"ict": "ict", "hp": "hp", "pickscore": "pickscore", "clip": "clip"}
OUTPUTS = ("report.html", "before.png", "after.png", "curves.svg")  # besides summary.json, written last
SCRATCH = ("prompts_train.txt", "prompts_heldout.txt", "finetune")


def reward_sources(models: Path) -> dict[str, str]:
    """``load_reward`` sources of the bundled training rewards."""
    return {key: str(models / d) for key, d in REWARD_DIRS.items()}


def check_models(models: Path, rewards: list[str] = ()) -> None:
    """Fail early, naming the missing file, when ``models`` is not a complete demo models directory (with the
    sources of ``rewards`` besides ICT and HP)."""
    needed = REQUIRED + [f"{REWARD_DIRS[r]}/config.json" for r in ("pickscore", "clip") if r in rewards]
    missing = [f for f in needed if not (models / f).is_file()]
    if not any((models / f).is_file() for f in HP_HEADS):
        missing.append(HP_HEADS[0])
    if missing:
        raise UserError(
            f"demo: '{models}' lacks {', '.join(missing)}; pass the models directory that "
            f"scripts/build_demo_models.py wrote (--models), or rebuild it with that script"
        )


def make_prompts(n: int, seed: int, exclude: set[str] = frozenset()) -> list[str]:
    """``n`` distinct full prompts of the world (every content attribute, and 'highly detailed' as
    people write), none of ``exclude``."""
    rng = np.random.default_rng([seed, 500])
    out: list[str] = []
    seen = set(exclude)
    limit = int(np.prod([len(v) for v in world.VALUES.values()])) - len(exclude)
    if n > limit:
        raise UserError(f"demo: asked for {n} distinct prompts but the world has only {limit} left")
    while len(out) < n:
        p = world.make_prompt(world.random_scene(rng).attributes(), detailed=True)
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


class OracleHook:
    """``eval_hook`` for ``run_finetune``: the oracle's mean score, and how often each attribute is right,
    at each evaluation."""

    def __init__(self, total_steps: int):
        self.total_steps = total_steps
        self.images: dict[int, torch.Tensor] = {}
        self.scores: dict[int, np.ndarray] = {}
        self.t0 = time.time()

    def __call__(self, step: int, images: torch.Tensor, prompts: list[str]) -> dict:
        metrics = self.record(step, images, prompts)
        print(
            f"demo: step {step:>4}/{self.total_steps}  oracle {metrics['oracle']:.3f}  ("
            + ", ".join(f"{a} {metrics[f'oracle_{a}']:.2f}" for a in world.ATTRIBUTES if f"oracle_{a}" in metrics)
            + f")  {time.time() - self.t0:.0f} s",
            flush=True,
        )
        return metrics

    def record(self, step: int, images: torch.Tensor, prompts: list[str]) -> dict:
        """Score and keep one evaluation's images (without printing: a resumed demo's earlier ones)."""
        seen = [world.read_scene(im) for im in images.numpy()]  # read once: the score and each attribute come from it
        wanted = [world.parse_prompt(p) for p in prompts]
        scores = np.array([world.shown_fraction(s, w) for s, w in zip(seen, wanted)], dtype=np.float32)
        self.images[step], self.scores[step] = images.clone(), scores
        metrics = {"oracle": float(scores.mean())}
        for a in world.ATTRIBUTES:
            asked = [(s[a], w[a]) for s, w in zip(seen, wanted) if a in w]
            if asked:
                metrics[f"oracle_{a}"] = float(np.mean([x == y for x, y in asked]))
        return metrics


def run_dir(out: Path) -> RunDir:
    """The demo's output directory: finished when ``summary.json`` is there; in progress while its fine-tuning
    run (``finetune/``) holds checkpoints."""
    return RunDir(
        out,
        who="demo: ",
        command="demo",
        finished="summary.json",
        done_key="steps",
        outputs=OUTPUTS,
        scratch=SCRATCH,
        checkpoints_dir=out / "finetune" / "checkpoints",
        state_types=FINETUNE_STATE,
    )


def run_demo(cfg: DemoConfig) -> dict:
    """Fine-tune the bundled pipeline on ICT-HP; write summary.json, report.html, grids and the LoRA."""

    cfg.validate()
    threads_used = threads.describe(threads.configure(cfg.threads))
    models, out = Path(cfg.models).expanduser(), Path(cfg.output).expanduser()
    check_models(models, [n for n, _ in parse_spec(cfg.reward)])
    ft = _finetune_config(cfg, models, out)  # a bad option fails here, before anything is written
    rundir = run_dir(out)
    with rundir.lock():
        start = rundir.plan(cfg.resume, cfg.overwrite, cfg.steps)
        if start.action == "done":
            rundir.say(
                f"nothing to do: the demo in '{out}' already trained {start.record.get('steps')} steps "
                f"(--steps {cfg.steps}); raise --steps to train further"
            )
            return {**start.record, "nothing_to_do": True}
        t0 = time.time()
        heldout = make_prompts(cfg.eval_size, cfg.seed + 1)
        train = make_prompts(cfg.train_prompts, cfg.seed, exclude=set(heldout))
        print(f"demo: loading the bundled models from {models}; {threads_used}", flush=True)
        reward = load_reward(cfg.reward, **reward_sources(models))
        heldout_reward = load_reward("clip", clip=str(models / "heldout_clip"))
        rundir.begin(start, cfg, config_settings(cfg, {}))
        try:
            return _run(
                cfg,
                dataclasses.replace(ft, resume=start.action in ("resume", "continue")),
                start,
                out,
                train,
                heldout,
                reward,
                heldout_reward,
                t0,
            )
        except BaseException:
            if start.checkpoint is None and not (out / "finetune" / HISTORY).is_file():
                rundir.abandon()  # the fine-tuning never started: leave nothing behind
            raise


def _finetune_config(cfg: DemoConfig, models: Path, out: Path) -> FinetuneConfig:
    """The fine-tuning run of the demo (validated)."""
    uses = [n for n, _ in parse_spec(cfg.reward)]
    ft = FinetuneConfig(
        model=str(models / "pipeline"),
        reward=cfg.reward,
        prompts=str(out / "prompts_train.txt"),
        output=str(out / "finetune"),
        method="draft-k",
        k=cfg.k,
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        lr_schedule=cfg.lr_schedule,
        lora_rank=cfg.lora_rank,
        lora_alpha=float(cfg.lora_rank),
        lora_targets=None if cfg.lora_targets is None else list(cfg.lora_targets),
        train_text_encoder=cfg.train_text_encoder,
        reg_weight=cfg.reg_weight,
        sample_steps=cfg.sample_steps,
        guidance_scale=cfg.guidance_scale,
        gradient_checkpointing=False,
        checkpoint_calls=cfg.checkpoint_calls,
        seed=cfg.seed,
        checkpoint_every=cfg.checkpoint_every,
        checkpoint_minutes=cfg.checkpoint_minutes,
        eval_every=cfg.eval_every,
        eval_prompts=str(out / "prompts_heldout.txt"),
        eval_size=cfg.eval_size,
        eval_seeds=cfg.eval_seeds,
        stop_on_hacking=cfg.stop_on_hacking,
        **{f"monitor_{name}": getattr(cfg, f"monitor_{name}") for name in MONITORS},
        eval_reward="clip",
        # the reward modules are passed in; these record where they came from. Training on the world CLIP
        # ('clip') takes the clip source, which otherwise names the held-out CLIP of --eval-reward.
        **{**reward_sources(models), "clip": str(models / ("clip" if "clip" in uses else "heldout_clip"))},
    )
    return ft.validate()


def _run(
    cfg: DemoConfig,
    ft: FinetuneConfig,
    start: Start,
    out: Path,
    train: list[str],
    heldout: list[str],
    reward,
    heldout_reward,
    t0: float,
) -> dict:
    atomic_write_text(out / "prompts_train.txt", "\n".join(train) + "\n")
    atomic_write_text(out / "prompts_heldout.txt", "\n".join(heldout) + "\n")
    if start.action == "resume":  # a fine-tuning that finished without its report: redo its last evaluation
        (out / "finetune" / "summary.json").unlink(missing_ok=True)
    verb = {"resume": f"resuming from step {start.step}", "continue": f"continuing from step {start.step}"}.get(
        start.action, "fine-tuning"
    )
    print(
        f"demo: {verb}: {ft.model} on {cfg.reward} for {cfg.steps} steps "
        f"({len(train)} training prompts, {len(heldout)} held-out prompts)",
        flush=True,
    )
    hook = OracleHook(cfg.steps)
    result = run_finetune(ft, reward=reward, eval_reward=heldout_reward, eval_hook=hook)
    before_images = out / "finetune" / "samples" / "before.safetensors"
    if 0 not in hook.images and before_images.is_file():  # resumed: step 0's images are the saved ones
        hook.record(0, load_state_dict(before_images, "before images")["images"], heldout)
    stopped = result.get("stopped_on_hacking")
    if stopped:  # --stop-on-hacking: the report's "after" is the kept LoRA's evaluation, not the one that tripped
        for step in [s for s in hook.images if s > stopped["kept_step"]]:
            del hook.images[step], hook.scores[step]
    rows = _metrics(out / "finetune" / "metrics.jsonl")
    summary = _summary(cfg, result, [r for r in rows if r.get("kind") == "eval"], time.time() - t0)
    summary["hacking_signs"] = hacking_signs(summary)
    train_rewards = [
        (r["step"], r["reward"]) for r in rows if r.get("kind") == "train" and r.get("reward") is not None
    ]
    write_report(out, summary, hook, heldout, train_rewards)
    atomic_write_text(out / "summary.json", jsonio.dumps(summary, indent=2) + "\n")
    _print_summary(summary, out)
    return summary


def _summary(cfg: DemoConfig, result: dict, evaluations: list[dict], seconds: float) -> dict:
    before, after = result["before"], result["after"]
    return {
        "oracle_before": before["oracle"],
        "oracle_after": after["oracle"],
        "reward_before": before["reward"],
        "reward_after": after["reward"],
        "heldout_reward_before": before["eval_reward"],
        "heldout_reward_after": after["eval_reward"],
        "attributes_before": {a: before.get(f"oracle_{a}") for a in world.ATTRIBUTES},
        "attributes_after": {a: after.get(f"oracle_{a}") for a in world.ATTRIBUTES},
        "saturation_before": before.get("saturation"),
        "saturation_after": after.get("saturation"),
        "steps": result["steps"],
        "steps_planned": cfg.steps,
        "stopped_early": result.get("stopped_early", False),  # a stop on hacking finished the run it planned
        "monitors": result.get("monitors"),
        "stopped_on_hacking": result.get("stopped_on_hacking"),
        "seconds": round(seconds, 1),
        "threads": torch.get_num_threads(),
        "lora": result["lora"],
        "reward": f"{cfg.reward} (bundled models)",
        "heldout_reward": "clip (bundled held-out CLIP, never trained on)",
        "evaluations": [{k: v for k, v in e.items() if k != "kind"} for e in evaluations],
        "config": dataclasses.asdict(cfg),
    }


def _metrics(path: Path) -> list[dict]:
    """The rows of run_finetune's metrics.jsonl (train and eval scalars by step)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _print_summary(s: dict, out: Path) -> None:
    def line(name, a, b):
        return f"  {name:<22} {a:8.3f} -> {b:8.3f}  ({b - a:+.3f})"

    print("demo: done in {:.0f} s".format(s["seconds"]))
    print(line("oracle (attributes)", s["oracle_before"], s["oracle_after"]))
    print(line(f"{reward_label(s['config']['reward'])} reward", s["reward_before"], s["reward_after"]))
    print(line("held-out CLIP", s["heldout_reward_before"], s["heldout_reward_after"]))
    for a in world.ATTRIBUTES:
        if s["attributes_before"][a] is not None:
            print(line(f"  {a} right", s["attributes_before"][a], s["attributes_after"][a]))
    print(f"demo: {verdict(s['hacking_signs'])}")
    print(f"demo: report {out / 'report.html'}, LoRA {s['lora']}")
    sys.stdout.flush()

"""``run_finetune``: the training loop around ``Trainer`` — evaluation, logging, checkpoints, outputs.

Outputs in ``cfg.output``: ``pytorch_lora_weights.safetensors`` (diffusers), ``config.yaml`` (re-runnable
with ``--config``), ``checkpoints/step_N/``, ``tb/`` (TensorBoard), ``metrics.jsonl``, ``samples/``
(before/after grids at each evaluation), ``summary.json`` (written last: a finished run) and ``runs.jsonl``. The
directory's rules (lock, resume, overwrite, settings a resume must keep) are ``rundir``'s.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from .. import stops
from ..errors import UserError
from ..images import make_grid, save_image
from ..progress import StepProgress
from ..rundir import FINETUNE_STATE, LOCK_LOST, Cadence, RunDir, Start, config_settings, weights_identity
from ..sources import atomic_write_text, load_state_dict, save_state_dict
from . import lora as lora_mod
from .config import FinetuneConfig
from .models import resolve_model
from .prompts import load_prompts, note_long_prompts
from .trainer import Trainer
from .video import save_gif, temporal_consistency


class RunLog:
    """TensorBoard scalars and ``metrics.jsonl`` lines (main process only)."""

    def __init__(self, out: Path, enabled: bool, resume_step: int | None = None, redo_eval: bool = False):
        """``resume_step``: keep the lines up to the checkpoint resumed from (``redo_eval``: not its evaluation,
        which the resumed run repeats: a checkpoint at ``--steps`` whose run ended before its summary)."""
        self.enabled = enabled
        self.path = out / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():  # drop lines past the checkpoint we resume from
            rows = [(ln, json.loads(ln)) for ln in self.path.read_text().splitlines() if ln.strip()]
            lines = [
                ln
                for ln, r in rows
                if r["step"] < resume_step or (r["step"] == resume_step and not (redo_eval and r["kind"] == "eval"))
            ]
            atomic_write_text(self.path, "".join(ln + "\n" for ln in lines))
        elif self.path.exists():
            self.path.unlink()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(out / "tb"), purge_step=resume_step + 1 if resume_step is not None else None)

    def log(self, kind: str, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        clean = {
            k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"
        }
        record = {"step": step, "kind": kind, **{k: (v if math.isfinite(v) else None) for k, v in clean.items()}}
        if "prompts" in metrics:  # the step's prompts, one list per process
            record["prompts"] = metrics["prompts"]
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in clean.items():
            self.writer.add_scalar(f"{kind}/{k}", v, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class Evaluator:
    """Reward, eval reward and hook metrics on fixed prompts and noise; before/after grids as PNG."""

    def __init__(self, trainer: Trainer, out: Path, hook=None):
        cfg = trainer.cfg
        self.trainer, self.out, self.hook = trainer, out, hook
        prompts = load_prompts(cfg.eval_prompts, "--eval-prompts") if cfg.eval_prompts else trainer.prompts
        self.prompts = prompts[: cfg.eval_size]
        self.seed = cfg.seed + 1_000_003
        self.before_path = out / "samples" / "before.safetensors"

    @torch.no_grad()
    def __call__(self, step: int) -> dict:
        """Every process generates the same images (sharded models need all of them); the main process
        runs the hook and writes the grid. Returns the metrics (the hook's on the main process only)."""
        t = self.trainer
        images = t.generate(self.prompts, self.seed)
        with t.rewards_placed():  # --reward-offload: on the accelerator only to score
            metrics = {"reward": float(t.score(images, self.prompts).mean())}
            if t.eval_reward is not None:
                with t.accelerator.autocast():
                    metrics["eval_reward"] = float(t.eval_reward(images, self.prompts).float().mean())
        if images.dim() == 5:  # a video family: how alike consecutive frames are (video.py)
            with t.rewards_placed(t.reward):
                metrics["temporal_consistency"] = temporal_consistency(images, t.reward)
        if t.accelerator.is_main_process:
            if self.hook is not None:
                metrics.update(
                    {k: float(v) for k, v in self.hook(step, images.detach().cpu(), list(self.prompts)).items()}
                )
            self._grid(step, images.cpu())
        return metrics

    def _grid(self, step: int, images: torch.Tensor) -> None:
        """Row pairs: the images before training above the same prompts and noise now."""
        if not self.before_path.exists():
            save_state_dict({"images": images}, self.before_path)
        before = load_state_dict(self.before_path, "before images")["images"]
        n = len(images)
        if images.dim() == 5:  # videos: before above after as an animation, and the grid of their middle frames
            save_gif(torch.cat([before, images], dim=-2), self.out / "samples" / f"step_{step:06d}.gif")
            before, images = before[:, :, before.shape[2] // 2], images[:, :, images.shape[2] // 2]
        save_image(make_grid(torch.cat([before, images]), ncol=n), self.out / "samples" / f"step_{step:06d}.png")


def run_dir(output: str | Path) -> RunDir:
    """finetune's output directory: finished when ``summary.json`` (written last) is there."""
    return RunDir(
        output,
        command="finetune",
        finished="summary.json",
        done_key="steps",
        outputs=(lora_mod.WEIGHT_NAME, lora_mod.KOHYA_NAME),
        scratch=("config.yaml", "metrics.jsonl", "tb", "samples", ".lora-*"),
        state_types=FINETUNE_STATE,
    )


def run_settings(cfg: FinetuneConfig, reward=None) -> dict:
    """The settings a resumed run must share with its checkpoint (they decide what the LoRA means), and all."""

    spec = cfg.reward if reward is None else f"{cfg.reward} ({type(reward).__name__} passed in)"
    fixed = {
        "--model": weights_identity(resolve_model(cfg.model)),
        "--lora-rank": cfg.lora_rank,
        "--lora-alpha": cfg.lora_alpha,
        "--lora-targets": None if cfg.lora_targets is None else list(cfg.lora_targets),
        "--train-text-encoder": cfg.train_text_encoder,
        "--reward": spec,
        "--method": cfg.method,
    }
    return config_settings(cfg, fixed)


def run_finetune(cfg: FinetuneConfig, reward=None, eval_reward=None, eval_hook=None) -> dict:
    """Fine-tune, evaluate and save; returns the summary also written to ``output/summary.json`` (or, when
    ``--resume`` finds the run already finished at ``--steps``, that summary with ``nothing_to_do: True``).

    ``reward``/``eval_reward`` are built modules overriding ``cfg.reward``/``cfg.eval_reward``;
    ``eval_hook(step, images, prompts) -> dict`` adds metrics at each evaluation.
    """
    cfg.validate()
    if cfg.early_stop_drop > 0 and not (cfg.eval_reward or eval_reward is not None):
        raise UserError("--early-stop-drop needs --eval-reward: early stopping watches the held-out reward")
    if cfg.eval_prompts:
        load_prompts(cfg.eval_prompts, "--eval-prompts")  # a bad file fails before any model loads, as --prompts does
    rundir = run_dir(cfg.output)
    with rundir.lock():
        start = rundir.plan(cfg.resume, cfg.overwrite, cfg.steps, cfg.trust_pickle)
        if start.action == "done":
            rundir.say(
                f"nothing to do: the run in '{rundir.root}' already trained {start.record.get('steps')} steps "
                f"(--steps {cfg.steps}); raise --steps to train further"
            )
            return {**start.record, "nothing_to_do": True}
        settings = run_settings(cfg, reward)
        changed = rundir.check_settings(start, settings)
        if os.environ.get("RANK", "0") == "0":
            print(f"finetune: loading {cfg.model}{' and the rewards' if reward is None else ''}", flush=True)
        chosen = [start]

        def choose(check):
            chosen[0] = rundir.select(start, check)
            return chosen[0].path

        trainer = Trainer(cfg, reward=reward, eval_reward=eval_reward, resume_from=choose if start.path else None)
        start = chosen[0]
        rundir.begin(start, cfg, settings, changed)
        return _run(trainer, rundir, start, reward, eval_reward, eval_hook)


def _run(trainer: Trainer, rundir: RunDir, start: Start, reward, eval_reward, eval_hook) -> dict:
    cfg, out = trainer.cfg, rundir.root
    acc, main = trainer.accelerator, trainer.accelerator.is_main_process
    state = trainer.resume_state
    log = RunLog(
        out,
        main,
        trainer.global_step if start.checkpoint is not None else None,
        redo_eval=trainer.global_step >= cfg.steps,
    )
    evaluate = Evaluator(trainer, out, eval_hook)
    note_long_prompts(trainer, evaluate.prompts)
    if main and "before" not in state:
        print(f"finetune: evaluating the starting model on {len(evaluate.prompts)} prompts", flush=True)
    before = state.get("before") or _eval(evaluate, trainer, log, main)
    best = state.get("best_eval", before.get("eval_reward"))
    history = {"stopped_early": False}
    cadence = Cadence(cfg.checkpoint_every, cfg.checkpoint_minutes, acc)
    try:
        best = _train(trainer, evaluate, log, rundir, before, best, history, cadence)
        after = _eval(evaluate, trainer, log, main)
        if rundir.interruption(acc) == LOCK_LOST:  # the outputs are written only while the directory is ours
            rundir.stop(LOCK_LOST, trainer.global_step, cfg.steps, None)
        digests = trainer.lora_digests()
        if len(set(digests)) > 1:
            print(f"finetune: warning: the processes' LoRA weights differ ({digests}); the main process's is saved")
        _check_final(after, trainer)
        lora_path = trainer.save_lora(out)
        if (
            main
        ):  # config.yaml goes with the outputs, so a run that fails before them leaves a finished run's as it was
            rundir.write_config(cfg)
        if main and cfg.export == "kohya":
            lora_mod.export_kohya(out, cfg.lora_alpha)
        _checkpoint(trainer, rundir, before, best)
    finally:
        log.close()
    summary = {
        "model": cfg.model,
        "family": trainer.family,
        "method": cfg.method,
        "reward": _name(reward, cfg.reward),
        "eval_reward": _name(eval_reward, cfg.eval_reward or None),
        # the released weights (and version) each reward with versions loaded, e.g. HPS v2.0 / v2.1
        "reward_weights": {**_provenance(trainer.reward), **_provenance(trainer.eval_reward)},
        "steps": trainer.global_step,
        "steps_planned": cfg.steps,
        "skipped_steps": trainer.skipped_steps,
        "processes": acc.num_processes,
        "lora_sha256": digests,  # per process: equal when the data-parallel processes stayed in step
        "stopped_early": history["stopped_early"],
        "resolution": trainer.resolution,
        "eval_prompts": evaluate.prompts,
        "before": before,
        "after": after,
        "lora": str(lora_path),
    }
    if main:
        rundir.write_json("summary.json", summary)
    acc.wait_for_everyone()
    return summary


def _provenance(reward) -> dict:
    """What ``Reward.provenance`` says of a reward (none for a module passed in that is not a ``Reward``)."""
    return reward.provenance() if hasattr(reward, "provenance") else {}


def _name(module, spec):
    """The reward's spec, or the class of a module passed in its place."""
    return spec if module is None else f"{type(module).__name__} (passed in)"


def _eval(evaluate: Evaluator, trainer: Trainer, log: RunLog, main: bool) -> dict:
    metrics = evaluate(trainer.global_step)
    trainer.accelerator.wait_for_everyone()
    log.log("eval", trainer.global_step, metrics)
    if main:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        print(f"finetune: eval at step {trainer.global_step}: {shown}", flush=True)
    return metrics


def _check_final(after: dict, trainer: Trainer) -> None:
    """A run whose final evaluation is NaN or infinite fails, and its LoRA is not published."""
    bad = {k: v for k, v in after.items() if k in ("reward", "eval_reward") and not math.isfinite(v)}
    if bad:
        shown = ", ".join(f"{k} {v}" for k, v in bad.items())
        raise UserError(
            f"the evaluation after step {trainer.global_step} gave {shown}: the training diverged and the "
            f"LoRA was not saved; try a lower --lr"
        )


def _train(
    trainer: Trainer,
    evaluate: Evaluator,
    log: RunLog,
    rundir: RunDir,
    before: dict,
    best,
    history: dict,
    cadence: Cadence,
):
    """Optimizer steps until ``cfg.steps`` or an early stop; periodic evaluation and checkpoints."""
    cfg, acc = trainer.cfg, trainer.accelerator
    progress = StepProgress("finetune: ", cfg.steps, trainer.global_step, say=None if acc.is_main_process else _silent)
    with stops.deferred():  # SIGTERM/SIGINT: this step ends, a checkpoint is written, then the run stops
        while trainer.global_step < cfg.steps:
            metrics = trainer.step()
            step = trainer.global_step
            progress.step(step)
            if step % cfg.log_every == 0 or step == cfg.steps:
                log.log("train", step, metrics)
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                ev = _eval(evaluate, trainer, log, acc.is_main_process)
                best, stop = _early_stop(cfg, ev, best, acc)
                if stop:
                    history["stopped_early"] = True
                    return best
            saved = step < cfg.steps and cadence.due(step)
            if saved:
                _checkpoint(trainer, rundir, before, best)
                cadence.saved()
            code = rundir.interruption(acc)
            if code:
                rundir.stop(code, step, cfg.steps, _stop_checkpoint(trainer, rundir, before, best, cadence, saved))
    return best


def _stop_checkpoint(trainer: Trainer, rundir: RunDir, before: dict, best, cadence: Cadence, saved: bool):
    """What a run stopped by a signal writes: a checkpoint of this step unless one was just written; none when
    checkpoints are off."""
    if not cadence.enabled:
        return None
    return lambda: None if saved else _checkpoint(trainer, rundir, before, best)


def _silent(line: str) -> None:
    """Progress lines are the main process's."""


def _early_stop(cfg: FinetuneConfig, ev: dict, best, acc):
    """(best eval reward so far, whether it fell more than --early-stop-drop below it), agreed by all processes."""
    value = ev.get("eval_reward")
    stop = False
    if value is not None:
        best = value if best is None else max(best, value)
        stop = cfg.early_stop_drop > 0 and value < best - cfg.early_stop_drop
        if stop:
            print(
                f"finetune: early stop: eval reward {value:.4f} fell more than {cfg.early_stop_drop} below its best {best:.4f}",
                flush=True,
            )
    flag = torch.tensor([float(stop)], device=acc.device)
    return best, bool(acc.reduce(flag, "sum") > 0) if acc.num_processes > 1 else stop


def _checkpoint(trainer: Trainer, rundir: RunDir, before: dict, best) -> None:
    """A resumable checkpoint after the current step (with the evaluation before training and the best eval
    reward, which a resumed run continues from); only the newest ``--checkpoints-keep`` stay."""
    trainer.save_checkpoint(
        rundir.checkpoint_dir(trainer.global_step), {"before": before, "best_eval": best, "settings": rundir.settings}
    )
    if trainer.accelerator.is_main_process:
        rundir.rotate(trainer.cfg.checkpoints_keep)
        rundir.write_config(trainer.cfg)

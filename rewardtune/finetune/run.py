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
import shutil
from pathlib import Path

import torch

from .. import stops
from ..errors import UserError
from ..images import make_grid, save_image, with_caption
from ..progress import StepProgress
from ..rundir import FINETUNE_STATE, LOCK_LOST, Cadence, RunDir, Start, config_settings, weights_identity
from ..sources import atomic_write_text, load_state_dict, save_state_dict
from . import families, monitors
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
    """Reward, eval reward, hacking monitors and hook metrics on fixed prompts and noise; before/after grids as PNG.

    Each prompt is rendered from ``--eval-seeds`` noise seeds: the rewards, the hook and the grid see the first
    seed's images (the same as with one seed), the monitors all of them."""

    def __init__(self, trainer: Trainer, out: Path, hook=None, watch: monitors.Watch | None = None):
        cfg = trainer.cfg
        self.trainer, self.out, self.hook, self.watch = trainer, out, hook, watch
        prompts = load_prompts(cfg.eval_prompts, "--eval-prompts") if cfg.eval_prompts else trainer.prompts
        self.prompts = prompts[: cfg.eval_size]
        self.seed = cfg.seed + 1_000_003
        self.seeds = [self.seed + i * 7_919 for i in range(cfg.eval_seeds)]
        self.embedder, self.embed = monitors.find_embedder(trainer.eval_reward, trainer.reward)
        self.before_path = out / "samples" / "before.safetensors"

    @torch.no_grad()
    def __call__(self, step: int) -> dict:
        """Every process generates the same images (sharded models need all of them) and measures the monitors;
        the main process runs the hook and writes the grid. Returns the metrics (the hook's on the main process
        only)."""
        t = self.trainer
        images = t.generate(self.prompts, self.seed)
        more = [t.generate(self.prompts, s) for s in self.seeds[1:]]
        with t.rewards_placed():  # --reward-offload: on the accelerator only to score (and embed)
            metrics = {"reward": float(t.score(images, self.prompts).mean())}
            with t.accelerator.autocast():
                if t.eval_reward is not None:
                    values = t.eval_reward(images, self.prompts).float()
                    metrics["eval_reward"] = float(values.mean())
                    metrics[monitors.EVAL_REWARD_SPREAD] = float(values.std()) if len(values) > 1 else 0.0
                # videos: the image monitors read each video's middle frame
                frames = [monitors.middle_frames(x) for x in (images, *more)]
                metrics.update(monitors.measure(torch.cat(frames), len(self.seeds), self.embed))
        if images.dim() == 5:  # a video family: how alike consecutive frames are (video.py), a monitor too
            with t.rewards_placed(t.reward):
                metrics["temporal_consistency"] = temporal_consistency(images, t.reward)
        if t.accelerator.is_main_process:
            if self.hook is not None:
                metrics.update(
                    {k: float(v) for k, v in self.hook(step, images.detach().cpu(), list(self.prompts)).items()}
                )
            self._grid(step, images.cpu(), metrics)
        return metrics

    def _grid(self, step: int, images: torch.Tensor, metrics: dict) -> None:
        """Row pairs: the images before training above the same prompts and noise now; under them a line with
        the monitors' values before and one with them now (those past their threshold marked)."""
        if not self.before_path.exists():
            save_state_dict({"images": images}, self.before_path)
        before = load_state_dict(self.before_path, "before images")["images"]
        n = len(images)
        lines = [monitors.caption(metrics, self.watch, step)]
        if self.watch is not None and self.watch.base is not None and step > 0:
            lines.insert(0, monitors.caption(self.watch.base, None, 0).replace("step 0", "before"))
        if images.dim() == 5:  # videos: before above after as an animation, and the grid of their middle frames
            save_gif(torch.cat([before, images], dim=-2), self.out / "samples" / f"step_{step:06d}.gif")
            before, images = monitors.middle_frames(before), monitors.middle_frames(images)
        grid = with_caption(make_grid(torch.cat([before, images]), ncol=n), lines)
        save_image(grid, self.out / "samples" / f"step_{step:06d}.png")


def run_dir(output: str | Path) -> RunDir:
    """finetune's output directory: finished when ``summary.json`` (written last) is there."""
    return RunDir(
        output,
        command="finetune",
        finished="summary.json",
        done_key="steps",
        outputs=(lora_mod.WEIGHT_NAME, lora_mod.KOHYA_NAME, *families.lora_parts()),  # (a second expert's LoRA)
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
    watch = monitors.Watch(monitors.Thresholds.from_config(cfg))
    watch.restore(state.get("monitors"))
    evaluate = Evaluator(trainer, out, eval_hook, watch)
    note_long_prompts(trainer, evaluate.prompts)
    if main and "before" not in state:
        print(
            f"finetune: evaluating the starting model on {len(evaluate.prompts)} prompts x {cfg.eval_seeds} seeds "
            f"(monitors embed with {evaluate.embedder})",
            flush=True,
        )
    before = state.get("before")
    if before is None:
        before = _eval(evaluate, trainer, log, main)
    if watch.base is None:  # a fresh run, or a checkpoint written before the monitors: the base is step 0's
        watch.observe(0, before)
    if cfg.stop_on_hacking and watch.tripped:
        raise UserError(
            f"--stop-on-hacking: in the run resumed from step {trainer.global_step} a monitor had already tripped "
            f"({'; '.join(t.describe() for t in watch.first_trips.values())}), so its checkpoint is not one to keep; "
            f"resume without --stop-on-hacking, or start over with it (--overwrite)"
        )
    best = state.get("best_eval", before.get("eval_reward"))
    history = {"stopped_early": False, "hacking": None, "evals": _logged_evals(log, before, trainer.global_step)}
    history["safe"] = _Safe(trainer, watch) if cfg.stop_on_hacking else None
    cadence = Cadence(cfg.checkpoint_every, cfg.checkpoint_minutes, acc)
    try:
        best = _train(trainer, evaluate, log, rundir, before, best, history, cadence, watch)
        if history["hacking"] is None:
            after = _eval(evaluate, trainer, log, main)
            history["evals"][trainer.global_step] = after
            _monitor(trainer, watch, after, history)
        if history["hacking"] is not None:  # --stop-on-hacking: the LoRA of the last evaluation before the trip
            after = _keep_safe(trainer, rundir, history)
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
        exports = []
        if main and cfg.export == "kohya":
            exports.append(lora_mod.export_kohya(out, cfg.lora_alpha))
        if main and cfg.export == "comfyui":  # beside each trained denoiser's file (an A14B pair: two)
            exports += [lora_mod.export_comfyui(out / name, trainer.family) for name in trainer.lora_files().values()]
        if history["hacking"] is None:  # a stop on hacking keeps the checkpoints up to the kept step, none after
            _checkpoint(trainer, rundir, before, best, watch)
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
        "monitors": {"embedding": evaluate.embedder, "eval_seeds": len(evaluate.seeds), **watch.summary()},
        "stopped_on_hacking": history["hacking"],
        "resolution": trainer.resolution,
        "eval_prompts": evaluate.prompts,
        "before": before,
        "after": after,
        "lora": str(lora_path),
        "lora_files": [str(out / name) for name in trainer.lora_files().values()],
        "load": _load_calls(trainer, out),  # the diffusers calls that load it (a pair of experts: one per file)
        "exports": [str(path) for path in exports],  # --export's files (kohya, comfyui)
        # what the evaluations wrote: before/after grids (PNG), for videos animations (GIF, MP4 where it can)
        "samples": sorted(str(path.relative_to(out)) for path in (out / "samples").glob("step_*.*")),
    }
    if main:
        rundir.write_json("summary.json", summary)
    acc.wait_for_everyone()
    return summary


def _load_calls(trainer: Trainer, out: Path) -> list[str]:
    """How a user loads the run's LoRA into the model's diffusers pipeline ``pipe``: the adapter's calls where its
    files need more than the plain one (``lora_load_calls``: Wan2.2-A14B's experts)."""
    calls = getattr(trainer.adapter, "lora_load_calls", None)
    return calls(out) if calls is not None else [f"pipe.load_lora_weights({str(out)!r})"]


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
    watch: monitors.Watch,
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
                history["evals"][step] = ev
                if _monitor(trainer, watch, ev, history):
                    history["stopped_early"] = True
                    return best
                best, stop = _early_stop(cfg, ev, best, acc)
                if stop:
                    history["stopped_early"] = True
                    return best
            saved = step < cfg.steps and cadence.due(step)
            if saved:
                _checkpoint(trainer, rundir, before, best, watch)
                cadence.saved()
            code = rundir.interruption(acc)
            if code:
                rundir.stop(
                    code, step, cfg.steps, _stop_checkpoint(trainer, rundir, before, best, cadence, saved, watch)
                )
    return best


def _stop_checkpoint(
    trainer: Trainer, rundir: RunDir, before: dict, best, cadence: Cadence, saved: bool, watch: monitors.Watch
):
    """What a run stopped by a signal writes: a checkpoint of this step unless one was just written; none when
    checkpoints are off."""
    if not cadence.enabled:
        return None
    return lambda: None if saved else _checkpoint(trainer, rundir, before, best, watch)


class _Safe:
    """--stop-on-hacking: a copy (on the CPU) of this process's LoRA weights at the last evaluation where no monitor
    had tripped, and its step. It starts as the weights the run starts from (the base's LoRA, or the checkpoint
    resumed from)."""

    def __init__(self, trainer: Trainer, watch: monitors.Watch):
        self.params = lora_mod.trainable_parameters(*trainer.models_train)
        self.step = trainer.global_step
        self.take(trainer.global_step)

    def take(self, step: int) -> None:
        self.weights = [p.detach().to("cpu", copy=True) for p in self.params]
        self.step = step

    @torch.no_grad()
    def put_back(self) -> None:
        for p, w in zip(self.params, self.weights):
            p.copy_(w.to(p.device, p.dtype))


def _monitor(trainer: Trainer, watch: monitors.Watch, ev: dict, history: dict) -> bool:
    """Check one evaluation's monitors; returns whether the run stops here (--stop-on-hacking and a monitor past
    its threshold). Every process computes the same monitor values, so all decide alike. Without the flag, a
    warning the first time each monitor trips."""
    step = trainer.global_step
    new = watch.observe(step, ev)
    safe = history["safe"]
    if not watch.tripped:
        if safe is not None:
            safe.take(step)
        return False
    main = trainer.accelerator.is_main_process
    if safe is None:
        for trip in new:
            if main:
                print(
                    f"finetune: warning: hacking monitor tripped: {trip.describe()} "
                    f"(--monitor-{trip.name.replace('_', '-')} {getattr(watch.thresholds, trip.name)} against the "
                    f"base's {watch.base[trip.name]:.4f}); --stop-on-hacking would end the run here",
                    flush=True,
                )
        return False
    trips = list(watch.first_trips.values())
    history["hacking"] = {
        "tripped": {t.name: t.as_dict() for t in trips},
        "step": step,
        "kept_step": safe.step,
    }
    if main:
        print(
            f"finetune: stop on hacking: {'; '.join(t.describe() for t in trips)}; keeping the LoRA of step "
            f"{safe.step}, the last evaluation with every monitor within its threshold",
            flush=True,
        )
    return True


def _keep_safe(trainer: Trainer, rundir: RunDir, history: dict) -> dict:
    """--stop-on-hacking tripped: put the kept step's LoRA weights back (what the run then saves as its LoRA), and
    remove the checkpoints written after that step (they hold the hacked weights, which a --resume would continue
    from). Returns the kept step's evaluation, the run's ``after``."""
    safe = history["safe"]
    safe.put_back()
    if trainer.accelerator.is_main_process:
        for ckpt in rundir.checkpoints():
            if ckpt.step > safe.step:
                shutil.rmtree(ckpt.path, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    after = dict(history["evals"].get(safe.step) or {})
    after["step"] = safe.step
    return after


def _logged_evals(log: RunLog, before: dict, step: int) -> dict:
    """The evaluations so far by step: the starting one, and on a resume those metrics.jsonl kept."""
    evals = {}
    if log.enabled and log.path.exists():
        for line in log.path.read_text().splitlines():
            row = json.loads(line) if line.strip() else {}
            if row.get("kind") == "eval":
                evals[row["step"]] = {k: v for k, v in row.items() if k not in ("kind", "step")}
    evals.setdefault(0 if not evals else min(evals), before)
    return evals


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


def _checkpoint(trainer: Trainer, rundir: RunDir, before: dict, best, watch: monitors.Watch) -> None:
    """A resumable checkpoint after the current step (with the evaluation before training, the best eval
    reward and the monitors' record, which a resumed run continues from); only the newest ``--checkpoints-keep``
    stay."""
    trainer.save_checkpoint(
        rundir.checkpoint_dir(trainer.global_step),
        {"before": before, "best_eval": best, "monitors": watch.state(), "settings": rundir.settings},
    )
    if trainer.accelerator.is_main_process:
        rundir.rotate(trainer.cfg.checkpoints_keep)
        rundir.write_config(trainer.cfg)

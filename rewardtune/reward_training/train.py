"""``train_reward(cfg)``: the ICT or HP training run on accelerate (CPU, one or many GPUs, DDP or
DeepSpeed), with periodic validation, resumable checkpoints and TensorBoard logs. The output directory's
rules (lock, resume, overwrite, checkpoints without pickles) are ``rundir``'s and ``runstate``'s.

Under data parallelism every process gathers the whole global batch (with gradients) and computes the
loss over it, as the released code does, so ICT's in-batch negatives span all processes.

Beside the last step's model, ``<output>/best/`` keeps the model of the validation with the best metric
(``BEST_METRIC``: as released, HP the highest ICT-HP accuracy, ICT the lowest loss), written whole like a
checkpoint, with ``trainer_state.json`` naming its step, metric and value; the best so far is part of every
checkpoint, so a resumed run keeps ``best/`` consistent with the steps it continues from.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from .. import nonfinite, runstate, stops
from ..config import precision_dtype
from ..data import TripletDataset, collate, find_split, load_triplets
from ..errors import UserError, check_all
from ..losses import gather_with_grad, hp_margin_loss, ict_loss, icthp_loss, icthp_scores, triplet_cosines
from ..preflight import check_batch_fits
from ..rundir import (
    LOCK_LOST,
    STATE_FILE,
    TRAIN_REWARD_STATE,
    Cadence,
    RunDir,
    Start,
    config_settings,
    read_state,
    reset_accelerate,
    weights_identity,
    write_checkpoint,
)
from ..schedules import lr_factor
from ..sources import BEST_DIR, check_available, resolve
from . import models
from .config import TrainRewardConfig
from .evaluate import triplet_accuracy

# The validation metric that picks best/, and whether lower or higher is better (the released configs: ICT
# ``metric_name: total_loss`` with ``MetricMode.MIN``; HP the default ``accuracy`` of ICT x softmax(HP), MAX).
BEST_METRIC = {"ict": ("val/ict_loss", "min"), "hp": ("val/icthp_avg", "max")}
# Beside best/: the best the last checkpoint recorded while a newer best replaces it (see Run._write_best).
BEST_PREVIOUS = ".best.prev"


def _split_images(pixels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(B, 3, C, S, S) triplets -> (3B, C, S, S) ordered all I1, then all I2, then all I3; and B."""
    b = pixels.shape[0]
    return pixels.transpose(0, 1).reshape(3 * b, *pixels.shape[2:]), b


class Stage:
    """What differs between ICT and HP: models, preprocessing, the loss, validation scores, the output."""

    def __init__(self, cfg: TrainRewardConfig, accelerator):
        self.cfg, self.accelerator = cfg, accelerator
        self.tower, self.source_dir = models.load_backbone(cfg.backbone)
        self.preprocess = {cfg.stage: models.cpu_preprocess(self.tower)}
        self.ict = None
        if cfg.stage == "ict":
            self.trainee = models.setup_ict(self.tower.model, cfg.frozen_fraction, cfg.freeze_embeddings)
        else:
            self.trainee = models.setup_hp(self.tower.model, cfg.frozen_fraction, cfg.freeze_embeddings)
            self.ict = models.load_frozen_ict(cfg.ict, cfg.backbone)
            ict_pre = models.cpu_preprocess(self.ict.tower)
            if not models.same_preprocess(ict_pre, self.preprocess["hp"]):
                self.preprocess["ict"] = ict_pre
        if cfg.gradient_checkpointing:
            models.enable_checkpointing(self.tower.model)

    def place_frozen(self) -> None:
        """Move the frozen ICT model (HP stage) to the device, in the mixed-precision dtype."""
        if self.ict is not None:
            mp = self.accelerator.mixed_precision
            self.ict.to(self.accelerator.device, dtype=None if mp == "no" else precision_dtype(mp))

    def ict_cosines(self, model, tower, batch, key: str) -> torch.Tensor:
        """(B, 3) cosines of the easy prompt with (I1, I2, I3) under a CLIP ``model``."""
        pixels, b = _split_images(batch[f"pixels_{key}"])
        tok = models.tokenize(tower, batch["easy_prompt"])
        text, image = models.ICTTrainee(model)(tok["input_ids"], tok["attention_mask"], pixels.to(tower.dtype))
        return triplet_cosines(text, image[:b], image[b : 2 * b], image[2 * b :])

    def frozen_ict_cosines(self, batch) -> torch.Tensor:
        key = "ict" if "pixels_ict" in batch else "hp"
        with torch.no_grad(), self.accelerator.autocast():
            return self.ict_cosines(self.ict.tower.model, self.ict.tower, batch, key).float()

    def loss(self, trainee, batch) -> tuple[torch.Tensor, dict]:
        return self._ict_loss(trainee, batch) if self.cfg.stage == "ict" else self._hp_loss(trainee, batch)

    def _ict_loss(self, trainee, batch):
        pixels, b = _split_images(batch["pixels_ict"])
        tok = models.tokenize(self.tower, batch["easy_prompt"] + batch["refine_prompt"])
        text, image = trainee(tok["input_ids"], tok["attention_mask"], pixels)
        g = gather_with_grad
        te, tr, i1, i2, i3 = g(text[:b]), g(text[b:]), g(image[:b]), g(image[b : 2 * b]), g(image[2 * b :])
        e1, e2, r1, r2 = g(batch["labels"].to(te.device).float()).unbind(-1)
        loss = ict_loss(te, tr, i1, i2, i3, e1, e2, r1, r2, neg_weight=self.cfg.neg_weight)
        # Each prompt is pulled away from every other row's three images of the gathered batch.
        return loss, {"global_batch": te.shape[0], "negatives_per_prompt": 3 * (te.shape[0] - 1)}

    def _hp_loss(self, trainee, batch):
        ict = gather_with_grad(self.frozen_ict_cosines(batch))
        pixels, b = _split_images(batch["pixels_hp"])
        scores = trainee(pixels)
        s1, s2, s3 = (gather_with_grad(s) for s in (scores[:b], scores[b : 2 * b], scores[2 * b :]))
        hp = hp_margin_loss(s1, s2, s3, margin=self.cfg.margin)
        joint = icthp_loss(ict, s1, s2, s3, margin=self.cfg.margin)
        loss = self.cfg.hp_weight * hp + self.cfg.icthp_weight * joint
        return loss, {"global_batch": s1.shape[0], "hp_loss": hp.item(), "icthp_loss": joint.item()}

    @torch.no_grad()
    def val_scores(self, trainee, batch) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(B, 3) scores per reported accuracy (``ict`` for the ICT stage; ``hp`` and ``icthp`` for HP) and
        (B,) values per reported mean (ICT: ``ict_loss``, each triplet's label error)."""
        if self.cfg.stage == "ict":
            pixels, b = _split_images(batch["pixels_ict"])
            tok = models.tokenize(self.tower, batch["easy_prompt"] + batch["refine_prompt"])
            text, image = models.ICTTrainee(self.tower.model)(
                tok["input_ids"], tok["attention_mask"], pixels.to(self.tower.dtype)
            )
            i1, i2, i3 = image[:b], image[b : 2 * b], image[2 * b :]
            easy, refine = triplet_cosines(text[:b], i1, i2, i3), triplet_cosines(text[b:], i1, i2, i3)
            e1, e2, r1, r2 = batch["labels"].to(easy.device).float().unbind(-1)
            return {"ict": easy}, {"ict_loss": _label_error(easy, e1, e2) + _label_error(refine, r1, r2)}
        pixels, b = _split_images(batch["pixels_hp"])
        s = trainee(pixels).float()
        hp = torch.stack([s[:b], s[b : 2 * b], s[2 * b :]], -1)
        return {"hp": hp, "icthp": icthp_scores(self.frozen_ict_cosines(batch), *hp.unbind(-1))}, {}

    def write_output(self, state: dict, out: Path) -> None:
        write = models.write_ict if self.cfg.stage == "ict" else models.write_hp
        write(self.tower.model, state, self.source_dir, out, self.cfg.export_official)


def _label_error(cos: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """(B,): mean squared error of (B, 3) cosines with (I1, I2, I3) to (first, second, 1): per triplet, the
    label term of ``ict_loss`` (its mean over a set is ``ict_loss`` without the batch-dependent negatives)."""
    target = torch.stack([first, second, torch.ones_like(first)], -1)
    return (cos.float() - target).square().mean(-1)


def make_schedule(cfg: TrainRewardConfig):
    """Multiplier of the peak lr at each (0-based) optimizer step: warmup over ``cfg.warmup`` steps, linear or
    log-shaped, then linear/cosine decay to 0 or constant. The log shape is DeepSpeed WarmupDecayLR's
    ``ln(step + 1) / ln(warmup)`` (its default ``warmup_type``)."""
    after = lr_factor(cfg.lr_schedule, cfg.warmup, cfg.steps)
    if cfg.warmup_type == "linear" or cfg.warmup == 0:
        return after
    log_warmup = math.log(max(2, cfg.warmup))  # DeepSpeed warms up over at least 2 steps

    def factor(step: int) -> float:
        return math.log(step + 1) / log_warmup if step < cfg.warmup else after(step)

    return factor


def _shared_load(accelerator, root, split: str, cfg: TrainRewardConfig, limit: int = 0):
    """Validate ``split`` once on the main process and hand the same table (or the same error) to all."""
    from accelerate.utils import broadcast_object_list

    payload = [None]
    if accelerator.is_main_process:
        try:
            payload = [
                load_triplets(
                    root,
                    split,
                    trust_pickle=cfg.trust_pickle,
                    skip_bad=cfg.skip_bad,
                    check_images=cfg.check_images,
                    limit=limit or None,
                )
            ]
        except UserError as exc:
            payload = [exc]
    if accelerator.num_processes > 1:
        broadcast_object_list(payload)
    if isinstance(payload[0], UserError):
        raise payload[0]
    return payload[0]


def _loader(table, preprocess, cfg: TrainRewardConfig, train: bool):
    return DataLoader(
        TripletDataset(table, preprocess),
        batch_size=cfg.batch_size,
        shuffle=train,
        drop_last=train,
        num_workers=cfg.num_workers,
        collate_fn=collate,
        persistent_workers=train and cfg.num_workers > 0,
    )


def _batches(accelerator, loader, start_micro: int):
    """Micro-batches forever, epoch after epoch, starting ``start_micro`` batches into the run."""
    epoch, skip = divmod(start_micro, len(loader))
    while True:
        loader.set_epoch(epoch)
        yield from (accelerator.skip_first_batches(loader, skip) if skip else loader)
        epoch, skip = epoch + 1, 0


def _make_accelerator(cfg: TrainRewardConfig, out: Path):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    return Accelerator(
        cpu=_cpu_only_multiprocess(),
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.grad_accum,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )


def _cpu_only_multiprocess() -> bool:
    """Several processes and no GPU: run them as gloo CPU processes (accelerate would otherwise treat
    each as a lone process while torch.distributed is initialised)."""
    gpu = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not gpu


def _hparams(cfg: TrainRewardConfig) -> dict:
    return {k: ("" if v is None else v) for k, v in dataclasses.asdict(cfg).items()}


def run_dir(output: str | Path) -> RunDir:
    """train-reward's output directory: finished when ``metrics.json`` (written last) is there."""
    return RunDir(
        output,
        who="train-reward: ",
        command="train-reward",
        finished="metrics.json",
        done_key="step",
        outputs=(
            "model.safetensors",
            "model-*-of-*.safetensors",
            "pytorch_model.bin",
            "hp_backbone",
            "hp_scorer",
            BEST_DIR,
        ),
        scratch=("config.yaml", "logs", ".staging", BEST_PREVIOUS, f".{BEST_DIR}.tmp", f".{BEST_DIR}.old"),
        clear=("config.json", "model.safetensors.index.json", *models.SIDECAR_FILES),
        state_types=TRAIN_REWARD_STATE,
    )


def run_settings(cfg: TrainRewardConfig) -> dict:
    """The settings a resumed run must share with its checkpoint (they decide what the weights are), and all.
    Before any of them is read, every missing input (data, backbone, ICT) is named in one error."""
    check_all(
        lambda: find_split(cfg.data, cfg.train_split),
        lambda: check_available(cfg.backbone, "CLIP backbone (--backbone)"),
        *([lambda: check_available(cfg.ict, "ICT model (--ict)")] if cfg.stage == "hp" else []),
    )
    fixed = {
        "--stage": cfg.stage,
        "--backbone": weights_identity(resolve(cfg.backbone, "CLIP backbone")),
        "--freeze-ratio": cfg.frozen_fraction,
        "--freeze-embeddings": cfg.freeze_embeddings,
        "--ict": weights_identity(models.ict_model_dir(cfg.ict)) if cfg.stage == "hp" else None,
    }
    return config_settings(cfg, fixed)


def _sampler(loader):
    """The data loader's seedable sampler (its ``initial_seed`` fixes the order of every epoch), if any."""
    sampler = loader.get_sampler() if hasattr(loader, "get_sampler") else None
    return sampler if hasattr(sampler, "initial_seed") else None


class Run:
    """One training run: the loop, validation, logging and checkpoints around a :class:`Stage`."""

    def __init__(
        self,
        cfg: TrainRewardConfig,
        rundir: RunDir,
        start: Start,
        settings: dict | None = None,
        changed: dict | None = None,
    ):
        from accelerate.utils import set_seed

        self.cfg, self.rundir, self.start = cfg, rundir, start
        self.settings, self.changed = settings or config_settings(cfg, {}), changed or {}
        self.out = rundir.root
        self.acc = _make_accelerator(cfg, self.out)
        self.cadence = Cadence(cfg.checkpoint_every, cfg.checkpoint_minutes, self.acc)
        self.last_saved = None
        # The best validation so far ({"step", "metric", "mode", "value"}) and the one the last checkpoint recorded.
        self.best: dict | None = None
        self.best_recorded: dict | None = None
        set_seed(cfg.seed)
        self.stage = Stage(cfg, self.acc)
        self.metrics: dict = {}
        self._build_data()
        self._build_optimizer()

    def _build_data(self) -> None:
        cfg, acc = self.cfg, self.acc
        table = _shared_load(acc, cfg.data, cfg.train_split, cfg)
        need = cfg.batch_size * acc.num_processes
        if len(table) < need:
            raise UserError(
                f"train-reward: the '{cfg.train_split}' split has {len(table)} usable triplets, fewer than one "
                f"global batch ({cfg.batch_size} x {acc.num_processes} processes); lower --batch-size"
            )
        self.train_loader = _loader(table, self.stage.preprocess, cfg, train=True)
        self.val_loader = None
        if cfg.eval_split:
            try:
                find_split(cfg.data, cfg.eval_split)
            except UserError as exc:
                acc.print(f"warning: {exc}; training without validation (set --eval-split)", file=sys.stderr)
                return
            val = _shared_load(acc, cfg.data, cfg.eval_split, cfg, limit=cfg.eval_limit)
            self.val_loader = _loader(val, self.stage.preprocess, cfg, train=False)

    def _build_optimizer(self) -> None:
        cfg, acc = self.cfg, self.acc
        params = [p for p in self.stage.trainee.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.peak_lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, make_schedule(cfg))
        # The scheduler is stepped by hand once per optimizer step (accelerate's wrapper would step it
        # once per process), and registered so checkpoints carry it.
        self.trainee, self.optimizer, self.train_loader = acc.prepare(
            self.stage.trainee, self.optimizer, self.train_loader
        )
        if self.val_loader is not None:
            self.val_loader = acc.prepare(self.val_loader)
        acc.register_for_checkpointing(self.scheduler)
        self.stage.place_frozen()

    def validate(self) -> dict:
        if self.val_loader is None:
            return {}
        self.trainee.eval()
        parts: dict[str, list] = {}
        with self.acc.autocast():
            for batch in self.val_loader:
                scores, values = self.stage.val_scores(self.trainee, batch)
                for key, s in {**scores, **values}.items():
                    parts.setdefault(key, []).append(self.acc.gather_for_metrics(s.float().contiguous()))
        self.trainee.train()
        out = {}
        for key, chunks in parts.items():
            scores = torch.cat(chunks)
            bad = int((~torch.isfinite(scores.reshape(len(scores), -1))).any(-1).sum())
            if bad:  # NaN compares false: accuracy would read 0, not "broken"
                raise UserError(
                    f"train-reward: validation: {key} scores of {bad} of {len(scores)} triplets are NaN or "
                    f"infinite; the model diverged: {self._hint()}"
                )
            if scores.dim() == 1:
                out[f"val/{key}"] = float(scores.mean())
                continue
            for name, value in triplet_accuracy(scores).items():
                out[f"val/{key}_{name}"] = value
        return out

    def train(self) -> dict:
        cfg, acc = self.cfg, self.acc
        start = 0
        if self.start.checkpoint is not None:  # the newest checkpoint whose contents fit this model and optimizer
            self.start = self.rundir.select(self.start, self._checkpoint_problem)
            self._load(self.start)
            start = self.start.step
        self.rundir.begin(self.start, cfg, self.settings, self.changed)
        acc.init_trackers(cfg.stage, config=_hparams(cfg))
        if cfg.eval_every == 0 and start == 0:  # 0: only before the first step and after the last
            self._validate_and_log(0)
        with stops.deferred():  # SIGTERM/SIGINT: the step ends, a checkpoint is written, then the run stops
            step = (
                self._loop(start) if start < cfg.steps else start
            )  # a checkpoint at --steps: only the output is left
        self._finish(start, step)
        return self.metrics

    def _checkpoint_problem(self, directory: Path) -> str | None:
        state = read_state(directory)
        return runstate.state_problem(
            self.acc, directory, state.get("format"), self.optimizer, model=self.trainee, scheduler=self.scheduler
        )

    def _load(self, start: Start) -> None:
        """Weights, optimizer, scheduler, scaler and random generators of a checkpoint; its data order and metrics."""
        runstate.load_training_state(
            self.acc,
            start.path,
            start.state.get("format"),
            self.optimizer,
            model=self.trainee,
            scheduler=self.scheduler,
        )
        sampler, data = _sampler(self.train_loader), start.state.get("data") or {}
        if sampler is not None and isinstance(data.get("sampler_seed"), int):
            sampler.initial_seed = data["sampler_seed"]
        self.metrics.update(
            {k: v for k, v in (start.state.get("metrics") or {}).items() if isinstance(v, (int, float))}
        )
        self.last_saved = start.step
        self.best = self.best_recorded = self._reconcile_best(start.state.get("best"), start.step)

    def _reconcile_best(self, recorded: dict | None, step: int) -> dict | None:
        """Make best/ the checkpoint's best on resume: an interrupted run may have written a newer best/
        after its last checkpoint (then the recorded one waits in ``BEST_PREVIOUS``). Returns the best so
        far, the same on every process (the main process decides)."""
        from accelerate.utils import broadcast_object_list

        payload = [recorded]
        if self.acc.is_main_process:
            payload = [self._restore_best(recorded, step)]
        if self.acc.num_processes > 1:
            broadcast_object_list(payload)
        return payload[0]

    def _restore_best(self, recorded: dict | None, step: int) -> dict | None:
        best, previous = self.out / BEST_DIR, self.out / BEST_PREVIOUS
        if _best_record(best) == _same(recorded):
            shutil.rmtree(previous, ignore_errors=True)
            return recorded
        if recorded is not None and _best_record(previous) == _same(recorded):
            shutil.rmtree(best, ignore_errors=True)
            previous.rename(best)
            self.rundir.say(
                f"best/ restored to the checkpoint's best (step {recorded['step']}); the interrupted run's "
                f"newer best/ came after its last checkpoint (step {step})"
            )
            return recorded
        found = _best_record(best)
        for d in (best, previous):
            shutil.rmtree(d, ignore_errors=True)
        if recorded is not None:
            self.rundir.warn(
                f"the checkpoint's best validation model (step {recorded['step']}) is no longer in '{best}'; "
                f"best/ is chosen again from the validations after step {step}"
            )
        elif found is not None:
            self.rundir.say(f"removed best/ (step {found.get('step')}): it came after the checkpoint (step {step})")
        return None

    def _checkpoint(self, step: int) -> None:
        """A resumable checkpoint after ``step`` in files that cannot run code (rundir/runstate); every process calls it."""
        nonfinite.check_finite_params(
            self.acc, self.trainee, f"train-reward: the checkpoint at step {step}", hint=self._hint()
        )
        sampler = _sampler(self.train_loader)
        data = {"micro_batches": step * self.cfg.grad_accum, "sampler_seed": sampler.initial_seed if sampler else None}

        def save(tmp: Path) -> str:
            return runstate.save_training_state(
                self.acc, tmp, self.optimizer, model=self.trainee, scheduler=self.scheduler
            )

        state = {"metrics": self._plain_metrics(step), "data": data, "best": self.best}
        self.rundir.save_checkpoint(self.acc, step, state, self.cfg.checkpoints_keep, save=save)
        self.cadence.saved()
        self.last_saved = step
        self.best_recorded = self.best
        if self.acc.is_main_process:  # the checkpoint records best/ now: the one it replaced is no longer needed
            shutil.rmtree(self.out / BEST_PREVIOUS, ignore_errors=True)

    def _loop(self, start: int) -> int:
        cfg, acc = self.cfg, self.acc
        bar = tqdm(
            total=cfg.steps,
            initial=start,
            desc=f"train {cfg.stage}",
            unit="step",
            file=sys.stderr,
            disable=not (cfg.progress and acc.is_local_main_process),
        )
        step, running, micro, finite = start, [], [], True
        say = (lambda line: print(line, flush=True)) if acc.is_main_process else None
        self.nonfinite = nonfinite.NonFiniteRule(cfg.max_nonfinite, "train-reward: ", say, prefix="train-reward: ")
        params = [p for p in self.trainee.parameters() if p.requires_grad]
        for batch in _batches(acc, self.train_loader, start * cfg.grad_accum):
            with acc.accumulate(self.trainee):
                loss, info = self.stage.loss(self.trainee, batch)
                # every process computes the loss over the gathered global batch: they skip together
                finite &= nonfinite.backward(acc, loss, params, agree=True)
                micro.append(loss.item())
                if acc.sync_gradients:
                    info["grad_norm"], applied = nonfinite.optimizer_step(
                        acc, self.optimizer, params, cfg.max_grad_norm, finite
                    )
            if not acc.sync_gradients:
                continue
            info["lr"] = self.scheduler.get_last_lr()[0]  # the rate this step used
            with warnings.catch_warnings():  # a skipped update is no reason for torch's "scheduler before optimizer"
                warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
                self.scheduler.step()
            step += 1
            self.nonfinite.count(applied, step, self._hint())
            running.append(sum(micro) / len(micro))
            micro, finite = [], True
            self.metrics.update({k: v for k, v in info.items() if isinstance(v, int)})
            self.metrics["skipped_steps"] = self.nonfinite.skipped
            bar.update(1)
            bar.set_postfix(loss=f"{running[-1]:.4f}")
            self._periodic(step, running, info)
            if step >= cfg.steps:
                break
        bar.close()
        nonfinite.check_finite_params(
            acc, self.trainee, f"train-reward: the {cfg.stage.upper()} model after step {step}", hint=self._hint()
        )
        return step

    def _hint(self) -> str:
        """What to try when the training diverges."""
        cfg = self.cfg
        hint = "try a lower --lr" + (" or gradient clipping (--max-grad-norm 1)" if cfg.max_grad_norm <= 0 else "")
        return hint + (" or --mixed-precision bf16" if self.acc.mixed_precision == "fp16" else "")

    def _periodic(self, step: int, running: list, info: dict) -> None:
        cfg, acc = self.cfg, self.acc
        if step % cfg.log_every == 0 or step == cfg.steps:
            logs = {"train/loss": sum(running) / len(running)}
            logs.update({f"train/{k}": v for k, v in info.items() if isinstance(v, float)})
            logs["train/global_batch"] = info["global_batch"]
            acc.log(logs, step=step)
            self.metrics.update(logs)
            running.clear()
        if step == cfg.steps or (cfg.eval_interval and step % cfg.eval_interval == 0):
            self._validate_and_log(step)
        if self.cadence.due(step):
            self._checkpoint(step)
        code = self.rundir.interruption(acc)
        if code:
            save = (
                (lambda: None if self.last_saved == step else self._checkpoint(step)) if self.cadence.enabled else None
            )
            self.rundir.stop(code, step, cfg.steps, save)

    def _validate_and_log(self, step: int) -> None:
        val = self.validate()
        if val:
            self.acc.log(val, step=step)
            self.metrics.update(val)
        metric, mode = BEST_METRIC[self.cfg.stage]
        value = val.get(metric)
        if step == 0 or value is None:  # the untrained model (eval-every 0) is no candidate
            return
        if self.best is None or (value < self.best["value"] if mode == "min" else value > self.best["value"]):
            self.best = {"step": step, "metric": metric, "mode": mode, "value": value}
            self._write_best()

    def _write_best(self) -> None:
        """Write best/ (every process calls it), whole: staged and renamed like a checkpoint, with a manifest.
        A best/ that the last checkpoint recorded moves to ``BEST_PREVIOUS`` first, so that a run resumed
        from that checkpoint finds it again."""
        acc, best = self.acc, self.out / BEST_DIR
        state = acc.get_state_dict(self.trainee)
        if acc.is_main_process and self.best_recorded is not None and _best_record(best) == _same(self.best_recorded):
            shutil.rmtree(self.out / BEST_PREVIOUS, ignore_errors=True)
            best.rename(self.out / BEST_PREVIOUS)

        def save(tmp: Path) -> None:
            if acc.is_main_process:
                self.stage.write_output(state, tmp)

        write_checkpoint(acc, best, save, self.best)
        self.rundir.say(
            f"step {self.best['step']}: best {self.best['metric']} so far ({self.best['value']:.4g}); "
            f"model written to '{best}'"
        )

    def _no_best(self) -> None:
        """No validation picked a best (no validation data): a best/ left by a run this one replaced goes."""
        for d in (self.out / BEST_DIR, self.out / BEST_PREVIOUS):
            shutil.rmtree(d, ignore_errors=True)
        why = "no validation data" if self.val_loader is None else "no validation after training picked a best"
        self.rundir.say(
            f"{why}: no {BEST_DIR}/ kept; the last step's model in '{self.out}' is what --ict/--hp '{self.out}' load"
        )

    def _plain_metrics(self, step: int) -> dict:
        return {**{k: v for k, v in self.metrics.items() if isinstance(v, (int, float))}, "step": step}

    def _finish(self, start: int, step: int) -> None:
        """A last checkpoint (unless checkpoints are off: then a finished run cannot be continued), the model,
        and ``metrics.json``, written last: its presence marks the run finished."""
        acc = self.acc
        if self.rundir.interruption(acc) == LOCK_LOST:  # the outputs are written only while the directory is ours
            self.rundir.stop(LOCK_LOST, step, self.cfg.steps, None)
        if self.cadence.enabled and self.last_saved != step:
            self._checkpoint(step)
        acc.wait_for_everyone()
        state = acc.get_state_dict(self.trainee)
        self.metrics.update(self._plain_metrics(step))
        self.metrics.update({"start_step": start, "steps_run": step - start, "num_processes": acc.num_processes})
        if self.best is not None:
            self.metrics.update({f"best_{k}": v for k, v in self.best.items()})
        if acc.is_main_process:
            self.stage.write_output(state, self.out)
            if self.best is None:
                self._no_best()
            self.rundir.write_config(self.cfg)
            self.rundir.write_json("metrics.json", self.metrics)
        acc.wait_for_everyone()
        acc.end_training()


def _best_record(directory: Path) -> dict | None:
    """Step and value of the best model in ``directory`` (None: none there, or unreadable)."""
    try:
        return _same(json.loads((directory / STATE_FILE).read_text()))
    except (OSError, ValueError):
        return None


def _same(best: dict | None) -> dict | None:
    """What identifies a best: its step and value (compared after a JSON round trip)."""
    return None if not isinstance(best, dict) else {"step": best.get("step"), "value": best.get("value")}


def train_reward(cfg: TrainRewardConfig) -> dict:
    """Train ICT or HP per ``cfg``; write the model to ``cfg.output``; return the final metrics (with
    ``nothing_to_do: True`` when ``--resume`` finds the run already finished at ``--steps``)."""
    cfg.validate()
    rundir = run_dir(cfg.output)
    with rundir.lock():
        start = rundir.plan(
            cfg.resume, cfg.overwrite, cfg.steps, cfg.trust_pickle
        )  # before any model loads: fail fast
        if start.action == "done":
            rundir.say(
                f"nothing to do: the run in '{rundir.root}' already trained {start.record.get('step')} steps "
                f"(--steps {cfg.steps}); raise --steps to train further"
            )
            return {**start.record, "nothing_to_do": True}
        settings = run_settings(cfg)
        changed = rundir.check_settings(start, settings)
        check_batch_fits(resolve(cfg.backbone, "CLIP backbone"), cfg.batch_size, cfg.mixed_precision, cfg.force)
        reset_accelerate()
        try:
            return Run(cfg, rundir, start, settings, changed).train()
        finally:
            reset_accelerate()

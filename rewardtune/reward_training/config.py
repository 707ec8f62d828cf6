"""``TrainRewardConfig``: every option of ``rewardtune train-reward`` (and of its YAML recipes)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import PRECISIONS, check_values, option
from ..errors import UserError
from ..nonfinite import max_nonfinite_option
from ..sources import REWARD_SOURCES

STAGE_DEFAULTS = {"ict": {"lr": 3e-5, "freeze_ratio": 0.0}, "hp": {"lr": 3e-6, "freeze_ratio": 0.5}}


@dataclass
class TrainRewardConfig:
    ERROR_PREFIX = "train-reward: "  # not a field: starts this config's error messages

    stage: str = option(
        "ict",
        "which model to train: ict (text-image CLIP) or hp (image-only preference head; needs --ict)",
        choices=["ict", "hp"],
    )
    data: str = option("", "data root: <split>.parquet/.jsonl, or the published Pick-High/<split>.pkl layout")
    output: str = option("", "output directory: the trained model, checkpoints/, logs/, config.yaml, metrics.json")
    backbone: str = option(
        REWARD_SOURCES["backbone"].hub,
        "CLIP to start from (HF directory or hub id); for hp, also the backbone of a released-layout --ict",
    )
    ict: str | None = option(None, "trained ICT model for --stage hp (our --output, or the released layout / hub id)")
    steps: int = option(1000, "optimizer steps to train for (the total, also when resuming)", min=1)
    batch_size: int = option(32, "triplets per process per micro-batch (the paper: 32 per GPU on 8 GPUs)", min=1)
    grad_accum: int = option(1, "gradient accumulation: micro-batches per optimizer step", min=1)
    force: bool = option(
        False, "run even where the check before loading says --batch-size cannot fit in memory (the image tower)"
    )
    lr: float | None = option(None, "peak learning rate (default: 3e-5 for ict, 3e-6 for hp)", positive=True)
    weight_decay: float = option(0.01, "AdamW weight decay")
    warmup_steps: int | None = option(
        None, "optimizer steps of warmup from 0 to --lr (default: a twentieth of --steps)", min=0
    )
    warmup_type: str = option(
        "linear",
        "warmup shape: linear, or log (lr * ln(step+1) / ln(warmup), DeepSpeed WarmupDecayLR's default, "
        "which the released config ran)",
        choices=["linear", "log"],
    )
    lr_schedule: str = option(
        "linear",
        "after warmup: linear decay to 0 (as published), cosine, or constant",
        choices=["linear", "cosine", "constant"],
    )
    max_grad_norm: float = option(1.0, "gradient clipping norm (0 disables)", min=0)
    max_nonfinite: int = max_nonfinite_option()
    freeze_ratio: float | None = option(
        None,
        "fraction of each trained CLIP tower's layers frozen from the bottom "
        "(default: 0 for ict, 0.5 of the vision layers for hp)",
        min=0,
        max=1,
    )
    freeze_embeddings: bool = option(
        False, "also freeze the embeddings below frozen layers (faster backward; the released code trains them)"
    )
    neg_weight: float = option(0.5, "ict: weight of the in-batch negatives term")
    margin: float = option(0.3, "hp: margin of the ranking losses")
    hp_weight: float = option(1.0, "hp: weight of the HP margin loss")
    icthp_weight: float = option(1.0, "hp: weight of the ICT x softmax(HP) margin loss")
    mixed_precision: str | None = option(
        None, "no, fp16 or bf16 (the paper: bf16); default: the accelerate config's, else no", choices=PRECISIONS
    )
    gradient_checkpointing: bool = option(False, "recompute activations in backward to save memory")
    seed: int = option(42, "random seed, 0 to 2^32-1 (numpy's range)", min=0, max=2**32 - 1)
    num_workers: int = option(2, "data loader worker processes per training process", min=0)
    train_split: str = option("train", "split to train on")
    eval_split: str = option("val", "split for periodic validation accuracy ('' disables)")
    eval_every: int | None = option(
        None,
        "validate every N steps and after the last step (default: five times per run; "
        "0: only before the first step and after the last)",
        min=0,
    )
    eval_limit: int = option(0, "validate on the first N triplets only (0: all)", min=0)
    log_every: int = option(10, "log the training loss every N steps", min=1)
    checkpoint_every: int = option(
        1000,
        "save a resumable checkpoint every N steps and after the last one (0 and no --checkpoint-minutes: never)",
        min=0,
        aliases=("save_every",),
    )
    checkpoints_keep: int = option(2, "how many recent checkpoints to keep", min=1, aliases=("keep_checkpoints",))
    checkpoint_minutes: float = option(
        0.0,
        "also save a checkpoint when this many minutes have passed since the last one "
        "(0: off), so a killed run loses at most that much",
        min=0,
    )
    resume: bool = option(
        False,
        "continue the run in <output> from its newest intact checkpoint (with none yet: start "
        "from the beginning; a finished run: train on to a larger --steps)",
    )
    overwrite: bool = option(
        False, "replace a finished run or a run in progress in <output> (its checkpoints, logs and model)"
    )
    export_official: bool = option(
        False, "also write the released layout (pytorch_model.bin; hp_backbone/, hp_scorer/mlp_pytorch_model.bin)"
    )
    trust_pickle: bool = option(
        False,
        "allow loading pickles: the published .pkl split files (prefer 'rewardtune data convert'), "
        "and checkpoints written under FSDP/DeepSpeed or before 0.1 (a pickle can run code)",
    )
    check_images: bool = option(
        True,
        "open every image once before training to report missing or corrupt files "
        "(--no-check-images for a large set already checked with 'rewardtune data check')",
    )
    skip_bad: bool = option(False, "drop bad rows (missing/corrupt images, labels outside [0,1]) instead of stopping")
    progress: bool = option(True, "show a progress bar")

    def validate(self) -> None:
        check_values(self)
        if not self.data:
            raise UserError("train-reward: --data is required (the data root)")
        if not self.output:
            raise UserError("train-reward: --output is required (where the trained model goes)")
        if self.stage == "hp" and not self.ict:
            raise UserError(
                "train-reward: --stage hp needs --ict (the trained ICT model, e.g. the --output of --stage ict)"
            )

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else STAGE_DEFAULTS[self.stage]["lr"]

    @property
    def frozen_fraction(self) -> float:
        return self.freeze_ratio if self.freeze_ratio is not None else STAGE_DEFAULTS[self.stage]["freeze_ratio"]

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else int(0.05 * self.steps)

    @property
    def eval_interval(self) -> int:
        """Steps between validations (0: none between the first and the last step)."""
        return max(1, self.steps // 5) if self.eval_every is None else self.eval_every

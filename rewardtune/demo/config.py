"""``DemoConfig``: the options of ``rewardtune demo``, in a module of their own so that ``--help`` imports no torch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import check_values, derived, option
from ..finetune.config import FinetuneConfig
from ..threads import THREADS_HELP

MODELS_DIR = Path(__file__).resolve().parent / "models"  # the bundled models (scripts/build_demo_models.py)


@dataclass
class DemoConfig:
    """The demo's options. The fine-tuning ones are ``FinetuneConfig``'s (help, choices and range said there),
    with the demo's defaults, and its own help where the demo gives them another meaning."""

    ERROR_PREFIX = "demo: "  # not a field: starts this config's error messages

    output: str = option(
        "rewardtune-demo", "output directory: summary.json, report.html, image grids, finetune/ (the LoRA)"
    )
    models: str = option(
        str(MODELS_DIR), "models directory, as scripts/build_demo_models.py writes it (the bundled one)"
    )
    reward: str = derived(
        FinetuneConfig,
        "reward",
        help="training reward from the bundled models: icthp (the paper's ICT x HP), ict, hp, pickscore "
        "(the world CLIP fine-tuned PickScore's way), clip (the world CLIP itself), or a mix like 'ict:1.0,hp:0.5'",
    )
    steps: int = derived(FinetuneConfig, "steps", 300)
    batch_size: int = derived(FinetuneConfig, "batch_size", 8)
    lr: float = derived(FinetuneConfig, "lr", 1e-3)
    lr_schedule: str = derived(FinetuneConfig, "lr_schedule")
    lora_rank: int = derived(FinetuneConfig, "lora_rank")
    lora_targets: list = derived(FinetuneConfig, "lora_targets")
    train_text_encoder: bool = derived(FinetuneConfig, "train_text_encoder")
    reg_weight: float = derived(FinetuneConfig, "reg_weight")
    k: int | None = derived(
        FinetuneConfig,
        "k",
        None,
        help="DRaFT-K: denoising steps that carry gradients (default: all --sample-steps; background, "
        "colour and layout are decided in the early steps, which K=1 cannot reach)",
    )
    sample_steps: int = derived(
        FinetuneConfig,
        "sample_steps",
        6,
        help="DDIM steps per image in training and evaluation (the bundled generator's base oracle on 256 held-out "
        "prompts at the default guidance 1.0 is 0.575 at 6 and 0.569 at 10: 6 costs 0.6x the time)",
    )
    checkpoint_calls: bool = derived(
        FinetuneConfig,
        "checkpoint_calls",
        False,
        help="checkpoint each whole denoising call on the gradient steps (off in the demo: its activations "
        "are small, and the recomputation would cost most of a step)",
    )
    guidance_scale: float = derived(
        FinetuneConfig,
        "guidance_scale",
        1.0,
        help="classifier-free guidance (1.0 = none: no unconditional pass, so half the UNet calls; the bundled "
        "generator's base oracle on 256 prompts is 0.56 there, 0.65 at 1.5 and 0.73 at 3, where the fine-tuning "
        "would have little left to show)",
    )
    eval_every: int = derived(
        FinetuneConfig,
        "eval_every",
        50,
        help="evaluate (training reward, held-out CLIP, oracle) every N steps (0 = only before and after)",
    )
    eval_size: int = derived(
        FinetuneConfig, "eval_size", 64, help="held-out prompts evaluated, one image each, same seeds before and after"
    )
    eval_seeds: int = derived(
        FinetuneConfig,
        "eval_seeds",
        1,
        help="noise seeds rendered per held-out prompt (default 1: the demo's measured times; 2 or more turn on the "
        "seed-similarity monitor, which in the demo's validation rose past its threshold on every run, hacked or not)",
    )
    stop_on_hacking: bool = derived(FinetuneConfig, "stop_on_hacking")
    monitor_saturation: float = derived(FinetuneConfig, "monitor_saturation")
    monitor_seed_similarity: float = derived(FinetuneConfig, "monitor_seed_similarity")
    monitor_prompt_similarity: float = derived(FinetuneConfig, "monitor_prompt_similarity")
    monitor_hf_energy: float = derived(FinetuneConfig, "monitor_hf_energy")
    monitor_eval_reward: float = derived(FinetuneConfig, "monitor_eval_reward")
    monitor_temporal_consistency: float = derived(FinetuneConfig, "monitor_temporal_consistency")
    train_prompts: int = option(200, "distinct training prompts", min=1)
    seed: int = derived(FinetuneConfig, "seed", help="random seed (which prompts are drawn and their order, noise)")
    threads: int | None = option(None, THREADS_HELP, min=1)
    checkpoint_every: int = derived(FinetuneConfig, "checkpoint_every", 0)
    checkpoint_minutes: float = derived(
        FinetuneConfig,
        "checkpoint_minutes",
        1.0,
        help="save a checkpoint when this many minutes have passed since the last one (0 = off), so a stopped "
        "demo continues with --resume, losing at most that much",
    )
    resume: bool = derived(
        FinetuneConfig,
        "resume",
        help="continue the demo in --output from its newest intact checkpoint "
        "(with none yet: start from the beginning; a finished demo: train on to a larger --steps)",
    )
    overwrite: bool = option(False, "replace a finished demo or a demo in progress in --output")
    compare: bool = option(
        False,
        "the same fine-tuning once per reward (icthp, ict, hp, pickscore, clip; replaces --reward), each in "
        "--output/<reward>/, plus their triplet accuracy on the test split and compare.{json,md}, report.html",
    )
    test_triplets: int = option(
        1000, "--compare: triplets of the regenerated test split the accuracy is measured on", min=1
    )

    def __post_init__(self) -> None:
        if self.k is None:  # every sampling step, however many --sample-steps asks for
            self.k = self.sample_steps

    def validate(self) -> None:
        check_values(self)

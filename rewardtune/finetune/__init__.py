"""Reward fine-tuning of SD 1.x/2.x, SDXL, SD3/SD3.5 and FLUX.1 LoRA: DRaFT-K, DRaFT-LV, ReFL and AlignProp as
settings of one truncated differentiable sampler.

Public API: ``FinetuneConfig``, ``run_finetune(cfg, reward=None, eval_reward=None, eval_hook=None)``,
``Trainer`` (``.step()`` and its parts), ``load_lora(pipe, dir)``, ``sample(pipe, prompts, ...)`` (the
trainer's sampler on a pipeline) and ``training_scheduler(pipe)``.
"""

from ..lazy import lazy_exports

# imported on first use: ``rewardtune.finetune.config`` (FinetuneConfig, for --help) must not pull in torch
__getattr__ = lazy_exports(
    __name__,
    {
        "FinetuneConfig": "config",
        "METHODS": "config",
        "load_lora": "lora",
        "training_scheduler": "models",
        "run_finetune": "run",
        "sample": "sampling",
        "Trainer": "trainer",
    },
)

__all__ = ["FinetuneConfig", "METHODS", "Trainer", "load_lora", "run_finetune", "sample", "training_scheduler"]

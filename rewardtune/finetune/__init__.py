"""Reward fine-tuning of SD 1.x/2.x, SDXL, SD3/SD3.5 and FLUX.1 LoRA: DRaFT-K, DRaFT-LV, ReFL and AlignProp as
settings of one truncated differentiable sampler.

Public API: ``FinetuneConfig``, ``run_finetune(cfg, reward=None, eval_reward=None, eval_hook=None)``,
``Trainer`` (``.step()`` and its parts), ``load_lora(pipe, dir)``, ``sample(pipe, prompts, ...)`` (the
trainer's sampler on a pipeline) and ``training_scheduler(pipe)``.
"""

from .config import METHODS, FinetuneConfig
from .lora import load_lora
from .models import training_scheduler
from .run import run_finetune
from .sampling import sample
from .trainer import Trainer

__all__ = ["FinetuneConfig", "METHODS", "Trainer", "load_lora", "run_finetune", "sample", "training_scheduler"]

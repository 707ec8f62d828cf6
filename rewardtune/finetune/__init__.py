"""Reward fine-tuning of SD 1.x/2.x and SDXL LoRA: DRaFT-K, DRaFT-LV, ReFL and AlignProp as settings of
one truncated differentiable sampler.

Public API: ``FinetuneConfig``, ``run_finetune(cfg, reward=None, eval_reward=None, eval_hook=None)``,
``Trainer`` (``.step()`` and its parts), ``load_lora(pipe, dir)``.
"""

from .config import METHODS, FinetuneConfig
from .lora import load_lora
from .run import run_finetune
from .trainer import Trainer

__all__ = ["FinetuneConfig", "METHODS", "Trainer", "load_lora", "run_finetune"]

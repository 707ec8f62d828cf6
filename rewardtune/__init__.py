"""rewardtune: ICT/HP reward models and reward fine-tuning of diffusion models with LoRA."""

__version__ = "0.1.0"

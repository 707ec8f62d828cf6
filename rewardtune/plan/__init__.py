"""``rewardtune plan``: full-size architectures built without downloads (``architectures``) and the
peak-memory planner that traces a real fine-tuning step on fake tensors (``memory``)."""

from .architectures import (
    ARCHITECTURES,
    arch_config,
    build_clip,
    build_parts,
    build_pipeline,
    build_reward,
    save_pipeline,
)
from .memory import StorageTracker, fit_budget, predict_peak_memory

__all__ = [
    "ARCHITECTURES",
    "StorageTracker",
    "arch_config",
    "build_clip",
    "build_parts",
    "build_pipeline",
    "build_reward",
    "fit_budget",
    "predict_peak_memory",
    "save_pipeline",
]

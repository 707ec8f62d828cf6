"""``rewardtune plan``: full-size architectures built without downloads (``architectures``) and the
peak-memory planner that traces a real fine-tuning step on fake tensors (``memory``; its repeated layers:
``stacks``; answers kept on disk: ``cache``).

The names below are loaded on first use, so ``rewardtune.plan.cache`` can answer a plan asked before without
importing the model libraries."""

from __future__ import annotations

import importlib

_WHERE = {
    "ARCHITECTURES": "architectures",
    "arch_config": "architectures",
    "build_clip": "architectures",
    "build_parts": "architectures",
    "build_pipeline": "architectures",
    "build_reward": "architectures",
    "save_pipeline": "architectures",
    "StorageTracker": "memory",
    "fit_budget": "memory",
    "predict_peak_memory": "memory",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'rewardtune.plan' has no attribute '{name}'")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)

"""Reward registry: ``load_reward(name_or_mix, device=..., dtype=..., **sources)``.

Every reward maps float images ``(B,3,H,W)`` in [0,1] and B prompts to ``(B,)`` scores,
differentiably in the pixels. Sources are the keys of ``sources.REWARD_SOURCES`` (``ict=``, ``hp=``,
``backbone=``, and one per baseline), each a local directory or hub id.
"""

from __future__ import annotations

import difflib

import torch

from ..config import flag_name
from ..errors import UserError, check_all
from ..sources import REWARD_SOURCES, check_available
from . import baselines, hpsv3, icthp
from .base import Reward
from .batching import score_by_size
from .compose import WeightedSum, parse_spec

REWARD_NAMES = ("ict", "hp", "icthp", "clip", "pickscore", "hpsv2.0", "hpsv2.1", "aesthetic", "imagereward", "hpsv3")
# Other names a reward answers to; a run records the name they stand for (config.yaml, summary.json).
ALIASES = {"hpsv2": "hpsv2.1"}

__all__ = [
    "Reward",
    "REWARD_NAMES",
    "ALIASES",
    "canonical_spec",
    "load_reward",
    "load_rewards",
    "parse_spec",
    "score_by_size",
    "WeightedSum",
]


def _check_name(name: str) -> str:
    """The registry name ``name`` stands for (an alias resolved); an unknown name is a ``UserError``."""
    if name in ALIASES:
        return ALIASES[name]
    if name not in REWARD_NAMES:
        close = difflib.get_close_matches(name, [*REWARD_NAMES, *ALIASES], n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        aliases = ", ".join(f"{a} = {n}" for a, n in ALIASES.items())
        raise UserError(f"reward: unknown reward '{name}'{hint}; valid rewards: {', '.join(REWARD_NAMES)} ({aliases})")
    return name


def canonical_spec(spec: str) -> str:
    """``spec`` with every alias written as the name it stands for (``hpsv2:0.5`` -> ``hpsv2.1:0.5``), so a run's
    config.yaml says which reward (and HPS version) it trained on."""
    return ",".join(n if w is None else f"{n}:{w:g}" for n, w in ((_check_name(n), w) for n, w in parse_spec(spec)))


class _Loader:
    """Builds rewards, sharing the ICT and HP models between ``ict``, ``hp`` and ``icthp``."""

    def __init__(self, dtype, sources):
        unknown = sorted(set(sources) - set(REWARD_SOURCES))
        if unknown:
            raise UserError(f"reward: unknown source(s) {', '.join(unknown)}; valid: {', '.join(REWARD_SOURCES)}")
        self.dtype = dtype
        self.sources = {k: v for k, v in sources.items() if v is not None}
        self.cache: dict[str, Reward] = {}

    def get(self, name: str) -> Reward:
        name = _check_name(name)
        if name not in self.cache:
            self.cache[name] = self._build(name)
        return self.cache[name]

    def _build(self, name: str) -> Reward:
        s, dt = self.sources, self.dtype
        if name == "ict":
            return icthp.ICTReward.load(ict=s.get("ict"), backbone=s.get("backbone"), dtype=dt)
        if name == "hp":
            return icthp.HPReward.load(hp=s.get("hp"), backbone=s.get("backbone"), dtype=dt)
        if name == "icthp":
            return icthp.ICTHPReward(self.get("ict"), self.get("hp"))

        source = REWARD_SOURCE.get(name, name)
        return BUILDERS[name](source=s.get(source), dtype=dt, sources=s, get=self.get)


BUILDERS = {**baselines.BUILDERS, "hpsv3": hpsv3.build_hpsv3}

# What each reward loads from which source, named as its loader names it; ICT and HP lay over the CLIP backbone.
SOURCE_WHAT = {
    "ict": "ICT checkpoint",
    "hp": "HP checkpoint",
    "backbone": "CLIP backbone",
    "clip": "CLIP model",
    "pickscore": "PickScore model",
    "hpsv2": "HPS v2 checkpoint",
    "aesthetic": "aesthetic predictor",
    "imagereward": "ImageReward checkpoint",
    "imagereward_tokenizer": "ImageReward tokenizer",
    "hpsv3": "HPSv3 checkpoint",
    "qwen2vl": "Qwen2-VL base of HPSv3",
}
# The source key of a reward named otherwise (both HPS v2 versions read --hpsv2: the hub repo holds both files).
REWARD_SOURCE = {"hpsv2.0": "hpsv2", "hpsv2.1": "hpsv2"}
READS = {
    "ict": ("ict",),
    "hp": ("hp",),
    "icthp": ("ict", "hp"),
    "aesthetic": ("aesthetic", "clip"),
    "hpsv3": ("hpsv3", "qwen2vl"),
}


def check_sources(names, sources: dict) -> None:
    """Before any model loads, every source the rewards ``names`` read that is missing, named in one error: each
    reward's checkpoint, and the CLIP backbone where ICT or HP lays over it: given with ``--backbone`` or read by a
    hub ICT/HP release (a local checkpoint that is a full CLIP needs none; one that is not is told when it loads).
    PickScore reads ``--backbone`` only for a tokenizer its own directory lacks; its loader says so when it does."""
    names = [_check_name(n) for n in names]
    keys = list(dict.fromkeys(k for n in names for k in READS.get(n, (REWARD_SOURCE.get(n, n),))))
    given = {k: v for k, v in sources.items() if v is not None}
    over = [k for k in keys if k in ("ict", "hp")]
    if over and ("backbone" in given or any(k not in given for k in over)):
        keys.append("backbone")

    def check(key):
        return lambda: check_available(
            given.get(key) or REWARD_SOURCES[key].hub, f"{SOURCE_WHAT[key]} ({flag_name(key)})"
        )

    check_all(*(check(k) for k in keys))


def _finish(reward: Reward, device) -> Reward:
    reward.requires_grad_(False)
    reward.eval()
    if device is not None:
        reward.to(device)
    return reward


def load_rewards(names: list[str], device=None, dtype: torch.dtype | None = None, **sources) -> dict[str, Reward]:
    """Several named rewards at once (models shared where they coincide), in the given order."""
    loader = _Loader(dtype, sources)
    for n in names:
        _check_name(n)
    check_sources(names, sources)
    return {n: _finish(loader.get(n), device) for n in names}


def load_reward(spec: str, device=None, dtype: torch.dtype | None = None, **sources) -> Reward:
    """One reward by name (``icthp``) or a weighted mix (``ict:1.0,hp:0.5``). Frozen, in eval mode."""
    parts = parse_spec(spec)
    loader = _Loader(dtype, sources)
    for n, _ in parts:
        _check_name(n)
    check_sources([n for n, _ in parts], sources)
    if len(parts) == 1 and parts[0][1] is None:
        return _finish(loader.get(parts[0][0]), device)
    if any(w is None for _, w in parts):
        raise UserError(f"reward: '{spec}' mixes rewards without weights; give each a weight, e.g. 'ict:1.0,hp:0.5'")
    names = [_check_name(n) for n, _ in parts]
    if len(set(names)) != len(names):
        raise UserError(f"reward: '{spec}' names a reward twice; give each once")
    return _finish(WeightedSum({n: loader.get(n) for n in names}, {n: w for n, (_, w) in zip(names, parts)}), device)

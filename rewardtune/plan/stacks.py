"""The repeated layers of the full-size models, and how the planner traces fewer of them.

A stack is a run of identical layers: the flow transformers' blocks as each family declares them (``Family.layers``:
SD3's dual-attention and plain joint blocks, FLUX's double and single blocks, ...), the ViT layers of
the reward's CLIP towers, the CLIP and T5 text encoders. Every layer of a stack holds the same weights and, at the
same moment of the step, the same activations, so each phase's peak is an affine function of each stack's depth.
The planner traces the step with one layer per stack (and once more per traced stack with two) and extends each
phase's peak along those slopes to the full depth (``memory.predict_peak_memory``). Which stacks need a trace:

- the denoiser's stacks (``denoiser_stacks``): their layers keep activations across phases (checkpointed inputs,
  LoRA gradients); each gets a trace with one more layer;
- the reward's vision tower: it keeps activations only while the reward runs forward and backward; those two
  phases get a trace of the reward alone, every other phase gains just the layer's weights;
- the reward's text tower (no gradient reaches it) and the flow families' untrained text encoders (their prompt
  embeddings are cached before the step; they are not resident): weights only, or nothing at all.
"""

from __future__ import annotations

import copy
import importlib
from dataclasses import dataclass

from ..finetune import families

BASE_DEPTH = 1  # layers per stack in the traced model


@dataclass(frozen=True)
class Stack:
    """A run of ``full`` identical layers named ``name`` (``transformer.plain``, ``reward.vision``, ...)."""

    name: str
    full: int


def _worth_it(stacks: list[Stack]) -> list[Stack]:
    """Stacks deep enough to trace fewer of: with two layers the trace with one more layer costs what it saves."""
    return [s for s in stacks if s.full > BASE_DEPTH + 1]


def denoiser_stacks(family: str, config: dict) -> list[Stack]:
    """The reducible stacks of a flow transformer's config, as its family declares them (``Family.layers``; UNets
    have none: their blocks differ in size). The first block (its input takes no gradient in the first gradient
    call) and blocks unlike their neighbours (SD3's last) are blocks of their own, not part of a stack."""
    layers = families.by_name(family).layers
    if layers is None:
        return []
    return _worth_it([Stack(name, full) for name, full in layers.stacks(config).items()])


def denoiser_overrides(family: str, config: dict, depths: dict[str, int]) -> dict:
    """The transformer config keys that give its stacks ``depths`` ({stack name: layers}; others keep theirs)."""
    layers = families.by_name(family).layers
    return {} if layers is None else layers.overrides(config, depths)


def denoiser_blocks(family: str, model) -> list[tuple[object, str]]:
    """(block module, its stack's name) for every block of a flow transformer, in forward order; the first block is
    ``transformer.first``; nothing for a UNet."""
    layers = families.by_name(family).layers
    return [] if layers is None else layers.blocks(model)


def text_encoder_overrides(configs: dict, trained: bool) -> dict:
    """A flow pipeline's text encoders with one layer: T5 always (never resident, its output's shape does not
    depend on depth), the CLIP encoders unless they are trained (then they are resident and run in the step). The
    LLM encoders keep their depth: the pipelines read chosen layers' states (FLUX.2: Qwen3's 9/18/27)."""
    out = {}
    for part, config in configs.items():
        if not part.startswith("text_encoder"):
            continue
        if "d_model" in config and "num_layers" in config:  # T5
            out[part] = {"num_layers": BASE_DEPTH}
        elif config.get("model_type") == "clip_text_model" and not trained:
            out[part] = {"num_hidden_layers": BASE_DEPTH}
    return out


def reward_stacks(clip_config: dict) -> list[Stack]:
    """The reward towers' vision and text layers (a CLIPConfig dict: ``vision_config``, ``text_config``)."""
    stacks = [
        Stack("reward.vision", int(clip_config["vision_config"]["num_hidden_layers"])),
        Stack("reward.text", int(clip_config["text_config"]["num_hidden_layers"])),
    ]
    return _worth_it(stacks)


def module_reward_stacks(module_name: str) -> list[Stack]:
    """The stacks a reward module declares (``plan_stacks()``: {stack name: released depth}; its
    ``build_full_size(depths=...)`` builds them at other depths); none for a module that declares none."""
    declared = getattr(importlib.import_module(module_name), "plan_stacks", None)
    return _worth_it([Stack(name, full) for name, full in declared().items()]) if declared else []


def reward_config(clip_config: dict, depths: dict[str, int]) -> dict:
    """``clip_config`` with the towers' layers of ``depths`` (stacks not named keep theirs)."""
    out = copy.deepcopy(clip_config)
    for name, key in (("reward.vision", "vision_config"), ("reward.text", "text_config")):
        if name in depths:
            out[key]["num_hidden_layers"] = depths[name]
    return out

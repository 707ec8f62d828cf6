"""The repeated layers of the full-size models, and how the planner traces fewer of them.

A stack is a run of identical layers: SD3's joint blocks (SD3.5-Medium: the dual-attention ones and the plain ones;
the last block, which keeps no text stream, is not part of it), FLUX's double and single blocks, the ViT layers of
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
from dataclasses import dataclass

BASE_DEPTH = 1  # layers per stack in the traced model


@dataclass(frozen=True)
class Stack:
    """A run of ``full`` identical layers named ``name`` (``transformer.plain``, ``reward.vision``, ...)."""

    name: str
    full: int


def _worth_it(stacks: list[Stack]) -> list[Stack]:
    """Stacks deep enough to trace fewer of: with two layers the trace with one more layer costs what it saves."""
    return [s for s in stacks if s.full > BASE_DEPTH + 1]


def _sd3_counts(config: dict) -> tuple[int, int, int] | None:
    """SD3's joint blocks as (dual-attention, plain) between the first and the last block, and whether the first is
    a dual one; None where the dual-attention blocks are not the first ones (then nothing is reduced)."""
    n, dual = int(config.get("num_layers", 0)), list(config.get("dual_attention_layers") or [])
    if n < 3 or dual != list(range(len(dual))) or len(dual) > n - 1:
        return None
    first_dual = int(bool(dual))
    return len(dual) - first_dual, n - 2 - (len(dual) - first_dual), first_dual


def denoiser_stacks(family: str, config: dict) -> list[Stack]:
    """The reducible stacks of a flow transformer's config (UNets have none: their blocks differ in size). The first
    block (its input takes no gradient in the first gradient call) and SD3's last one (it keeps no text stream) are
    blocks of their own, not part of a stack."""
    if family == "sd3":
        counts = _sd3_counts(config)
        if counts is None:
            return []
        stacks = [Stack("transformer.dual", counts[0]), Stack("transformer.plain", counts[1])]
    elif family == "flux":
        stacks = [
            Stack("transformer.double", int(config.get("num_layers", 0)) - 1),
            Stack("transformer.single", int(config.get("num_single_layers", 0))),
        ]
    else:
        return []
    return _worth_it(stacks)


def denoiser_overrides(family: str, config: dict, depths: dict[str, int]) -> dict:
    """The transformer config keys that give its stacks ``depths`` ({stack name: layers}; others keep theirs)."""
    if family == "sd3":
        n_dual, n_plain, first_dual = _sd3_counts(config)
        n_dual = depths.get("transformer.dual", n_dual)
        n_plain = depths.get("transformer.plain", n_plain)
        return {"num_layers": n_dual + n_plain + 2, "dual_attention_layers": list(range(first_dual + n_dual))}
    if family == "flux":
        return {
            "num_layers": 1 + depths.get("transformer.double", int(config["num_layers"]) - 1),
            "num_single_layers": depths.get("transformer.single", int(config["num_single_layers"])),
        }
    return {}


def denoiser_blocks(family: str, model) -> list[tuple[object, str]]:
    """(block module, its stack's name) for every block of a flow transformer, in forward order; the first block is
    ``transformer.first`` and SD3's last ``transformer.last``; nothing for a UNet."""
    if family == "sd3":
        blocks, dual = list(model.transformer_blocks), len(model.config.get("dual_attention_layers") or [])
        names = ["transformer.dual" if i < dual else "transformer.plain" for i in range(len(blocks))]
        names[0], names[-1] = "transformer.first", "transformer.last"
        return list(zip(blocks, names))
    if family == "flux":
        blocks = [(b, "transformer.double") for b in model.transformer_blocks]
        blocks[0] = (blocks[0][0], "transformer.first")
        return blocks + [(b, "transformer.single") for b in model.single_transformer_blocks]
    return []


def text_encoder_overrides(configs: dict, trained: bool) -> dict:
    """A flow pipeline's text encoders with one layer: T5 always (never resident, its output's shape does not
    depend on depth), the CLIP encoders unless they are trained (then they are resident and run in the step)."""
    out = {}
    for part, config in configs.items():
        if not part.startswith("text_encoder"):
            continue
        if "d_model" in config and "num_layers" in config:  # T5
            out[part] = {"num_layers": BASE_DEPTH}
        elif "num_hidden_layers" in config and not trained:
            out[part] = {"num_hidden_layers": BASE_DEPTH}
    return out


def reward_stacks(clip_config: dict) -> list[Stack]:
    """The reward towers' vision and text layers (a CLIPConfig dict: ``vision_config``, ``text_config``)."""
    stacks = [
        Stack("reward.vision", int(clip_config["vision_config"]["num_hidden_layers"])),
        Stack("reward.text", int(clip_config["text_config"]["num_hidden_layers"])),
    ]
    return _worth_it(stacks)


def reward_config(clip_config: dict, depths: dict[str, int]) -> dict:
    """``clip_config`` with the towers' layers of ``depths`` (stacks not named keep theirs)."""
    out = copy.deepcopy(clip_config)
    for name, key in (("reward.vision", "vision_config"), ("reward.text", "text_config")):
        if name in depths:
            out[key]["num_hidden_layers"] = depths[name]
    return out

"""Model families, one module each: everything rewardtune knows of a family is declared in its module's ``FAMILY``
-- the diffusers pipeline class(es) it is, its aliases and their hub ids, the defaults a run takes from it, its
LoRA targets, its adapter (how prompts become the denoiser's conditioning, latent geometry, VAE latents), its FSDP
block classes and planner architectures, and how to assemble its pipeline from parts.

The registry is this package: every module in it that defines ``FAMILY`` (modules starting with ``_`` are
helpers). The rest of the code asks ``by_name`` / ``by_pipeline_class`` (the class is ``model_index.json``'s
``_class_name``) and never names a family itself. A new family is one module here, its configs, a tiny builder
for tests and its tests.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache


@dataclass(frozen=True)
class Alias:
    """A public model a user names by a short name: its hub ids (mirrors after the first) and the model card's
    sampling settings where they differ from the family's; ``guidance_free``: distilled to sample without guidance."""

    hub: tuple[str, ...]
    defaults: dict = field(default_factory=dict)
    guidance_free: bool = False
    plan: str | None = None  # the planner's shipped full-size architecture of this model (Family.plan_architectures)


@dataclass(frozen=True)
class Layers:
    """A flow transformer's repeated blocks, for the planner's one-layer trace (``plan/stacks.py``).
    ``stacks(config)``: {stack name: its layers at full depth} -- a stack is a run of identical blocks; {} where the
    config's layout is not one the family knows (then every layer is traced); ``overrides(config, depths)``: the
    config keys that give the stacks ``depths`` ({stack name: layers}); ``blocks(model)``: (block, stack name) for
    every block in forward order, the first block named ``transformer.first`` (its input takes no gradient in the
    first gradient call), a block unlike its stack (SD3's last) by a name of its own."""

    stacks: Callable[[dict], dict[str, int]]
    overrides: Callable[[dict, dict], dict]
    blocks: Callable[[object], list]


@dataclass(frozen=True)
class Family:
    """One model family (see the package docstring). ``defaults``: the options a run leaves unset take these
    (``sample_steps``, ``guidance_scale``, ``lora_targets``, and ``max_sequence_length`` where a T5-like encoder
    takes one); ``refine_defaults(config, pipeline_config)``: overrides read from the denoiser's config and the
    pipeline's (``model_index.json``'s; e.g. FLUX without a guidance embedding is schnell-like, a FLUX.2-klein with
    ``is_distilled`` samples in 4 steps), with ``guidance_free`` among them (True, or the reason in words) where the
    model samples without guidance."""

    name: str
    order: int  # where it stands in lists shown to people (by release)
    label: str  # how people call it, in messages ("SD 1.x/2.x")
    pipelines: tuple[str, ...]  # diffusers pipeline classes (model_index.json's _class_name)
    adapter: type
    denoiser: str  # the pipeline component that carries the LoRA ("unet", "transformer")
    flow: bool  # sampled by flow-matching Euler steps (else DDIM)
    defaults: dict
    assemble: Callable  # (parts, tokenizer, tokenizer_2, tokenizer_3) -> the pipeline
    aliases: dict[str, Alias] = field(default_factory=dict)
    fsdp_blocks: tuple[str, ...] = ()  # the block classes accelerate's FSDP wraps (recipes/accelerate/)
    # the planner's shipped full-size architectures: {name: {pipeline part: config file in plan/configs}}
    plan_architectures: dict[str, dict[str, str]] = field(default_factory=dict)
    # (parts, CLIP tokenizer) -> (tokenizer, tokenizer_2, tokenizer_3) of a shipped architecture, built offline;
    # None: CLIP's for the first two
    plan_tokenizers: Callable | None = None
    layers: Layers | None = None  # the transformer's repeated blocks (None: the planner traces every layer)
    kohya_text_encoders: int | None = None  # --export kohya: how many text encoders the file names (None: no export)
    # --export comfyui: a denoiser module's diffusers name -> the name in ComfyUI's model (None: not named there), for
    # a family whose diffusers LoRA ComfyUI does not map (None: no such export)
    comfyui_name: Callable[[str], str | None] | None = None
    refine_defaults: Callable | None = None
    fp16_vae_overflows: bool = False  # the VAE overflows in fp16 (a divergence hint names --vae-fp32)
    # the pipeline component of the large text encoder whose outputs are only ever cached (T5, an LLM): it may be
    # quantized, kept on the CPU, or not loaded at all when --prompt-embeddings holds every prompt
    cached_encoder: str | None = None
    load_kwargs: dict = field(default_factory=dict)  # extra from_pretrained arguments (SD: no safety checker)
    # the fewest sampling steps its schedule takes (Qwen-Image: 2, see its module)
    min_sample_steps: int = 1
    guidance_threshold: float = 1.0  # guidance is applied at scales above this (classifier-free: 1; Z-Image: 0)
    options: tuple[str, ...] = ()  # the family-only options it takes (defaults.FAMILY_OPTIONS; Wan: num_frames, ...)
    # further denoisers that may carry a LoRA of their own, each written to a subdirectory of that name (lora.weight_name)
    lora_parts: tuple[str, ...] = ()

    @property
    def plan_names(self) -> tuple[str, ...]:
        return tuple(self.plan_architectures)

    @property
    def takes_sequence_length(self) -> bool:
        return "max_sequence_length" in self.defaults


@cache
def _registry() -> tuple[Family, ...]:
    found = []
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        family = getattr(importlib.import_module(f"{__name__}.{info.name}"), "FAMILY", None)
        if isinstance(family, Family):
            found.append(family)
    return tuple(sorted(found, key=lambda f: f.order))


def all_families() -> tuple[Family, ...]:
    return _registry()


def lora_parts() -> tuple[str, ...]:
    """Every family's ``lora_parts``: the subdirectories a run's LoRA output may hold."""
    return tuple(sorted({part for f in all_families() for part in f.lora_parts}))


def by_name(name: str) -> Family:
    for family in _registry():
        if family.name == name:
            return family
    raise ValueError(f"unknown family {name!r}; known: {', '.join(f.name for f in _registry())}")


def by_pipeline_class(cls_name: str) -> Family | None:
    for family in _registry():
        if cls_name in family.pipelines:
            return family
    return None


def pipeline_classes() -> dict[str, str]:
    """{pipeline class name: family name} over every family."""
    return {cls: f.name for f in _registry() for cls in f.pipelines}


def aliases() -> dict[str, tuple[Family, Alias]]:
    """{alias: (its family, the alias)} over every family."""
    return {name: (f, alias) for f in _registry() for name, alias in f.aliases.items()}


def supported() -> str:
    """The families in words, for messages: 'SD 1.x/2.x, SDXL, ...'."""
    return ", ".join(f.label for f in _registry())


def flow_families() -> tuple[str, ...]:
    return tuple(f.name for f in _registry() if f.flow)

"""The model's own defaults for the options a user leaves unset (sampling steps, guidance, LoRA targets, T5
length), and the checks of options that one family cannot take. The values are the families' (``families/``).

Defaults are looked up per alias (the hub model it names), else per family for a local directory; SD3.5-Large
and SD3.5-Large-Turbo ship the same pipeline class and configs, so ``--defaults-from ALIAS`` says which one a
local copy is. The resolved values are written into the config (and so into the run's ``config.yaml``).
"""

from __future__ import annotations

from ..errors import UserError
from . import families

RESOLVED = ("sample_steps", "guidance_scale", "lora_targets", "max_sequence_length", "num_frames", "guidance_scale_2")
# options only some families take (``Family.options``): set for another family, they are an error
FAMILY_OPTIONS = ("num_frames", "frame_weights", "lora_on", "guidance_scale_2")


def _source(cfg) -> str:
    """The alias whose defaults apply: --defaults-from, else --model when it is an alias."""
    return cfg.defaults_from or (cfg.model if cfg.model in families.aliases() else "")


def check_family_options(cfg, family: str) -> None:
    """Options that the model family cannot take; checked as soon as the family is known (before weights load)."""
    known = families.aliases()
    if cfg.defaults_from:
        if cfg.defaults_from not in known:
            raise UserError(f"--defaults-from '{cfg.defaults_from}' is not an alias; aliases: {', '.join(known)}")
        other = known[cfg.defaults_from][0].name
        if other != family:
            raise UserError(
                f"--defaults-from {cfg.defaults_from} is a {other} model, but --model '{cfg.model}' is a {family} "
                f"model; name an alias of the same family"
            )
    spec = families.by_name(family)
    if spec.flow and cfg.eta > 0:
        raise UserError(
            f"--eta {cfg.eta}: {family} is a flow-matching model sampled with the deterministic Euler "
            f"ODE sampler; eta has no meaning there, leave it at 0"
        )
    if cfg.export != "none" and _export_of(spec, cfg.export) is None:
        takers = [f.label for f in families.all_families() if _export_of(f, cfg.export) is not None]
        raise UserError(
            f"--export {cfg.export}: only {', '.join(takers)} LoRAs are converted to it; {spec.label}'s diffusers "
            f"file (pytorch_lora_weights.safetensors) is the one to load (docs/finetune.md, 'Where each file loads')"
        )
    if getattr(cfg, "train_text_encoder", False) and not _loads_text_encoder_lora(spec):
        raise UserError(
            f"--train-text-encoder: {spec.pipelines[0]}.load_lora_weights loads {spec.denoiser} weights only, so a "
            f"text-encoder LoRA would be dropped; leave --train-text-encoder off for {spec.label}"
        )
    for name in FAMILY_OPTIONS:
        if getattr(cfg, name, None) is not None and name not in spec.options:
            takers = [f.label for f in families.all_families() if name in f.options]
            raise UserError(
                f"--{name.replace('_', '-')} applies to {', '.join(takers) or 'no'} models; {spec.label} takes none, "
                f"drop it"
            )
    if cfg.max_sequence_length is not None and not spec.takes_sequence_length:
        raise UserError(
            f"--max-sequence-length sets the T5 prompt length of SD3/FLUX models; {family} has no T5 encoder"
        )


def _export_of(spec, export: str):
    """What family ``spec`` declares for ``--export export`` (None: no such export for it)."""
    return {"kohya": spec.kohya_text_encoders, "comfyui": spec.comfyui_name}.get(export)


def resolve_defaults(cfg, pipe, family: str, denoiser_config: dict | None = None) -> None:
    """Fill ``cfg``'s unset options (None) in place with the model's defaults, refuse guidance on a
    guidance-free model, and validate the result. ``denoiser_config``: the denoiser's config where ``pipe`` was
    loaded without it (encode-prompts)."""
    check_family_options(cfg, family)
    source = _source(cfg)
    spec = families.by_name(family)
    values = dict(spec.defaults)
    if spec.refine_defaults:
        config = denoiser_config if denoiser_config is not None else getattr(pipe, spec.denoiser).config
        values.update(spec.refine_defaults(config, pipe.config))
    why = values.pop("guidance_free", False)  # True, or the reason in words (refine_defaults)
    guidance_free = bool(why)
    if source in families.aliases():
        alias = families.aliases()[source][1]
        values.update(alias.defaults)
        guidance_free |= alias.guidance_free
    for key in RESOLVED:
        if hasattr(cfg, key) and getattr(cfg, key) is None:
            setattr(cfg, key, list(values[key]) if isinstance(values.get(key), list) else values.get(key))
    if guidance_free and cfg.guidance_scale > spec.guidance_threshold:
        reason = why if isinstance(why, str) else "no guidance embedding"
        what = f"'{source}'" if source else f"this {spec.label} model ({reason})"
        raise UserError(
            f"--guidance-scale {cfg.guidance_scale}: {what} is distilled to sample without guidance; "
            f"leave --guidance-scale unset ({values['guidance_scale']:g})"
        )
    if cfg.sample_steps < spec.min_sample_steps:
        raise UserError(
            f"--sample-steps {cfg.sample_steps}: {spec.label}'s schedule takes at least {spec.min_sample_steps} steps"
        )
    cfg.validate()


def _loads_text_encoder_lora(spec) -> bool:
    """Whether the family's pipeline loads a LoRA's text-encoder weights (its LoRA loader mixin's loadable modules)."""
    import diffusers

    modules = getattr(getattr(diffusers, spec.pipelines[0]), "_lora_loadable_modules", [])
    return any(m.startswith("text_encoder") for m in modules)

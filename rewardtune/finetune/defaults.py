"""The model's own defaults for the options a user leaves unset (sampling steps, guidance, LoRA targets, T5
length), and the checks of options that one family cannot take.

Defaults are looked up per alias (the hub model it names), else per family for a local directory; SD3.5-Large
and SD3.5-Large-Turbo ship the same pipeline class and configs, so ``--defaults-from ALIAS`` says which one a
local copy is. The resolved values are written into the config (and so into the run's ``config.yaml``).
"""

from __future__ import annotations

from ..errors import UserError

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
# The joint attention of the MMDiT blocks (image and text streams), and SD3.5-Medium's second, image-only
# attention (attn2), which the 'attn.' names do not match.
SD3_TARGETS = [
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out.0",
]
# FLUX: the same attention (the single blocks' attn.to_q/k/v match too) plus the double blocks' feed-forwards.
FLUX_TARGETS = SD3_TARGETS[:8] + ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]

FLOW_FAMILIES = ("sd3", "flux")
FAMILY_DEFAULTS = {
    "sd": dict(sample_steps=50, guidance_scale=7.5, lora_targets=UNET_TARGETS),
    "sdxl": dict(sample_steps=50, guidance_scale=7.5, lora_targets=UNET_TARGETS),
    # StableDiffusion3Pipeline's and FluxPipeline's own call defaults
    "sd3": dict(sample_steps=28, guidance_scale=7.0, lora_targets=SD3_TARGETS, max_sequence_length=256),
    "flux": dict(sample_steps=28, guidance_scale=3.5, lora_targets=FLUX_TARGETS, max_sequence_length=512),
}
# A FLUX directory without a guidance embedding is schnell-like: its model card's settings.
GUIDANCE_FREE_FLUX = dict(sample_steps=4, guidance_scale=0.0, max_sequence_length=256)
# Per alias: the family and the model card's sampling settings; guidance_free = distilled to sample without guidance.
ALIAS_DEFAULTS = {
    "sd15": dict(family="sd"),
    "sd21": dict(family="sd"),
    "sdxl": dict(family="sdxl"),
    "sd3-medium": dict(family="sd3", sample_steps=28, guidance_scale=7.0),
    "sd35-medium": dict(family="sd3", sample_steps=40, guidance_scale=4.5),
    "sd35-large": dict(family="sd3", sample_steps=28, guidance_scale=3.5),
    "sd35-large-turbo": dict(family="sd3", sample_steps=4, guidance_scale=0.0, guidance_free=True),
    "flux-dev": dict(family="flux", sample_steps=28, guidance_scale=3.5),
    "flux-schnell": dict(family="flux", guidance_free=True, **GUIDANCE_FREE_FLUX),
}
RESOLVED = ("sample_steps", "guidance_scale", "lora_targets", "max_sequence_length")


def _source(cfg) -> str:
    """The alias whose defaults apply: --defaults-from, else --model when it is an alias."""
    return cfg.defaults_from or (cfg.model if cfg.model in ALIAS_DEFAULTS else "")


def check_family_options(cfg, family: str) -> None:
    """Options that the model family cannot take; checked as soon as the family is known (before weights load)."""
    if cfg.defaults_from:
        if cfg.defaults_from not in ALIAS_DEFAULTS:
            raise UserError(
                f"--defaults-from '{cfg.defaults_from}' is not an alias; aliases: {', '.join(ALIAS_DEFAULTS)}"
            )
        other = ALIAS_DEFAULTS[cfg.defaults_from]["family"]
        if other != family:
            raise UserError(
                f"--defaults-from {cfg.defaults_from} is a {other} model, but --model '{cfg.model}' is a {family} "
                f"model; name an alias of the same family"
            )
    if family in FLOW_FAMILIES:
        if cfg.eta > 0:
            raise UserError(
                f"--eta {cfg.eta}: {family} is a flow-matching model sampled with the deterministic Euler "
                f"ODE sampler; eta has no meaning there, leave it at 0"
            )
        if cfg.export != "none":
            raise UserError(
                f"--export {cfg.export}: only SD/SDXL LoRAs are converted; load a {family} LoRA with "
                f"load_lora_weights (diffusers format)"
            )
    elif cfg.max_sequence_length is not None:
        raise UserError(
            f"--max-sequence-length sets the T5 prompt length of SD3/FLUX models; {family} has no T5 encoder"
        )


def resolve_defaults(cfg, pipe, family: str) -> None:
    """Fill ``cfg``'s unset options (None) in place with the model's defaults, refuse guidance on a
    guidance-free model, and validate the result."""
    check_family_options(cfg, family)
    source = _source(cfg)
    values = dict(FAMILY_DEFAULTS[family])
    guidance_free = False
    if family == "flux" and not pipe.transformer.config.get("guidance_embeds", False):
        values.update(GUIDANCE_FREE_FLUX)
        guidance_free = True
    alias = dict(ALIAS_DEFAULTS.get(source, {}))
    alias.pop("family", None)
    guidance_free |= alias.pop("guidance_free", False)
    values.update(alias)
    for key in RESOLVED:
        if getattr(cfg, key) is None:
            setattr(cfg, key, list(values[key]) if isinstance(values.get(key), list) else values.get(key))
    if guidance_free and cfg.guidance_scale > 1:
        what = f"'{source}'" if source else "this FLUX model (no guidance embedding)"
        raise UserError(
            f"--guidance-scale {cfg.guidance_scale}: {what} is distilled to sample without guidance; "
            f"leave --guidance-scale unset (0)"
        )
    cfg.validate()

"""``sample``: the trainer's own sampler as a function of a diffusers pipeline, for every family.

It returns the final latents the trainer's sampler produces for the pipeline with whatever LoRA it has
loaded, which are the latents ``pipe(..., output_type="latent")`` returns from the same ``latents`` and
``generator`` (packed for FLUX) when the pipeline samples with ``training_scheduler(pipe)`` — the stock
scheduler for SD3/FLUX; for SD/SDXL, ``pipe.scheduler = training_scheduler(pipe)`` (DDIM). That is the
guarantee that the images trained on are the images a user gets.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from .defaults import check_family_options
from .models import make_adapter, pipeline_family, training_scheduler
from .sampler import make_sampler


@torch.no_grad()
def sample(
    pipe,
    prompts,
    *,
    latents: torch.Tensor | None = None,
    num_inference_steps: int,
    guidance_scale: float,
    height: int,
    width: int,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    max_sequence_length: int | None = None,
    num_frames: int | None = None,
    guidance_scale_2: float | None = None,
) -> torch.Tensor:
    """The final latents of sampling ``prompts`` (a string or a list) with the training sampler of ``pipe``.

    ``latents``: the initial noise in the pipeline's layout (FLUX: packed, (B, tokens, 4C); FLUX.2: patchified,
    (B, 4C, H/16, W/16)); drawn from ``generator`` as the pipeline draws it when None. The result is in the layout of
    the pipeline's latent output (FLUX.2-dev: packed; FLUX.2-klein: the VAE's, de-normalised and unpatchified). ``guidance_scale``: SD/SD3 classifier-free guidance
    (> 1), FLUX-dev's guidance embedding (ignored by a model without one, as FluxPipeline ignores it).
    ``eta``: DDIM's (SD/SDXL); flow-matching models refuse eta > 0. ``max_sequence_length``: T5 tokens
    (SD3/FLUX; default the pipeline's). ``num_frames``: a video family's frames (Wan: 4k + 1);
    ``guidance_scale_2``: Wan2.2-A14B's low-noise guidance (default ``guidance_scale``, as WanPipeline)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    family = pipeline_family(pipe)
    opts = SimpleNamespace(
        sample_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        eta=eta,
        max_sequence_length=max_sequence_length,
        defaults_from="",
        export="none",
        checkpoint_calls=False,
        num_frames=num_frames,  # video families (Wan)
        guidance_scale_2=guidance_scale_2,  # Wan2.2-A14B's low-noise expert
        lora_on=None,
        method="draft-k",
    )  # no gradients here
    check_family_options(opts, family)
    adapter = make_adapter(pipe, family, opts)
    model = adapter.denoiser
    sampler = make_sampler(
        adapter.sampler_kind, training_scheduler(pipe), opts, model.dtype, adapter=adapter, resolution=(height, width)
    )
    cond = adapter.encode(prompts, sampler.guided, (height, width))
    device = model.device
    if latents is None:
        shape = (
            adapter.latent_shape((height, width))
            if adapter.sampler_kind == "flow"
            else (model.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
        )
        latents = sampler.initial_latents((len(prompts), *shape), generator, device)
    x = sampler.sample(model, cond, latents.to(device=device, dtype=torch.float32), generator)
    return adapter.pipeline_latents(x).to(model.dtype)

"""The UNet families' adapter base (SD 1.x/2.x, SDXL): the interface every family's adapter implements, and its
UNet implementation. A family module subclasses it with how prompts become the UNet's conditioning; the
flow-matching families' base is ``flow_models.FlowAdapter``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError
from ..sizes import hw

# LoRA targets of the UNet families: the attention projections of every transformer block (self and cross).
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@dataclass
class Conditioning:
    """What a UNet gets besides the latent; rows are [uncond..., cond...] under guidance.

    Every family's conditioning has ``guided`` and ``call(model, x, t)``: the sampler never needs to know
    how a family's denoiser is called."""

    hidden: torch.Tensor
    added: dict | None
    guided: bool

    def unet_kwargs(self) -> dict:
        kw = {"encoder_hidden_states": self.hidden}
        if self.added is not None:
            kw["added_cond_kwargs"] = self.added
        return kw

    def call(self, model, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return model(x, t, **self.unet_kwargs(), return_dict=False)[0]


class UNetAdapter:
    """What the trainer needs to know of a UNet family (SD 1.x/2.x, SDXL): the denoiser that carries the
    LoRA, its text encoders, latent geometry, the VAE's latent scaling, and (in subclasses) prompt encoding.
    A flow-matching family implements the same methods for its transformer."""

    family = ""
    sampler_kind = "ddim"  # which truncated sampler steps this family (sampler.make_sampler)
    guidance_kind = "cfg"  # classifier-free guidance rows when --guidance-scale > 1

    def __init__(self, pipe, **options):
        """``options`` (guidance_scale, max_sequence_length) matter to the flow families only."""
        self.pipe = pipe

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.unet

    def text_encoders(self) -> list:
        return text_encoders(self.pipe)

    def cache_prompts(self, prompts: list[str]) -> None:
        """Nothing to cache: the SD/SDXL text encoders are small and stay beside the UNet."""

    def encode(self, prompts: list[str], guided: bool, size: tuple[int, int]) -> Conditioning:
        raise NotImplementedError

    def native_resolution(self) -> int:
        return int(self.pipe.unet.config.sample_size) * self.pipe.vae_scale_factor

    def check_resolution(self, resolution: int) -> None:
        f = self.pipe.vae_scale_factor
        if resolution % f:
            raise UserError(f"--resolution {resolution} is not divisible by the VAE's factor {f}")
        smallest = f * 2 ** (len(self.pipe.unet.config.block_out_channels) - 1)  # the UNet halves the latent per level
        if resolution < smallest:
            raise UserError(f"--resolution {resolution} is too small for this model; use at least {smallest}")

    def latent_shape(self, resolution: int) -> tuple[int, ...]:
        """One sample's latent shape, in the layout the sampler works in."""
        h, w = (side // self.pipe.vae_scale_factor for side in hw(resolution))
        return (self.pipe.unet.config.in_channels, h, w)

    def vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The sampler's latents as the VAE decoder takes them (undo the scaling and shift)."""
        cfg = self.pipe.vae.config
        z = latents / cfg.scaling_factor
        if getattr(cfg, "shift_factor", None):
            z = z + cfg.shift_factor
        return z

    def pipeline_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The sampler's final latents as ``pipe(..., output_type="latent")`` returns them (a family whose pipeline
        returns another layout, e.g. FLUX.2-klein's VAE latents, says so; here: the same)."""
        return latents


def text_encoders(pipe) -> list:
    return [m for m in (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)) if m is not None]

"""FLUX.1: CLIP-L's pooled embedding and T5's tokens, packed 2x2 latent patches, flow-matching Euler sampling with
the resolution's dynamic shift; dev's guidance as an embedding, schnell without one."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..flow_models import FlowAdapter, calculate_shift, hw, planner_t5_tokenizer, single_and_double_layers
from . import Alias, Family

# The joint attention of the double blocks (the single blocks' attn.to_q/k/v match too) and the double blocks'
# feed-forwards, image and text streams.
FLUX_TARGETS = [
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
]
# A FLUX model without a guidance embedding is schnell-like: its model card's settings.
GUIDANCE_FREE = dict(sample_steps=4, guidance_scale=0.0, max_sequence_length=256)


@dataclass
class FluxConditioning:
    """T5 features, CLIP pooled embedding, rotary position ids and the distilled guidance value (None for a
    model without a guidance embedding). Never two branches."""

    hidden: torch.Tensor
    pooled: torch.Tensor
    txt_ids: torch.Tensor
    img_ids: torch.Tensor
    guidance: float | None
    guided: bool = False

    def call(self, model, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        guidance = None
        if self.guidance is not None:
            guidance = torch.full([1], self.guidance, device=x.device, dtype=torch.float32).expand(x.shape[0])
        # FluxPipeline passes the timestep in the latents' dtype divided by 1000 (the model multiplies it back)
        return model(
            hidden_states=x,
            timestep=t.to(x.dtype) / 1000,
            guidance=guidance,
            pooled_projections=self.pooled,
            encoder_hidden_states=self.hidden,
            txt_ids=self.txt_ids,
            img_ids=self.img_ids,
            return_dict=False,
        )[0]


class FluxAdapter(FlowAdapter):
    """FLUX.1: CLIP-L's pooled embedding and T5's tokens; latents packed into 2x2 patches (B, tokens, 4C) with
    2-D position ids; FLUX-dev's guidance as an embedding (``guidance_scale``), schnell without one."""

    family = "flux"
    default_max_sequence_length = 512
    _clip_keys = ("pooled",)
    _t5_keys = ("t5",)

    @property
    def guidance_kind(self) -> str:
        return "embedded" if self.pipe.transformer.config.guidance_embeds else "none"

    def text_encoders(self) -> list:
        return [self.pipe.text_encoder] if self.pipe.text_encoder is not None else []

    @property
    def t5(self):
        return self.pipe.text_encoder_2

    def _clip(self, prompts):
        return {"pooled": self.pipe._get_clip_prompt_embeds(prompts, device=self.pipe.text_encoder.device)}

    def _t5(self, prompts):
        return {"t5": self.pipe._get_t5_prompt_embeds(prompts, 1, self.max_sequence_length, device=self.t5.device)}

    def _combine(self, clip, t5):
        return t5["t5"].to(self.device), clip["pooled"].to(self.device)

    def encode(self, prompts: list[str], guided: bool, size) -> FluxConditioning:
        if guided:
            raise ValueError("FLUX is sampled without classifier-free guidance rows")
        hidden, pooled = self.embeddings(list(prompts))
        te = self.pipe.text_encoder
        txt_ids = torch.zeros(
            hidden.shape[1], 3, device=self.device, dtype=te.dtype if te is not None else hidden.dtype
        )
        h, w = (s // (2 * self.vae_factor) for s in hw(size))
        img_ids = self.pipe._prepare_latent_image_ids(len(prompts), h, w, self.device, hidden.dtype)
        guidance = float(self.guidance_scale) if self.guidance_kind == "embedded" else None
        return FluxConditioning(hidden, pooled, txt_ids, img_ids, guidance)

    def sampler_options(self, resolution) -> dict:
        """FluxPipeline's schedule: sigmas linspace(1, 1/N, N), shifted by the scheduler with mu from the number
        of packed image tokens; one branch (guidance, if any, is the embedding); noise drawn unpacked, then packed."""
        config = self.pipe.scheduler.config
        h, w = (s // (2 * self.vae_factor) for s in hw(resolution))
        mu = calculate_shift(h * w, config)

        def schedule(n: int) -> dict:
            sigmas = None if config.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / n, n)
            return {"sigmas": sigmas, "mu": mu}

        channels = int(self.pipe.transformer.config.in_channels) // 4

        def noise(shape: tuple, generator: torch.Generator) -> torch.Tensor:
            # drawn in the unpacked layout, then packed, so one generator gives FluxPipeline's noise
            x = torch.randn((shape[0], channels, 2 * h, 2 * w), generator=generator, dtype=torch.float32)
            return self.pack(x)

        return {"schedule": schedule, "guidance_scale": 1.0, "noise": noise}

    @staticmethod
    def pack(latents: torch.Tensor) -> torch.Tensor:
        """(B, C, 2h, 2w) -> (B, h*w, 4C): each 2x2 patch becomes one token (channel-major, as FluxPipeline packs)."""
        b, c, hh, ww = latents.shape
        x = latents.view(b, c, hh // 2, 2, ww // 2, 2).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (hh // 2) * (ww // 2), c * 4)

    @staticmethod
    def unpack(latents: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """(B, h*w, 4C) -> (B, C, 2h, 2w), the inverse of ``pack``."""
        b, _, c4 = latents.shape
        x = latents.view(b, h, w, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, c4 // 4, 2 * h, 2 * w)

    def check_resolution(self, resolution: int) -> None:
        self._check_patches(resolution, "FLUX packs 2x2 latent patches")

    def latent_shape(self, resolution) -> tuple[int, ...]:
        h, w = (s // (2 * self.vae_factor) for s in hw(resolution))
        return (h * w, int(self.pipe.transformer.config.in_channels))

    def vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        side = math.isqrt(latents.shape[1])
        return super().vae_latents(self.unpack(latents, side, side))


def assemble(parts: dict, tokenizer, tokenizer_2=None, tokenizer_3=None):
    """Tokenizers: CLIP-L, T5."""
    from diffusers import FluxPipeline

    return FluxPipeline(**parts, tokenizer=tokenizer, tokenizer_2=tokenizer_2)


def refine_defaults(config, pipeline_config=None) -> dict:
    """``config``: the transformer's. No guidance embedding: schnell-like, sampled without guidance."""
    if config.get("guidance_embeds", False):
        return {}
    return {**GUIDANCE_FREE, "guidance_free": True}


# The planner: CLIP-L (the same tower as SD 1.5's encoder), T5-XXL's encoder, the VAE.
_PLAN_PARTS = {"vae": "flux_vae", "text_encoder": "sd15_text_encoder", "text_encoder_2": "t5_xxl_encoder"}
FAMILY = Family(
    name="flux",
    order=40,
    label="FLUX.1",
    pipelines=("FluxPipeline",),
    adapter=FluxAdapter,
    denoiser="transformer",
    flow=True,
    cached_encoder="text_encoder_2",
    # FluxPipeline's own call defaults
    defaults=dict(sample_steps=28, guidance_scale=3.5, lora_targets=FLUX_TARGETS, max_sequence_length=512),
    assemble=assemble,
    aliases={
        "flux-dev": Alias(
            ("black-forest-labs/FLUX.1-dev",), dict(sample_steps=28, guidance_scale=3.5), plan="fluxdev"
        ),
        "flux-schnell": Alias(
            ("black-forest-labs/FLUX.1-schnell",), GUIDANCE_FREE, guidance_free=True, plan="fluxschnell"
        ),
    },
    fsdp_blocks=("FluxTransformerBlock", "FluxSingleTransformerBlock"),
    plan_architectures={
        "fluxdev": {"transformer": "flux_dev_transformer", **_PLAN_PARTS, "scheduler": "flux_dev_scheduler"},
        "fluxschnell": {
            "transformer": "flux_schnell_transformer",
            **_PLAN_PARTS,
            "scheduler": "flux_schnell_scheduler",
        },
    },
    plan_tokenizers=lambda parts, clip: (clip, planner_t5_tokenizer(), None),
    layers=single_and_double_layers(),
    refine_defaults=refine_defaults,
)

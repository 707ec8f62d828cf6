"""SDXL: two CLIP text encoders, pooled embeddings and ``add_time_ids``; DDIM sampling; kohya export with two
text encoders."""

from __future__ import annotations

import torch

from ..adapters import UNET_TARGETS, Conditioning, UNetAdapter
from . import Alias, Family


class SDXLAdapter(UNetAdapter):
    """SDXL: two text encoders (penultimate states concatenated), the pooled embedding of the second,
    and ``add_time_ids`` from the real original/target sizes (no crop)."""

    family = "sdxl"

    def encode(self, prompts: list[str], guided: bool, size: tuple[int, int]) -> Conditioning:
        pipe = self.pipe
        device = pipe.text_encoder_2.device
        cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
            list(prompts), device=device, num_images_per_prompt=1, do_classifier_free_guidance=guided
        )
        time_ids = pipe._get_add_time_ids(
            tuple(size),
            (0, 0),
            tuple(size),
            dtype=cond.dtype,
            text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim,
        )
        time_ids = time_ids.to(device).repeat(len(prompts), 1)
        if guided:
            cond, pooled, time_ids = (
                torch.cat([uncond, cond]),
                torch.cat([uncond_pooled, pooled]),
                torch.cat([time_ids, time_ids]),
            )
        return Conditioning(cond, {"text_embeds": pooled, "time_ids": time_ids}, guided)


def assemble(parts: dict, tokenizer, tokenizer_2=None, tokenizer_3=None):
    """With SDXL's zeroed empty prompt and no watermark."""
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        **parts,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2 or tokenizer,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


FAMILY = Family(
    name="sdxl",
    order=20,
    label="SDXL",
    pipelines=("StableDiffusionXLPipeline",),
    adapter=SDXLAdapter,
    denoiser="unet",
    flow=False,
    defaults=dict(sample_steps=50, guidance_scale=7.5, lora_targets=UNET_TARGETS),
    assemble=assemble,
    aliases={"sdxl": Alias(("stabilityai/stable-diffusion-xl-base-1.0",), plan="sdxl")},
    fsdp_blocks=("BasicTransformerBlock",),
    plan_architectures={
        "sdxl": {
            "unet": "sdxl_unet",
            "vae": "sdxl_vae",
            "text_encoder": "sdxl_text_encoder",
            "text_encoder_2": "sdxl_text_encoder_2",
            "scheduler": "sdxl_scheduler",
        }
    },
    kohya_text_encoders=2,
    fp16_vae_overflows=True,
)

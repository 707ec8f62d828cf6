"""SD 1.x/2.x: one CLIP text encoder, a UNet, DDIM sampling; kohya export with one text encoder."""

from __future__ import annotations

import torch

from ..adapters import UNET_TARGETS, Conditioning, UNetAdapter
from . import Alias, Family


class SDAdapter(UNetAdapter):
    """SD 1.x/2.x: one CLIP text encoder; the unconditional rows encode the empty prompt."""

    family = "sd"

    def encode(self, prompts: list[str], guided: bool, size: tuple[int, int]) -> Conditioning:
        device = self.pipe.text_encoder.device
        cond, uncond = self.pipe.encode_prompt(list(prompts), device, 1, guided)
        hidden = torch.cat([uncond, cond]) if guided else cond
        return Conditioning(hidden, None, guided)


def assemble(parts: dict, tokenizer, tokenizer_2=None, tokenizer_3=None):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        **parts, tokenizer=tokenizer, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )


FAMILY = Family(
    name="sd",
    order=10,
    label="SD 1.x/2.x",
    pipelines=("StableDiffusionPipeline",),
    adapter=SDAdapter,
    denoiser="unet",
    flow=False,
    defaults=dict(sample_steps=50, guidance_scale=7.5, lora_targets=UNET_TARGETS),
    assemble=assemble,
    # runwayml's SD 1.5 repo was taken down; its mirror comes first
    aliases={
        "sd15": Alias(("stable-diffusion-v1-5/stable-diffusion-v1-5", "runwayml/stable-diffusion-v1-5"), plan="sd15"),
        "sd21": Alias(("stabilityai/stable-diffusion-2-1",)),
    },
    fsdp_blocks=("BasicTransformerBlock",),
    plan_architectures={
        "sd15": {
            "unet": "sd15_unet",
            "vae": "sd15_vae",
            "text_encoder": "sd15_text_encoder",
            "scheduler": "sd15_scheduler",
        }
    },
    kohya_text_encoders=1,
    load_kwargs={"safety_checker": None, "requires_safety_checker": False},
)

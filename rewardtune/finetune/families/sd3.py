"""SD3/SD3.5: CLIP-L, CLIP-G and T5 text encoders, an MMDiT transformer, flow-matching Euler sampling with true
classifier-free guidance; SD3.5-Large-Turbo (the ICT/HP paper's generator) distilled to sample without it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import UserError
from ..flow_models import FlowAdapter, calculate_shift, hw, planner_t5_tokenizer
from . import Alias, Family, Layers

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


@dataclass
class SD3Conditioning:
    """Text features and pooled projections of the MMDiT; rows are [uncond..., cond...] under guidance."""

    hidden: torch.Tensor
    pooled: torch.Tensor
    guided: bool

    def call(self, model, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # SD3's transformer takes the scheduler's timestep, sigma * 1000, as it is
        return model(
            hidden_states=x,
            timestep=t,
            encoder_hidden_states=self.hidden,
            pooled_projections=self.pooled,
            return_dict=False,
        )[0]


class SD3Adapter(FlowAdapter):
    """SD3/SD3.5: CLIP-L and CLIP-G (penultimate states concatenated, zero-padded to T5's width, then T5's
    tokens after them; pooled = both projections concatenated), true CFG with the empty prompt."""

    family = "sd3"
    _clip_keys = ("clip", "pooled")
    _t5_keys = ("t5",)

    def text_encoders(self) -> list:
        return [m for m in (self.pipe.text_encoder, self.pipe.text_encoder_2) if m is not None]

    @property
    def t5(self):
        return self.pipe.text_encoder_3

    def _clip(self, prompts):
        pipe = self.pipe
        l_hidden, l_pooled = pipe._get_clip_prompt_embeds(prompts, device=pipe.text_encoder.device, clip_model_index=0)
        g_hidden, g_pooled = pipe._get_clip_prompt_embeds(
            prompts, device=pipe.text_encoder_2.device, clip_model_index=1
        )
        return {
            "clip": torch.cat([l_hidden, g_hidden.to(l_hidden.device)], dim=-1),
            "pooled": torch.cat([l_pooled, g_pooled.to(l_pooled.device)], dim=-1),
        }

    def _t5(self, prompts):
        device = self.t5.device if self.t5 is not None else self.device
        return {"t5": self.pipe._get_t5_prompt_embeds(prompts, 1, self.max_sequence_length, device=device)}

    def _combine(self, clip, t5):
        t5_hidden = t5["t5"].to(self.device)
        clip_hidden = clip["clip"].to(self.device)
        clip_hidden = torch.nn.functional.pad(clip_hidden, (0, t5_hidden.shape[-1] - clip_hidden.shape[-1]))
        return torch.cat([clip_hidden, t5_hidden], dim=-2), clip["pooled"].to(self.device)

    def encode(self, prompts: list[str], guided: bool, size) -> SD3Conditioning:
        hidden, pooled = self.embeddings(list(prompts))
        if guided:
            neg_hidden, neg_pooled = self.embeddings([""] * len(prompts))
            hidden, pooled = torch.cat([neg_hidden, hidden]), torch.cat([neg_pooled, pooled])
        return SD3Conditioning(hidden, pooled, guided)

    def sampler_options(self, resolution) -> dict:
        """The pipeline's schedule: the scheduler's static shift, or (if its config asks) a dynamic one with mu
        from the image-token count."""
        config = self.pipe.scheduler.config
        if not config.get("use_dynamic_shifting", False):
            return {}
        h, w = (s // self.vae_factor // self.patch for s in hw(resolution))
        mu = calculate_shift(h * w, config)
        return {"schedule": lambda n: {"mu": mu}}

    @property
    def patch(self) -> int:
        return int(self.pipe.transformer.config.patch_size)

    def native_resolution(self) -> int:
        return int(self.pipe.transformer.config.sample_size) * self.vae_factor

    def check_resolution(self, resolution: int) -> None:
        step = self.vae_factor * self.patch
        if resolution % step:
            raise UserError(
                f"--resolution {resolution}: this SD3 model needs a multiple of {step} "
                f"(VAE factor {self.vae_factor} x patch size {self.patch})"
            )
        most = self.pipe.transformer.config.get("pos_embed_max_size") or 0
        if most and resolution // step > most:
            raise UserError(
                f"--resolution {resolution} is larger than this SD3 model's position embedding allows; "
                f"use at most {most * step}"
            )

    def latent_shape(self, resolution) -> tuple[int, ...]:
        h, w = hw(resolution)
        return (int(self.pipe.transformer.config.in_channels), h // self.vae_factor, w // self.vae_factor)


def _counts(config: dict) -> tuple[int, int, int] | None:
    """The joint blocks between the first and the last as (dual-attention, plain), and whether the first is a dual
    one; None where the dual-attention blocks are not the first ones (then nothing is reduced)."""
    n, dual = int(config.get("num_layers", 0)), list(config.get("dual_attention_layers") or [])
    if n < 3 or dual != list(range(len(dual))) or len(dual) > n - 1:
        return None
    first_dual = int(bool(dual))
    return len(dual) - first_dual, n - 2 - (len(dual) - first_dual), first_dual


def _stacks(config: dict) -> dict[str, int]:
    counts = _counts(config)
    return {} if counts is None else {"transformer.dual": counts[0], "transformer.plain": counts[1]}


def _overrides(config: dict, depths: dict) -> dict:
    n_dual, n_plain, first_dual = _counts(config)
    n_dual = depths.get("transformer.dual", n_dual)
    n_plain = depths.get("transformer.plain", n_plain)
    return {"num_layers": n_dual + n_plain + 2, "dual_attention_layers": list(range(first_dual + n_dual))}


def _blocks(model) -> list:
    """The last block keeps no text stream: a block of its own, as is the first."""
    blocks, dual = list(model.transformer_blocks), len(model.config.get("dual_attention_layers") or [])
    names = ["transformer.dual" if i < dual else "transformer.plain" for i in range(len(blocks))]
    names[0], names[-1] = "transformer.first", "transformer.last"
    return list(zip(blocks, names))


# SD3.5: CLIP-L with its projection, CLIP-G (the same bigG tower as SDXL's second encoder), T5-XXL's encoder.
_SD35 = {
    "vae": "sd35_vae",
    "text_encoder": "sd35_text_encoder",
    "text_encoder_2": "sdxl_text_encoder_2",
    "text_encoder_3": "t5_xxl_encoder",
    "scheduler": "sd35_scheduler",
}


def assemble(parts: dict, tokenizer, tokenizer_2=None, tokenizer_3=None):
    """Tokenizers: CLIP-L, CLIP-G, T5."""
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(
        **parts, tokenizer=tokenizer, tokenizer_2=tokenizer_2 or tokenizer, tokenizer_3=tokenizer_3
    )


FAMILY = Family(
    name="sd3",
    order=30,
    label="SD3/SD3.5",
    pipelines=("StableDiffusion3Pipeline",),
    adapter=SD3Adapter,
    denoiser="transformer",
    flow=True,
    cached_encoder="text_encoder_3",
    # StableDiffusion3Pipeline's own call defaults
    defaults=dict(sample_steps=28, guidance_scale=7.0, lora_targets=SD3_TARGETS, max_sequence_length=256),
    assemble=assemble,
    aliases={  # the model cards' sampling settings
        "sd3-medium": Alias(
            ("stabilityai/stable-diffusion-3-medium-diffusers",), dict(sample_steps=28, guidance_scale=7.0)
        ),
        "sd35-medium": Alias(
            ("stabilityai/stable-diffusion-3.5-medium",), dict(sample_steps=40, guidance_scale=4.5), plan="sd35m"
        ),
        "sd35-large": Alias(
            ("stabilityai/stable-diffusion-3.5-large",), dict(sample_steps=28, guidance_scale=3.5), plan="sd35l"
        ),
        "sd35-large-turbo": Alias(
            ("stabilityai/stable-diffusion-3.5-large-turbo",),
            dict(sample_steps=4, guidance_scale=0.0),
            guidance_free=True,
            plan="sd35l",  # SD3.5-Large's files
        ),
    },
    fsdp_blocks=("JointTransformerBlock",),
    plan_architectures={
        "sd35m": {"transformer": "sd35m_transformer", **_SD35},
        "sd35l": {"transformer": "sd35l_transformer", **_SD35},
    },
    plan_tokenizers=lambda parts, clip: (clip, clip, planner_t5_tokenizer()),
    layers=Layers(_stacks, _overrides, _blocks),
)

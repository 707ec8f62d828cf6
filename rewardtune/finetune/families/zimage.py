"""Z-Image (Tongyi-MAI): one single-stream transformer over image patches and the prompt's Qwen3 features, flow-matching
Euler sampling; Z-Image-Turbo (the headline) is distilled to sample in a few steps without guidance.

What ``ZImagePipeline`` (diffusers 0.42) does, and so what the adapter does:
- text: each prompt in Qwen3's chat template (one user turn, ``add_generation_prompt``, ``enable_thinking=True``),
  padded to ``max_sequence_length`` (512) tokens, the text encoder's second-to-last hidden states, the padding
  dropped: one (tokens, 2560) tensor per prompt, of its own length. The adapter writes that encoding out
  (``_encode_prompt`` writes the templated text back into the list it is given, and its boolean-mask selection
  cannot be traced on the planner's fake tensors);
- the transformer takes lists: one (C, 1, H/8, W/8) latent and one caption tensor per sample, a time on the reversed
  scale (1000 - t)/1000, and returns the negative of the velocity, per sample;
- guidance: pos + g (pos - neg) with the negative prompt "" for any g > 0 (no guidance at 0, Turbo's setting). That is
  classifier-free guidance neg + s (pos - neg) at s = 1 + g, which is how the sampler is given it;
- schedule: sigmas linspace(1, 1/N, N), the scheduler's shift (static in the published configs: Turbo 3, Z-Image 6;
  a config with dynamic shifting gets mu from the (H/16)(W/16) image tokens, as the pipeline computes it).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch

from ...errors import UserError
from ..flow_models import LLMFlowAdapter, calculate_shift, hw
from . import Alias, Family, Layers

# Every attention projection and feed-forward of the noise refiner, the context refiner and the main layers.
ZIMAGE_TARGETS = [
    "attention.to_q",
    "attention.to_k",
    "attention.to_v",
    "attention.to_out.0",
    "feed_forward.w1",
    "feed_forward.w2",
    "feed_forward.w3",
]
# Model cards: Tongyi-MAI/Z-Image-Turbo (num_inference_steps=9, guidance_scale=0.0) and Tongyi-MAI/Z-Image
# (num_inference_steps=50, guidance_scale=4 with a negative prompt), as reproduced in zhutao100/Z-Image.swift
# docs/z-image-turbo.md and docs/z-image.md (commit 81d9bbe).
TURBO = dict(sample_steps=9, guidance_scale=0.0)


@dataclass
class ZImageConditioning:
    """One caption tensor per row (its own length); under guidance the rows are [negatives..., prompts...]."""

    captions: list[torch.Tensor]
    guided: bool

    def call(self, model, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # ZImagePipeline: per-sample (C, 1, h, w) latents, the time reversed to (1000 - t) / 1000, and the model's
        # output is the negative velocity
        out = model(list(x.unsqueeze(2).unbind(0)), (1000 - t) / 1000, self.captions, return_dict=False)[0]
        return -torch.stack(out).squeeze(2)


class ZImageAdapter(LLMFlowAdapter):
    """Z-Image: the Qwen3 text encoder's features (cached, never trained), latents (B, 16, H/8, W/8) in 2x2 patches,
    classifier-free guidance against the empty prompt at any scale above 0."""

    family = "zimage"
    default_max_sequence_length = 512
    _t5_keys = ("qwen",)

    @property
    def guidance_kind(self) -> str:
        return "cfg" if (self.guidance_scale or 0) > 0 else "none"

    def _t5(self, prompts):
        """ZImagePipeline._encode_prompt's features, written out: its template, padding and second-to-last hidden
        layer, the padding dropped by the positions the tokenizer's mask keeps, read as Python ints (the pipeline's
        boolean-mask selection has no static shape, so the planner's fake tensors could not trace it; and nothing
        here writes into ``prompts``)."""
        tok, device = self.pipe.tokenizer, self.t5.device
        chat = [[{"role": "user", "content": p}] for p in prompts]
        texts = [
            tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True, enable_thinking=True) for c in chat
        ]
        batch = tok(texts, padding="max_length", max_length=self.max_sequence_length, truncation=True)
        ids = torch.tensor(batch["input_ids"], device=device)
        mask = torch.tensor(batch["attention_mask"], device=device).bool()
        hidden = self.t5(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
        kept = [[j for j, m in enumerate(row) if m] for row in batch["attention_mask"]]
        return {"qwen": [h[torch.tensor(k, device=device)] for h, k in zip(hidden, kept)]}

    def embeddings(self, prompts: list[str]) -> list[torch.Tensor]:
        """One caption tensor per prompt on the denoiser's device, from the cache once it is on (each has its own
        length, so the base's stacked (hidden, pooled) does not apply)."""
        if self._cache is None:
            return [e.to(self.device) for e in self._t5(prompts)["qwen"]]
        self._fill(prompts, clip=False)
        return [self._cache.get(p)["qwen"].to(self.device) for p in prompts]

    def encode(self, prompts: list[str], guided: bool, size) -> ZImageConditioning:
        captions = self.embeddings(list(prompts))
        if guided:
            captions = self.embeddings([""] * len(prompts)) + captions
        return ZImageConditioning(captions, guided)

    def sampler_options(self, resolution) -> dict:
        """ZImagePipeline's schedule (its sigmas, and mu from the image-token count for a dynamic-shift config) and its
        guidance, pos + g (pos - neg) for g > 0, as the sampler's neg + s (pos - neg) with s = 1 + g."""
        h, w = (s // self.vae_factor for s in hw(resolution))
        mu = calculate_shift((h // 2) * (w // 2), self.pipe.scheduler.config)

        def schedule(n: int) -> dict:
            return {"sigmas": torch.linspace(1.0, 1 / n, n).tolist(), "mu": mu}

        g = float(self.guidance_scale or 0)
        return {"schedule": schedule, "guidance_scale": 1.0 + g if g > 0 else 1.0}

    def native_resolution(self) -> int:
        return 1024  # ZImagePipeline's default height and width

    def check_resolution(self, resolution: int) -> None:
        step = self._check_patches(resolution, "Z-Image packs 2x2 latent patches")
        most = min(self.pipe.transformer.config.axes_lens[1:])  # the RoPE table's rows per image axis
        if resolution // step > most:
            raise UserError(
                f"--resolution {resolution} is larger than this Z-Image model's position table allows; "
                f"use at most {most * step}"
            )

    def latent_shape(self, resolution) -> tuple[int, ...]:
        h, w = hw(resolution)
        return (int(self.pipe.transformer.config.in_channels), h // self.vae_factor, w // self.vae_factor)


def assemble(parts: dict, tokenizer, tokenizer_2=None, tokenizer_3=None):
    """Tokenizer: Qwen3's (``Qwen2Tokenizer``)."""
    from diffusers import ZImagePipeline

    return ZImagePipeline(**parts, tokenizer=tokenizer)


@cache
def _planner_tokenizer():
    """Qwen3's tokenizer for the planner, built offline (byte-level BPE over the planner prompt's words, Qwen3's chat
    template): the planner's caption is that prompt's tokens as this tokenizer counts them (the pipeline drops the
    padding; the transformer pads captions to a multiple of 32 tokens)."""
    from ...testing.zimage_pipelines import qwen_tokenizer  # noqa: PLC0415 (planner only)

    return qwen_tokenizer(["a", "photograph", "of", "red", "bicycle", "leaning", "against", "stone", "wall"])


def _stacks(config: dict) -> dict[str, int]:
    """The main layers after the refiners (the refiners, two each, are traced whole)."""
    return {"transformer.main": int(config.get("n_layers", 0))}


def _overrides(config: dict, depths: dict) -> dict:
    return {"n_layers": depths.get("transformer.main", int(config["n_layers"]))}


def _blocks(model) -> list:
    """In forward order: the noise refiner (latents; its first block is the first), the context refiner (the caption),
    then the main layers on both."""
    noise = [(b, "transformer.noise") for b in model.noise_refiner]
    noise[0] = (noise[0][0], "transformer.first")
    context = [(b, "transformer.context") for b in model.context_refiner]
    return noise + context + [(b, "transformer.main") for b in model.layers]


# Z-Image and its Turbo: the same transformer, Qwen3-4B and VAE (FLUX.1's VAE config) configs; the schedulers' shifts
# differ (Turbo 3, Z-Image 6).
_PLAN_PARTS = {"transformer": "zimage_transformer", "vae": "flux_vae", "text_encoder": "zimage_text_encoder"}

FAMILY = Family(
    name="zimage",
    order=70,  # released 2025-11-26
    label="Z-Image",
    pipelines=("ZImagePipeline",),
    adapter=ZImageAdapter,
    denoiser="transformer",
    flow=True,
    cached_encoder="text_encoder",  # Qwen3-4B, about 8 GB in bf16
    # ZImagePipeline's own call defaults (num_inference_steps=50, guidance_scale=5.0, max_sequence_length=512)
    defaults=dict(sample_steps=50, guidance_scale=5.0, lora_targets=ZIMAGE_TARGETS, max_sequence_length=512),
    assemble=assemble,
    aliases={
        "z-image-turbo": Alias(("Tongyi-MAI/Z-Image-Turbo",), TURBO, guidance_free=True, plan="zimageturbo"),
        "z-image": Alias(("Tongyi-MAI/Z-Image",), dict(sample_steps=50, guidance_scale=4.0), plan="zimage"),
    },
    guidance_threshold=0.0,  # the pipeline guides at any scale above 0
    fsdp_blocks=("ZImageTransformerBlock",),
    plan_architectures={
        "zimageturbo": {**_PLAN_PARTS, "scheduler": "zimage_turbo_scheduler"},
        "zimage": {**_PLAN_PARTS, "scheduler": "zimage_scheduler"},
    },
    plan_tokenizers=lambda parts, clip: (_planner_tokenizer(), None, None),
    layers=Layers(_stacks, _overrides, _blocks),
)

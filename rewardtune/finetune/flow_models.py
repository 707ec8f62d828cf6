"""SD3/SD3.5 and FLUX.1: the flow-matching families' adapters (transformer denoiser, three or two text
encoders, 16-channel latents; FLUX's packed 2x2 latent patches).

Prompts are encoded with the pipelines' own per-encoder functions (``_get_clip_prompt_embeds``,
``_get_t5_prompt_embeds``) and combined as their ``encode_prompt`` does, so the fine-tuned model sees what
``pipe(...)`` feeds it; the split lets the trainer cache T5's embeddings alone when the CLIP encoders are
trained. In training (``cache_prompts``) the embeddings of the prompt set are computed once and kept on the
CPU up to ``--prompt-cache-gib``, beyond it on disk (``prompt_cache.PromptCache``); the text encoders then
leave the accelerator (T5-XXL alone is about 9.5 GB in bf16), except CLIP encoders that carry trained LoRA
weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import UserError
from .prompt_cache import DEFAULT_RAM_GIB, PromptCache

ENCODE_BATCH = 16  # prompts per text-encoder call when filling the cache


def calculate_shift(image_seq_len: int, config) -> float:
    """FLUX's ``mu``: linear in the number of packed image tokens between the scheduler config's
    (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift)."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base, top = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    slope = (top - base) / (max_len - base_len)
    return image_seq_len * slope + base - slope * base_len


def _hw(resolution) -> tuple[int, int]:
    return (
        (int(resolution), int(resolution))
        if isinstance(resolution, (int, np.integer))
        else tuple(map(int, resolution))
    )


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


class FlowAdapter:
    """What the trainer needs to know of a flow-matching family; see ``models.UNetAdapter`` for the interface.

    ``guidance_scale``: FLUX-dev's guidance embedding value (SD3's classifier-free guidance is the sampler's);
    ``max_sequence_length``: T5 tokens (default: the pipeline's)."""

    family = ""
    sampler_kind = "flow"
    guidance_kind = "cfg"  # 'cfg' (two branches), 'embedded' (FLUX-dev) or 'none'
    default_max_sequence_length = 256

    def __init__(
        self,
        pipe,
        guidance_scale: float | None = None,
        max_sequence_length: int | None = None,
        prompt_cache_gib: float = DEFAULT_RAM_GIB,
    ):
        self.pipe = pipe
        self.guidance_scale = guidance_scale
        self.max_sequence_length = max_sequence_length or self.default_max_sequence_length
        self.prompt_cache_gib = prompt_cache_gib
        self._cache: PromptCache | None = None  # prompt -> CPU tensors, once cache_prompts switched caching on

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.transformer

    @property
    def device(self) -> torch.device:
        return self.pipe.transformer.device

    def text_encoders(self) -> list:
        """The CLIP encoders: the ones ``--train-text-encoder`` adapts. T5 is ``t5``, only ever cached."""
        raise NotImplementedError

    @property
    def t5(self):
        raise NotImplementedError

    # ----- latent geometry -------------------------------------------------------------------
    @property
    def vae_factor(self) -> int:
        return self.pipe.vae_scale_factor

    def vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        cfg = self.pipe.vae.config
        return latents / cfg.scaling_factor + cfg.shift_factor

    # ----- text ------------------------------------------------------------------------------
    def _clip(self, prompts: list[str]) -> dict:
        raise NotImplementedError

    def _t5(self, prompts: list[str]) -> dict:
        raise NotImplementedError

    def _combine(self, clip: dict, t5: dict) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _clip_trained(self) -> bool:
        return any(p.requires_grad for te in self.text_encoders() for p in te.parameters())

    def embeddings(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden, pooled) for ``prompts`` on the denoiser's device, from the cache once it is on."""
        if self._cache is None:
            hidden, pooled = self._combine(self._clip(prompts), self._t5(prompts))
            return hidden.to(self.device), pooled.to(self.device)
        trained = self._clip_trained()
        self._fill(prompts, clip=not trained)

        entries = [self._cache.get(p) for p in prompts]

        def cached(key):
            return torch.stack([e[key] for e in entries]).to(self.device)

        t5 = {k: cached(k) for k in self._t5_keys}
        clip = self._clip(prompts) if trained else {k: cached(k) for k in self._clip_keys}
        hidden, pooled = self._combine({k: v.to(self.device) for k, v in clip.items()}, t5)
        return hidden, pooled

    def cache_prompts(self, prompts: list[str]) -> None:
        """Switch caching on, compute the embeddings of ``prompts`` (and the empty prompt) once, and move the
        text encoders off the accelerator (trained CLIP encoders stay)."""
        if self._cache is None:
            self._cache = PromptCache(self.prompt_cache_gib * 2**30)
        self._fill(list(prompts) + [""], clip=not self._clip_trained())
        self._offload()

    def _offload(self) -> None:
        keep = self._clip_trained()
        for te in [self.t5, *([] if keep else self.text_encoders())]:
            if te is not None and te.device.type != "cpu":
                te.to("cpu")

    def _fill(self, prompts: list[str], clip: bool) -> None:
        missing = [
            p
            for p in dict.fromkeys(prompts)
            if p not in self._cache or (clip and self._clip_keys[0] not in self._cache.names(p))
        ]
        if not missing:
            return
        encoders = [self.t5, *(self.text_encoders() if clip else [])]
        for te in encoders:
            if te is not None and te.device != self.device:  # (a no-op move of fake tensors fails: the planner)
                te.to(self.device)
        with torch.no_grad():
            for i in range(0, len(missing), ENCODE_BATCH):
                chunk = missing[i : i + ENCODE_BATCH]
                parts = {**self._t5(chunk), **(self._clip(chunk) if clip else {})}
                for j, p in enumerate(chunk):
                    self._cache.put(p, {k: v[j] for k, v in parts.items()})
        self._offload()


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
        h, w = (s // self.vae_factor // self.patch for s in _hw(resolution))
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
        h, w = _hw(resolution)
        return (int(self.pipe.transformer.config.in_channels), h // self.vae_factor, w // self.vae_factor)


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
        h, w = (s // (2 * self.vae_factor) for s in _hw(size))
        img_ids = self.pipe._prepare_latent_image_ids(len(prompts), h, w, self.device, hidden.dtype)
        guidance = float(self.guidance_scale) if self.guidance_kind == "embedded" else None
        return FluxConditioning(hidden, pooled, txt_ids, img_ids, guidance)

    def sampler_options(self, resolution) -> dict:
        """FluxPipeline's schedule: sigmas linspace(1, 1/N, N), shifted by the scheduler with mu from the number
        of packed image tokens; one branch (guidance, if any, is the embedding); noise drawn unpacked, then packed."""
        config = self.pipe.scheduler.config
        h, w = (s // (2 * self.vae_factor) for s in _hw(resolution))
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

    def native_resolution(self) -> int:
        return int(self.pipe.default_sample_size) * self.vae_factor

    def check_resolution(self, resolution: int) -> None:
        step = 2 * self.vae_factor
        if resolution % step:
            raise UserError(
                f"--resolution {resolution}: FLUX packs 2x2 latent patches, so the size must be a multiple "
                f"of {step} (e.g. {max(step, resolution - resolution % step)})"
            )

    def latent_shape(self, resolution) -> tuple[int, ...]:
        h, w = (s // (2 * self.vae_factor) for s in _hw(resolution))
        return (h * w, int(self.pipe.transformer.config.in_channels))

    def vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        side = math.isqrt(latents.shape[1])
        return super().vae_latents(self.unpack(latents, side, side))


FLOW_ADAPTERS = {"sd3": SD3Adapter, "flux": FluxAdapter}

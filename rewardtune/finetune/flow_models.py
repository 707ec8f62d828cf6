"""The flow-matching families' adapter base (SD3/SD3.5, FLUX.1 and later): a transformer denoiser, CLIP encoders
that ``--train-text-encoder`` adapts and a large text encoder (T5) whose embeddings are cached.

Prompts are encoded with the pipelines' own per-encoder functions (``_get_clip_prompt_embeds``,
``_get_t5_prompt_embeds``) and combined as their ``encode_prompt`` does, so the fine-tuned model sees what
``pipe(...)`` feeds it; the split lets the trainer cache T5's embeddings alone when the CLIP encoders are
trained. In training (``cache_prompts``) the embeddings of the prompt set are computed once and kept on the
CPU up to ``--prompt-cache-gib``, beyond it on disk (``prompt_cache.PromptCache``); the text encoders then
leave the accelerator (T5-XXL alone is about 9.5 GB in bf16), except CLIP encoders that carry trained LoRA
weights.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import torch

from .. import sizes
from ..errors import UserError
from .families import Layers
from .prompt_cache import DEFAULT_RAM_GIB, PromptCache

ENCODE_BATCH = 16  # prompts per text-encoder call when filling the cache


def calculate_shift(image_seq_len: int, config) -> float:
    """FLUX's ``mu``: linear in the number of packed image tokens between the scheduler config's
    (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift)."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base, top = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    slope = (top - base) / (max_len - base_len)
    return image_seq_len * slope + base - slope * base_len


def hw(resolution) -> tuple[int, int]:
    """(height, width) of a size: an int (square), ``HxW`` text or a pair (``rewardtune.sizes.hw``)."""
    return sizes.hw(int(resolution) if isinstance(resolution, np.integer) else resolution)


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
        store=None,
        encoder_device: str = "accelerator",
        device: torch.device | str | None = None,
    ):
        """``store``: a ``PromptStore`` whose embeddings are read before the large encoder runs and that its new
        ones are written to; ``encoder_device``: 'cpu' keeps the large encoder off the accelerator (it encodes
        there, once); ``device``: the accelerator when the pipeline has no denoiser (``encode-prompts``)."""
        self.pipe = pipe
        self.guidance_scale = guidance_scale
        self.max_sequence_length = max_sequence_length or self.default_max_sequence_length
        self.prompt_cache_gib = prompt_cache_gib
        self.store, self.encoder_device = store, encoder_device
        self._device = torch.device(device) if device is not None else None
        self._cache: PromptCache | None = None  # prompt -> CPU tensors, once cache_prompts switched caching on

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.transformer

    @property
    def device(self) -> torch.device:
        return self._device if self._device is not None else self.pipe.transformer.device

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

    def native_resolution(self) -> int:
        """The pipeline's default size (its ``default_sample_size`` latents)."""
        return int(self.pipe.default_sample_size) * self.vae_factor

    def _check_patches(self, resolution: int, patches: str) -> int:
        """A size the transformer's 2x2 patches of VAE latents tile: a multiple of twice the VAE factor, else a
        one-line error (``patches``: how the family says it, 'FLUX packs 2x2 latent patches'). Returns the step."""
        step = 2 * self.vae_factor
        if resolution % step:
            raise UserError(
                f"--resolution {resolution}: {patches}, so the size must be a multiple of {step} "
                f"(e.g. {max(step, resolution - resolution % step)})"
            )
        return step

    def vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        cfg = self.pipe.vae.config
        return latents / cfg.scaling_factor + cfg.shift_factor

    def pipeline_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The sampler's final latents as ``pipe(..., output_type="latent")`` returns them (here: the same)."""
        return latents

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
            return hidden.to(self.device), pooled if pooled is None else pooled.to(self.device)
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
        """Put ``prompts``' embeddings in the cache: the large encoder's from the store where it has them, else
        computed (and written to the store); the CLIP encoders' (``clip``) computed."""
        clip = clip and bool(self._clip_keys)  # a family may have no encoder but the large one (Qwen-Image)
        missing = [
            p
            for p in dict.fromkeys(prompts)
            if p not in self._cache or (clip and self._clip_keys[0] not in self._cache.names(p))
        ]
        if not missing:
            return
        need = [p for p in missing if p not in self._cache or self._t5_keys[0] not in self._cache.names(p)]
        stored = {p: e for p in need if (e := self._stored(p)) is not None}
        compute = [p for p in need if p not in stored]
        if compute and self.t5 is None:
            raise UserError(
                f"the prompt embeddings of {len(compute)} prompt(s) (e.g. {compute[0][:60]!r}) are not in "
                f"--prompt-embeddings '{self.store.root if self.store else ''}' and the text encoder was not "
                f"loaded; run rewardtune encode-prompts with these prompts first"
            )
        on_accelerator = [self.t5] if compute and self.encoder_device != "cpu" else []
        for te in on_accelerator + (self.text_encoders() if clip else []):
            if te is not None and te.device != self.device:  # (a no-op move of fake tensors fails: the planner)
                te.to(self.device)
        with torch.no_grad():
            for p, entry in stored.items():
                self._cache.put(p, entry)
            for chunk in _chunks(compute):
                parts = self._t5(chunk)
                for j, p in enumerate(chunk):
                    entry = {k: v[j] for k, v in parts.items()}
                    self._cache.put(p, entry)
                    if self.store is not None:
                        self.store.put(p, entry)
            for chunk in _chunks(missing) if clip else ():
                parts = self._clip(chunk)
                for j, p in enumerate(chunk):
                    self._cache.put(p, {k: v[j] for k, v in parts.items()})
        self._offload()

    def _stored(self, prompt: str) -> dict | None:
        entry = self.store.get(prompt) if self.store is not None else None
        return entry if entry is not None and all(k in entry for k in self._t5_keys) else None


class LLMFlowAdapter(FlowAdapter):
    """A flow family whose one text encoder is an LLM (``pipe.text_encoder``: Qwen-Image's Qwen2.5-VL, Z-Image's Qwen3,
    FLUX.2's Mistral or Qwen3): its features are only ever cached (``t5`` in the base's words), and no CLIP encoder
    is there for ``--train-text-encoder`` to adapt."""

    _clip_keys = ()

    def text_encoders(self) -> list:
        return []

    @property
    def t5(self):
        return self.pipe.text_encoder

    def _clip(self, prompts):
        return {}


def _chunks(prompts: list[str]):
    for i in range(0, len(prompts), ENCODE_BATCH):
        yield prompts[i : i + ENCODE_BATCH]


@cache
def planner_t5_tokenizer():
    """A T5 tokenizer built offline for the planner's shipped architectures (the real one's SentencePiece model is
    not shipped): the planner prompt's words, padding and end-of-sequence ids as T5's; prompts are padded to
    ``max_sequence_length``, so the shapes (all the planner needs) are the real ones."""
    from ..testing.flow_pipelines import t5_tokenizer  # noqa: PLC0415 (the offline builders load for the planner only)

    return t5_tokenizer(["a", "photograph", "of", "red", "bicycle"])


def single_and_double_layers(double: str = "num_layers", single: str = "num_single_layers"):
    """``Layers`` of a FLUX-like transformer: ``transformer_blocks`` (``double`` of them in the config), then
    ``single_transformer_blocks`` (``single``); the first double block stands alone."""

    def stacks(config: dict) -> dict[str, int]:
        return {"transformer.double": int(config.get(double, 0)) - 1, "transformer.single": int(config.get(single, 0))}

    def overrides(config: dict, depths: dict) -> dict:
        return {
            double: 1 + depths.get("transformer.double", int(config[double]) - 1),
            single: depths.get("transformer.single", int(config[single])),
        }

    def blocks(model) -> list:
        out = [(b, "transformer.double") for b in model.transformer_blocks]
        out[0] = (out[0][0], "transformer.first")
        return out + [(b, "transformer.single") for b in model.single_transformer_blocks]

    return Layers(stacks, overrides, blocks)

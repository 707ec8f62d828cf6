"""Qwen-Image: a 20B dual-stream MMDiT over packed 2x2 latent patches, prompts read by Qwen2.5-VL-7B inside the
pipeline's system template, a 3-D VAE with per-channel latent statistics, flow-matching Euler sampling with a
dynamic exponential shift stretched to ``shift_terminal``, and true classifier-free guidance against a negative
prompt whose result is rescaled, token by token, to the conditional prediction's norm."""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
from torch._subclasses.fake_tensor import is_fake

from ...errors import UserError
from ..flow_models import LLMFlowAdapter, calculate_shift, hw
from . import Alias, Family, Layers

# The joint attention of every dual-stream block (image and text streams) and both streams' feed-forwards.
QWENIMAGE_TARGETS = [
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "img_mlp.net.0.proj",
    "img_mlp.net.2",
    "txt_mlp.net.0.proj",
    "txt_mlp.net.2",
]
# The unconditional branch's prompt: QwenImagePipeline guides only against a negative prompt, and the model
# card (QwenLM/Qwen-Image README.md) passes " " when there is none.
NEGATIVE_PROMPT = " "


@dataclass
class QwenImageConditioning:
    """Qwen2.5-VL features of the prompts (and of the negative prompt under guidance) with their padding masks
    (None when no row is padded, as ``encode_prompt`` leaves them), the latent grid the rotary positions cover,
    and the true-CFG scale. The sampler sees one branch (``guided`` False): ``call`` runs both, as the pipeline
    does, one model call each."""

    hidden: torch.Tensor
    mask: torch.Tensor | None
    grid: tuple[int, int]  # packed latent rows, columns
    neg_hidden: torch.Tensor | None = None
    neg_mask: torch.Tensor | None = None
    scale: float = 1.0
    guided: bool = False

    def _one(self, model, x, t, hidden, mask):
        # QwenImagePipeline passes the timestep in the latents' dtype divided by 1000, one grid per sample
        return model(
            hidden_states=x,
            timestep=t.to(x.dtype) / 1000,
            encoder_hidden_states=hidden,
            encoder_hidden_states_mask=mask,
            img_shapes=[[(1, *self.grid)]] * x.shape[0],
            return_dict=False,
        )[0]

    def call(self, model, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cond = self._one(model, x, t, self.hidden, self.mask)
        if self.neg_hidden is None:
            return cond
        cond = cond.float()
        uncond = self._one(model, x, t, self.neg_hidden, self.neg_mask).float()
        guided = uncond + self.scale * (cond - uncond)
        # the pipeline's rescaling: each token's guided velocity takes the conditional one's norm
        return guided * (cond.norm(dim=-1, keepdim=True) / guided.norm(dim=-1, keepdim=True))


class QwenImageAdapter(LLMFlowAdapter):
    """Qwen-Image: Qwen2.5-VL's last hidden states of the templated prompt after its first 34 tokens (the
    pipeline's own ``_get_qwen_prompt_embeds``), cached; latents packed (B, tokens, 4C); true CFG with the
    negative prompt ' ' when ``guidance_scale`` (the pipeline's ``true_cfg_scale``) > 1."""

    family = "qwenimage"
    default_max_sequence_length = 512  # QwenImagePipeline.__call__'s
    _t5_keys = ("qwen", "qwen_len")

    def _t5(self, prompts):
        """Per prompt: its features after the template's dropped tokens, cut to ``max_sequence_length`` and
        zero-padded to it (so prompts cache and stack alike), and its length."""
        n = self.max_sequence_length
        if is_fake(next(self.t5.parameters())):
            # the planner's trace on fake weights: the pipeline picks each prompt's tokens by its mask, a shape no
            # fake tensor has; it plans for prompts of the full length instead, the most a run can take
            width = int(self.pipe.transformer.config.joint_attention_dim)
            full = torch.zeros(len(prompts), n, width, dtype=self.t5.dtype)
            return {"qwen": full, "qwen_len": torch.full((len(prompts),), n)}
        embeds, mask = self.pipe._get_qwen_prompt_embeds(prompts, device=self.t5.device)
        embeds = torch.nn.functional.pad(embeds[:, :n], (0, 0, 0, max(0, n - embeds.shape[1])))
        return {"qwen": embeds, "qwen_len": mask.sum(dim=1).clamp(max=n)}

    def _combine(self, clip, t5):
        """(features, padding mask) of a batch, padded to its longest prompt as ``encode_prompt`` pads them."""
        lengths = t5["qwen_len"].to(self.device)
        longest = t5["qwen"].shape[1] if is_fake(lengths) else int(lengths.max())  # (fake: the planner's trace)
        hidden = t5["qwen"][:, :longest].to(self.device)
        return hidden, (torch.arange(longest, device=self.device) < lengths[:, None]).long()

    def _text(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``embeddings``, with the mask None when no row is padded (``encode_prompt``'s rule)."""
        hidden, mask = self.embeddings(prompts)
        return hidden, (None if is_fake(mask) or bool(mask.all()) else mask)  # (fake: full-length prompts)

    def cache_prompts(self, prompts: list[str]) -> None:
        super().cache_prompts([*prompts, NEGATIVE_PROMPT])

    def encode(self, prompts: list[str], guided: bool, size) -> QwenImageConditioning:
        """``guided`` (the sampler's two-row guidance) is always False here: the guidance is the conditioning's."""
        if self.pipe.transformer.config.get("guidance_embeds", False):
            raise UserError(
                "--model: this Qwen-Image transformer has a guidance embedding (guidance_embeds); rewardtune "
                "samples Qwen-Image with true classifier-free guidance only, as the released models are"
            )
        hidden, mask = self._text(list(prompts))
        grid = tuple(s // (2 * self.vae_factor) for s in hw(size))
        scale = float(self.guidance_scale if self.guidance_scale is not None else 1.0)
        if scale <= 1:
            return QwenImageConditioning(hidden, mask, grid)
        neg_hidden, neg_mask = self._text([NEGATIVE_PROMPT] * len(prompts))
        return QwenImageConditioning(hidden, mask, grid, neg_hidden, neg_mask, scale)

    def sampler_options(self, resolution) -> dict:
        """QwenImagePipeline's schedule: sigmas linspace(1, 1/N, N), which the scheduler shifts (exponential
        time shift with mu from the packed token count, then stretched to end at ``shift_terminal``); one branch
        for the sampler (the guidance is in the conditioning); noise drawn (B, 1, C, 2h, 2w), then packed."""
        config = self.pipe.scheduler.config
        h, w = (s // (2 * self.vae_factor) for s in hw(resolution))
        mu = calculate_shift(h * w, config)
        channels = int(self.pipe.transformer.config.in_channels) // 4

        def schedule(n: int) -> dict:
            return {"sigmas": np.linspace(1.0, 1 / n, n), "mu": mu}

        def noise(shape: tuple, generator: torch.Generator) -> torch.Tensor:
            x = torch.randn((shape[0], channels, 2 * h, 2 * w), generator=generator, dtype=torch.float32)
            return self.pipe._pack_latents(x, shape[0], channels, 2 * h, 2 * w)

        return {"schedule": schedule, "guidance_scale": 1.0, "noise": noise}

    def check_resolution(self, resolution: int) -> None:
        self._check_patches(resolution, "Qwen-Image packs 2x2 latent patches")

    def latent_shape(self, resolution) -> tuple[int, ...]:
        h, w = (s // (2 * self.vae_factor) for s in hw(resolution))
        return (h * w, int(self.pipe.transformer.config.in_channels))

    def vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Packed square latents -> (B, C, 1, H, W) for the 3-D VAE, de-normalised per channel as the pipeline
        does (divided by 1/std, plus the mean)."""
        size = math.isqrt(latents.shape[1]) * 2 * self.vae_factor
        z = self.pipe._unpack_latents(latents, size, size, self.vae_factor)
        cfg = self.pipe.vae.config
        shape = (1, cfg.z_dim, 1, 1, 1)
        mean = torch.tensor(cfg.latents_mean).view(shape).to(z.device, z.dtype)
        std_inv = 1.0 / torch.tensor(cfg.latents_std).view(shape).to(z.device, z.dtype)
        return z / std_inv + mean


def assemble(parts: dict, tokenizer, tokenizer_2=None, tokenizer_3=None):
    """Tokenizer: Qwen2's."""
    from diffusers import QwenImagePipeline

    return QwenImagePipeline(**parts, tokenizer=tokenizer)


@cache
def _planner_tokenizer():
    """A Qwen2 tokenizer built offline (``testing.qwenimage_pipelines``): the planner's prompt and the pipeline's
    template in whole-word tokens, as the real one splits them."""
    from ...testing.qwenimage_pipelines import qwen_tokenizer  # noqa: PLC0415 (planner only)

    return qwen_tokenizer(tempfile.mkdtemp(prefix="rewardtune-qwen-tok-"))


def _stacks(config: dict) -> dict[str, int]:
    return {"transformer.blocks": int(config.get("num_layers", 0)) - 1}


def _overrides(config: dict, depths: dict) -> dict:
    return {"num_layers": 1 + depths.get("transformer.blocks", int(config["num_layers"]) - 1)}


def _blocks(model) -> list:
    blocks = [(b, "transformer.blocks") for b in model.transformer_blocks]
    blocks[0] = (blocks[0][0], "transformer.first")
    return blocks


FAMILY = Family(
    name="qwenimage",
    order=50,  # released 2025-08-04
    label="Qwen-Image",
    pipelines=("QwenImagePipeline",),
    adapter=QwenImageAdapter,
    denoiser="transformer",
    flow=True,
    # QwenImagePipeline.__call__'s defaults: 50 steps, true_cfg_scale 4.0, max_sequence_length 512
    defaults=dict(sample_steps=50, guidance_scale=4.0, lora_targets=QWENIMAGE_TARGETS, max_sequence_length=512),
    assemble=assemble,
    aliases={  # the model card's sampling settings (QwenLM/Qwen-Image README.md): 50 steps, true_cfg_scale 4.0
        "qwen-image": Alias(("Qwen/Qwen-Image",), dict(sample_steps=50, guidance_scale=4.0), plan="qwenimage"),
    },
    fsdp_blocks=("QwenImageTransformerBlock",),
    # its MMDiT, 3-D VAE and Qwen2.5-VL-7B encoder
    plan_architectures={
        "qwenimage": {
            "transformer": "qwenimage_transformer",
            "vae": "qwenimage_vae",
            "text_encoder": "qwen25vl_7b_text_encoder",
            "scheduler": "qwenimage_scheduler",
        }
    },
    plan_tokenizers=lambda parts, clip: (_planner_tokenizer(), None, None),
    layers=Layers(_stacks, _overrides, _blocks),
    # one step has no schedule: the scheduler's stretch to shift_terminal divides by the last shifted sigma's distance
    # from 1, which is 0 for a one-step schedule (QwenImagePipeline gives NaN there)
    min_sample_steps=2,
    cached_encoder="text_encoder",  # Qwen2.5-VL-7B: --prompt-embeddings, --text-encoder-device, --quantize-text-encoder
)

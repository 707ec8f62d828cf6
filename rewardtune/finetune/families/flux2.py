"""FLUX.2: dev (``Flux2Pipeline``: Mistral-Small-3.x text features, a guidance embedding) and klein
(``Flux2KleinPipeline``: Qwen3 text features, true classifier-free guidance against the empty prompt on the base
models, none on the step-distilled ones). One family: the two pipelines share the transformer class, the VAE, the
latent geometry, the schedule and the LoRA loader; they differ in the text encoder, the guidance and the layout of
``output_type="latent"``, which their two adapters below declare.

Facts from diffusers 0.42.1 (``pipelines/flux2/pipeline_flux2{,_klein}.py``, ``transformer_flux2.py``,
``autoencoder_kl_flux2.py``): the VAE's 32-channel latent is patchified 2x2 into 128 channels and normalised by the
VAE's BatchNorm statistics; the pipelines draw that (B, 128, H/16, W/16) latent, pack it to (B, tokens, 128) with
4-axis position ids (T, H, W, L) for the image and (0, 0, 0, l) for the text, and pass the timestep as sigma (t/1000,
the model multiplies by 1000); the schedule is sigmas linspace(1, 1/N, N) shifted with ``mu =
compute_empirical_mu(tokens, N)``, which depends on the number of steps as well as the image size; text features are
the hidden states of layers 10/20/30 (Mistral, behind a system message) or 9/18/27 (Qwen3, chat template with
thinking off) stacked per token, padded to ``max_sequence_length`` (512) and given to the transformer with no mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
import torch

from ..flow_models import LLMFlowAdapter, hw, single_and_double_layers
from . import Alias, Family

DEV_LAYERS = (10, 20, 30)  # Flux2Pipeline's text_encoder_out_layers
KLEIN_LAYERS = (9, 18, 27)  # Flux2KleinPipeline's

# The double-stream blocks' joint attention (image and text streams) and their SwiGLU feed-forwards, and the single-
# stream blocks' fused QKV+MLP input projection. The single blocks' fused output projection is also named
# 'attn.to_out' (a Linear), but in the double blocks that name is a ModuleList, which peft's suffix match would pick
# up and refuse; so it is named block by block (``lora_targets``, from the model's number of single blocks).
DOUBLE_AND_FUSED_TARGETS = [
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.linear_in",
    "ff.linear_out",
    "ff_context.linear_in",
    "ff_context.linear_out",
    "attn.to_qkv_mlp_proj",
]


def lora_targets(num_single_layers: int) -> list[str]:
    """The LoRA targets of a FLUX.2 transformer with ``num_single_layers`` single-stream blocks."""
    single_out = [f"single_transformer_blocks.{i}.attn.to_out" for i in range(num_single_layers)]
    return DOUBLE_AND_FUSED_TARGETS + single_out


# The sampling settings of BFL's reference code per model (black-forest-labs/flux2, src/flux2/util.py,
# FLUX2_MODEL_INFO "defaults": dev and the klein base models 50 steps, guidance 4.0; the step-distilled klein 4B/9B
# 4 steps, guidance 1.0, fixed), which are also the diffusers pipelines' call defaults (50, 4.0).
DISTILLED = dict(sample_steps=4, guidance_scale=1.0)


@dataclass
class Flux2Conditioning:
    """Text features (rows [uncond..., cond...] under klein's guidance), their and the image's position ids, and
    dev's guidance embedding value (None for klein). The sampler's latents are the pipeline's unpacked (B, 4C, h, w);
    the transformer takes them packed to (B, h*w, 4C), so ``call`` packs its input and unpacks its output."""

    hidden: torch.Tensor
    txt_ids: torch.Tensor
    img_ids: torch.Tensor
    guidance: float | None
    guided: bool = False

    def call(self, model, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        guidance = None
        if self.guidance is not None:
            guidance = torch.full([1], self.guidance, device=x.device, dtype=torch.float32).expand(b)
        # the pipelines pass the timestep in the latents' dtype divided by 1000 (the model multiplies it back)
        out = model(
            hidden_states=pack(x),
            timestep=t.to(x.dtype) / 1000,
            guidance=guidance,
            encoder_hidden_states=self.hidden,
            txt_ids=self.txt_ids,
            img_ids=self.img_ids,
            return_dict=False,
        )[0]
        return out.permute(0, 2, 1).reshape(b, c, h, w)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h*w, C): one token per latent position, row-major, as the FLUX.2 pipelines pack."""
    b, c, h, w = latents.shape
    return latents.reshape(b, c, h * w).permute(0, 2, 1)


class Flux2Adapter(LLMFlowAdapter):
    """What dev and klein share: the transformer call, the (B, 4C, H/16, W/16) latent of the pipelines'
    ``prepare_latents`` (before packing; the conditioning packs per call), 4-axis position ids, the step-dependent
    shifted schedule and the VAE's BatchNorm de-normalisation. The LLM is the encoder whose embeddings are only ever
    cached (``t5`` in the base's words); there is no encoder that ``--train-text-encoder`` could adapt."""

    family = "flux2"
    default_max_sequence_length = 512  # the pipelines' max_sequence_length
    _t5_keys = ("text",)
    layers: tuple[int, ...] = ()

    def _combine(self, clip, t5):
        return t5["text"].to(self.device), None

    def _guidance(self) -> float | None:
        return None

    def encode(self, prompts: list[str], guided: bool, size) -> Flux2Conditioning:
        hidden, _ = self.embeddings(list(prompts))
        if guided:
            neg, _ = self.embeddings([""] * len(prompts))
            hidden = torch.cat([neg, hidden])
        txt_ids = self.pipe._prepare_text_ids(hidden).to(self.device)
        h, w = (s // (2 * self.vae_factor) for s in hw(size))
        img_ids = self.pipe._prepare_latent_ids(torch.empty(hidden.shape[0], 0, h, w)).to(self.device)
        return Flux2Conditioning(hidden, txt_ids, img_ids, self._guidance(), guided)

    def sampler_options(self, resolution) -> dict:
        """The pipelines' schedule: sigmas linspace(1, 1/N, N) (None when the scheduler uses flow sigmas), shifted
        by the scheduler with ``mu = compute_empirical_mu(image tokens, N)``."""
        from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

        config = self.pipe.scheduler.config
        h, w = (s // (2 * self.vae_factor) for s in hw(resolution))

        def schedule(n: int) -> dict:
            sigmas = None if config.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / n, n)
            return {"sigmas": sigmas, "mu": compute_empirical_mu(image_seq_len=h * w, num_steps=n)}

        return {"schedule": schedule}

    def check_resolution(self, resolution: int) -> None:
        self._check_patches(resolution, "FLUX.2 patchifies 2x2 latent positions")

    def latent_shape(self, resolution) -> tuple[int, ...]:
        h, w = (s // (2 * self.vae_factor) for s in hw(resolution))
        return (int(self.pipe.transformer.config.in_channels), h, w)

    def vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, 4C, h, w) -> (B, C, 2h, 2w): de-normalised with the VAE's BatchNorm running statistics, then
        unpatchified (each channel group of four becomes a 2x2 patch), as the pipelines decode."""
        bn, eps = self.pipe.vae.bn, self.pipe.vae.config.batch_norm_eps
        mean = bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + eps).to(latents.device, latents.dtype)
        z = latents * std + mean
        b, c4, h, w = z.shape
        z = z.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
        return z.reshape(b, c4 // 4, 2 * h, 2 * w)


class Flux2DevAdapter(Flux2Adapter):
    """FLUX.2-dev: Mistral-Small-3.x's layers 10/20/30 behind the pipeline's system message; guidance is the
    transformer's embedding of ``guidance_scale`` (one branch); ``output_type="latent"`` gives packed latents."""

    layers = DEV_LAYERS

    @property
    def guidance_kind(self) -> str:
        return "embedded" if self.pipe.transformer.config.guidance_embeds else "none"

    def _guidance(self) -> float | None:
        return float(self.guidance_scale) if self.guidance_kind == "embedded" else None

    def _t5(self, prompts):
        pipe = self.pipe
        text = pipe._get_mistral_3_small_prompt_embeds(
            pipe.text_encoder,
            pipe.tokenizer,
            prompts,
            device=pipe.text_encoder.device,
            max_sequence_length=self.max_sequence_length,
            system_message=pipe.system_message,
            hidden_states_layers=self.layers,
        )
        return {"text": text}

    def sampler_options(self, resolution) -> dict:
        return {**super().sampler_options(resolution), "guidance_scale": 1.0}  # never two branches

    def pipeline_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return pack(latents)


class Flux2KleinAdapter(Flux2Adapter):
    """FLUX.2-klein: Qwen3's layers 9/18/27 of the chat-templated prompt (thinking off); true classifier-free
    guidance against the empty prompt when ``guidance_scale`` > 1 on a base model (``is_distilled`` false), none on
    the step-distilled ones; ``output_type="latent"`` gives the VAE's latents (de-normalised, unpatchified)."""

    layers = KLEIN_LAYERS

    @property
    def distilled(self) -> bool:
        return bool(self.pipe.config.get("is_distilled", False))

    @property
    def guidance_kind(self) -> str:
        return "none" if self.distilled else "cfg"

    def _t5(self, prompts):
        pipe = self.pipe
        text = pipe._get_qwen3_prompt_embeds(
            pipe.text_encoder,
            pipe.tokenizer,
            prompts,
            device=pipe.text_encoder.device,
            max_sequence_length=self.max_sequence_length,
            hidden_states_layers=self.layers,
        )
        return {"text": text}

    def sampler_options(self, resolution) -> dict:
        options = super().sampler_options(resolution)
        return {**options, "guidance_scale": 1.0} if self.distilled else options

    def pipeline_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae_latents(latents)


def make_adapter(pipe, **options) -> Flux2Adapter:
    """The adapter of ``pipe``'s pipeline class."""
    cls = Flux2KleinAdapter if type(pipe).__name__ == "Flux2KleinPipeline" else Flux2DevAdapter
    return cls(pipe, **options)


def assemble(parts: dict, tokenizer, tokenizer_2=None, tokenizer_3=None):
    """Tokenizer: dev's ``PixtralProcessor`` or klein's Qwen tokenizer; the text encoder's class says which."""
    from diffusers import Flux2KleinPipeline, Flux2Pipeline

    klein = type(parts.get("text_encoder")).__name__ == "Qwen3ForCausalLM"
    return (Flux2KleinPipeline if klein else Flux2Pipeline)(**parts, tokenizer=tokenizer)


def refine_defaults(config, pipeline_config) -> dict:
    """LoRA targets for this transformer's (``config``) single blocks; a step-distilled klein (``is_distilled`` in
    the pipeline's config) samples with its 4 steps and no guidance."""
    values = {"lora_targets": lora_targets(int(config["num_single_layers"]))}
    if pipeline_config.get("is_distilled", False):
        values.update(DISTILLED, guidance_free="is_distilled in its model_index.json")
    return values


_BASE = dict(sample_steps=50, guidance_scale=4.0)


@cache
def _planner_tokenizer(encoder_class: str):
    """klein's Qwen tokenizer or dev's text tokenizer, built offline (rewardtune.testing.flux2_pipelines). dev's is
    the tokenizer without its PixtralProcessor: the processor counts image tokens by their values, which the
    planner's fake tensors do not have (text-to-image has no image tokens). Prompts are padded to
    max_sequence_length all the same."""
    from ...testing.flux2_pipelines import dev_tokenizer, klein_tokenizer  # noqa: PLC0415 (planner only)

    return klein_tokenizer() if encoder_class == "Qwen3ForCausalLM" else dev_tokenizer()


# The planner: each transformer, VAE and LLM, and the scheduler config diffusers' conversion script gives FLUX.2
# (FLUX.1-dev's).
_PLAN_PARTS = {"vae": "flux2_vae", "scheduler": "flux_dev_scheduler"}

FAMILY = Family(
    name="flux2",
    order=60,  # released 2025-11-25
    label="FLUX.2",
    pipelines=("Flux2Pipeline", "Flux2KleinPipeline"),
    adapter=make_adapter,
    denoiser="transformer",
    flow=True,
    cached_encoder="text_encoder",  # the LLM: Mistral-Small-3.x (dev) or Qwen3 (klein)
    # the pipelines' own call defaults; the single blocks' output projections join from the model (refine_defaults)
    defaults=dict(**_BASE, lora_targets=DOUBLE_AND_FUSED_TARGETS, max_sequence_length=512),
    assemble=assemble,
    aliases={
        "flux2-dev": Alias(("black-forest-labs/FLUX.2-dev",), _BASE, plan="flux2dev"),
        # the klein base models are their distilled models' files with other weights
        "flux2-klein-4b": Alias(
            ("black-forest-labs/FLUX.2-klein-4B",), DISTILLED, guidance_free=True, plan="flux2klein4b"
        ),
        "flux2-klein-9b": Alias(
            ("black-forest-labs/FLUX.2-klein-9B",), DISTILLED, guidance_free=True, plan="flux2klein9b"
        ),
        "flux2-klein-base-4b": Alias(("black-forest-labs/FLUX.2-klein-base-4B",), _BASE, plan="flux2klein4b"),
        "flux2-klein-base-9b": Alias(("black-forest-labs/FLUX.2-klein-base-9B",), _BASE, plan="flux2klein9b"),
    },
    fsdp_blocks=("Flux2TransformerBlock", "Flux2SingleTransformerBlock"),
    refine_defaults=refine_defaults,
    plan_architectures={
        "flux2dev": {"transformer": "flux2_dev_transformer", "text_encoder": "mistral_small_3_encoder", **_PLAN_PARTS},
        "flux2klein4b": {
            "transformer": "flux2_klein_4b_transformer",
            "text_encoder": "qwen3_4b_encoder",
            **_PLAN_PARTS,
        },
        "flux2klein9b": {
            "transformer": "flux2_klein_9b_transformer",
            "text_encoder": "qwen3_8b_encoder",
            **_PLAN_PARTS,
        },
    },
    plan_tokenizers=lambda parts, clip: (_planner_tokenizer(type(parts["text_encoder"]).__name__), None, None),
    layers=single_and_double_layers(),
)

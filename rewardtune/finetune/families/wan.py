"""Wan 2.1 / 2.2 text-to-video (``WanPipeline``): a 3-D transformer over (frames, height, width) latents of a causal
video VAE, UMT5 prompt features, flow-matching sampling. Wan 2.2-A14B is a pair of transformers: ``transformer``
(high noise) runs the steps whose timestep is at least ``boundary_ratio`` x 1000, ``transformer_2`` (low noise) the
rest; Wan 2.2-TI2V-5B gives the transformer one timestep per latent token (``expand_timesteps``).

What ``WanPipeline`` (diffusers 0.42) does, and so what the adapter does:
- text: ``_get_t5_prompt_embeds``: UMT5's last hidden states of the prompt padded to ``max_sequence_length`` (512)
  tokens, the padding positions zeroed; the negative prompt "" under guidance. The features are cached like T5's;
- latents (B, 16, (F - 1)/4 + 1, H/8, W/8) for F frames (the VAE compresses time 4x: F must be 4k + 1), drawn fp32;
- the transformer takes the scheduler's timestep (sigma x 1000) as it is, predicts the velocity, and is called once
  per branch: cond, then uncond, combined as uncond + g (cond - uncond) for g > 1; the A14B low-noise stage takes
  ``guidance_scale_2`` (``--guidance-scale-2``), which the pipeline sets to ``guidance_scale`` when it is not given;
- schedule: the scheduler's own. The hub's is ``UniPCMultistepScheduler`` with flow sigmas and a ``flow_shift``; the
  trainer samples with Euler steps on those sigmas (the first-order step; UniPC's multistep corrector is not
  followed). Given the scheduler class its signature names, ``FlowMatchEulerDiscreteScheduler(shift=...)``, the
  sampler is the pipeline's step for step (tests/test_wan.py);
- latents to the VAE: x * latents_std + latents_mean per channel (``vae_latents``).

The LoRA: on the experts of the A14B pair that the gradient steps run on (``--lora-on high|low|both``; by default the
expert(s) the run's gradient steps can reach: DRaFT-K's last K steps, DRaFT-LV's last, AlignProp's draw range, ReFL's
stop range; ``both`` where they lie on both sides of the boundary). With ``both`` one optimizer trains both LoRAs and
each step's call goes to its expert through that expert's own (accelerate-wrapped) model. The files: one per expert,
as diffusers loads the pair (one file cannot feed both: ``WanPipeline.load_lora_weights`` puts ``transformer.`` keys
into ``transformer``, or into ``transformer_2`` with ``load_into_transformer_2=True``), both written by
``WanPipeline.save_lora_weights``:
- ``DIR/pytorch_lora_weights.safetensors``: the high-noise ``transformer``'s: ``pipe.load_lora_weights(DIR,
  adapter_name="high")``;
- ``DIR/transformer_2/pytorch_lora_weights.safetensors``: the low-noise ``transformer_2``'s:
  ``pipe.load_lora_weights(DIR + "/transformer_2", adapter_name="low", load_into_transformer_2=True)``.
``--lora-on low`` writes the second only, so the plain ``pipe.load_lora_weights(DIR)`` finds no LoRA file and fails
instead of loading it into the wrong expert (a second file beside the first would not do: given a directory, diffusers
loads its only ``.safetensors`` file whatever its name; ``lora.weight_name``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import is_fake

from ...errors import UserError
from ..flow_models import LLMFlowAdapter, hw, planner_t5_tokenizer
from . import Alias, Family, Layers

# The attention projections (self and cross) and the feed-forward of every block.
WAN_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]
LORA_ON = ("high", "low", "both")
EXPERTS = {"high": "transformer", "low": "transformer_2"}  # the pair's experts and their pipeline components
# Sampling defaults, checked against WanPipeline.__call__ (diffusers 0.42.1: height 480, width 832, num_frames 81,
# 50 steps, guidance_scale 5.0, guidance_scale_2 = guidance_scale when unset, max_sequence_length 512) and Wan's own
# configs (Wan-Video/Wan2.2 wan/configs/wan_t2v_A14B.py: 40 steps, boundary 0.875, sample_guide_scale (3.0, 4.0) for
# (low, high) noise; wan_ti2v_5B.py: 50 steps, guidance 5.0, 121 frames). The shift is the directory's scheduler's
# flow_shift, as WanPipeline samples: diffusers' scripts/convert_wan_to_diffusers.py writes 3.0 for T2V (Wan 2.1 and
# the A14B pair) and 5.0 for TI2V-5B, and WanPipeline's docstring advises 5.0 for 720P, 3.0 for 480P (set the
# scheduler's flow_shift in the directory for that). Wan's own A14B sampler shifts by 12.0 (sample_shift): the
# Diffusers repositories do not, and neither does the trainer.
WAN21 = dict(sample_steps=50, guidance_scale=5.0, num_frames=81)


@dataclass
class WanConditioning:
    """UMT5 features of the prompts (and of the empty negative prompt under guidance) and the guidance scale. The
    sampler sees one branch (``guided`` False): ``call`` runs cond then uncond, as the pipeline does. With an A14B
    pair, ``call`` picks the expert by the timestep: ``model`` (what the sampler passes: the trained transformer,
    as the accelerator wrapped it; with both experts trained {component: wrapped}) on the trained side of the boundary,
    ``other`` (frozen) on the other."""

    hidden: torch.Tensor
    neg_hidden: torch.Tensor | None = None
    scale: float = 1.0
    scale_2: float | None = None  # the low-noise expert's guidance (None: ``scale``)
    boundary: float | None = None  # the timestep at and above which the high-noise expert runs
    trained: str = "high"  # the expert ``model`` is
    other: torch.nn.Module | None = None
    expand_timesteps: bool = False
    guided: bool = False

    def expert(self, t: torch.Tensor) -> str:
        if self.boundary is None:
            return "high"
        # tolist, not float(t[0]): the planner hands real timesteps to its fake-tensor trace (plan/memory.py), where
        # any op on them (an index, a reshape) would make the value a fake one
        first = t.tolist()
        while isinstance(first, list):
            first = first[0]
        return "high" if float(first) >= self.boundary else "low"

    def _one(self, model, x, t, hidden):
        timestep = t
        if self.expand_timesteps:  # TI2V-5B: one timestep per latent token (2x2 patches), all the same for T2V
            f, h, w = x.shape[2], (x.shape[3] + 1) // 2, (x.shape[4] + 1) // 2
            timestep = t[:, None].expand(x.shape[0], f * h * w)
        return model(hidden_states=x, timestep=timestep, encoder_hidden_states=hidden, return_dict=False)[0]

    def call(self, model, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        expert = self.expert(t)
        if isinstance(model, dict):  # several trained experts, each through its own wrapper
            net = model.get(EXPERTS[expert], self.other)
        else:
            net = model if expert == self.trained else self.other
        cond = self._one(net, x, t, self.hidden)
        if self.neg_hidden is None:
            return cond
        uncond = self._one(net, x, t, self.neg_hidden)
        scale = self.scale_2 if expert == "low" and self.scale_2 is not None else self.scale
        return uncond + scale * (cond - uncond)


class WanAdapter(LLMFlowAdapter):
    """Wan: UMT5's features (cached, never trained), 5-D video latents, guidance in the conditioning, and on an
    A14B pair the expert switch at the boundary timestep (see the module docstring)."""

    family = "wan"
    default_max_sequence_length = 512  # WanPipeline.__call__'s
    _t5_keys = ("umt5",)
    video = True  # the trainer decodes frames and scores them with a video reward (finetune/video.py)
    num_frames = 81  # WanPipeline.__call__'s; ``configure`` sets the run's
    lora_on = "high"
    guidance_scale_2 = None

    def configure(self, cfg) -> None:
        """The run's options the adapter needs besides guidance and sequence length: frames, and on an A14B pair
        which expert carries the LoRA (``--lora-on``, default: the one the last gradient step runs on)."""
        self.num_frames = int(getattr(cfg, "num_frames", None) or self.num_frames)
        self.check_frames(self.num_frames)
        choice = getattr(cfg, "lora_on", None)
        self.guidance_scale_2 = getattr(cfg, "guidance_scale_2", None)
        if not self.paired:
            for flag, value in (("--lora-on", choice), ("--guidance-scale-2", self.guidance_scale_2)):
                if value is not None:
                    raise UserError(
                        f"{flag} {value}: this Wan model has one transformer (no transformer_2 and boundary_ratio); "
                        f"leave {flag} unset"
                    )
            return
        self.lora_on = choice or self.default_lora_on(cfg)
        reached = self.reached_experts(cfg)
        if self.lora_on != "both" and self.lora_on not in reached:
            steps = self.gradient_steps(cfg)
            raise UserError(
                f"--lora-on {self.lora_on}: the steps that carry gradients ({steps.start + 1}-{steps.stop} of "
                f"{int(getattr(cfg, 'sample_steps', None) or 50)}) all run on the {reached.pop()}-noise expert, so "
                f"this LoRA would get no gradient; use --lora-on {'low' if self.lora_on == 'high' else 'high'} or "
                f"both, or other --k / --refl-min/--refl-max"
            )
        if hasattr(cfg, "lora_on"):
            cfg.lora_on = self.lora_on  # resolved, as the model's defaults are (config.yaml; the planner's trace)

    @property
    def paired(self) -> bool:
        return getattr(self.pipe, "transformer_2", None) is not None and self.pipe.config.boundary_ratio is not None

    @property
    def boundary(self) -> float | None:
        if not self.paired:
            return None
        return float(self.pipe.config.boundary_ratio) * int(self.pipe.scheduler.config.num_train_timesteps)

    def gradient_steps(self, cfg) -> range:
        """The steps of the run's schedule that can carry gradients: DRaFT-K's last K, DRaFT-LV's last, AlignProp's
        draw range (its largest K), ReFL's stop range (``sampler.make_plan``'s bounds)."""
        steps = int(getattr(cfg, "sample_steps", None) or 50)
        method = getattr(cfg, "method", "draft-k")
        if method == "refl":
            lo = min(steps - 1, int(float(cfg.refl_min) * steps))
            hi = min(steps - 1, max(lo, math.ceil(float(cfg.refl_max) * steps) - 1))
            return range(lo, hi + 1)
        k = 1 if method == "draft-lv" else int(getattr(cfg, "k", None) or (steps if method == "alignprop" else 1))
        return range(max(0, steps - k), steps)

    def reached_experts(self, cfg) -> set[str]:
        """The experts ("high", "low") of the steps that carry gradients (``gradient_steps``)."""
        timesteps = self._timesteps(int(getattr(cfg, "sample_steps", None) or 50))
        return {"high" if float(timesteps[i]) >= self.boundary else "low" for i in self.gradient_steps(cfg)}

    def default_lora_on(self, cfg) -> str:
        """The expert(s) of the steps that carry gradients: ``both`` where they lie on both sides of the boundary."""
        sides = self.reached_experts(cfg)
        return sides.pop() if len(sides) == 1 else "both"

    def _timesteps(self, n: int) -> torch.Tensor:
        from ..models import training_scheduler  # noqa: PLC0415 (models imports the families)

        scheduler = training_scheduler(self.pipe)
        scheduler.set_timesteps(n, **self.sampler_options(None)["schedule"](n))
        return scheduler.timesteps

    def trained_denoisers(self) -> dict:
        """{component: transformer} of the experts that carry the LoRA (the transformer of a single model); the
        trainer writes each one's LoRA file (``LoraSet.files``)."""
        if not self.paired:
            return {"transformer": self.pipe.transformer}
        sides = ("high", "low") if self.lora_on == "both" else (self.lora_on,)
        return {EXPERTS[side]: getattr(self.pipe, EXPERTS[side]) for side in sides}

    @property
    def denoiser(self) -> torch.nn.Module:
        return next(iter(self.trained_denoisers().values()))

    @property
    def frozen_expert(self) -> torch.nn.Module | None:
        """The A14B expert without LoRA (moved to the accelerator beside the trained one), or None."""
        if not self.paired or self.lora_on == "both":
            return None
        return self.pipe.transformer if self.lora_on == "low" else self.pipe.transformer_2

    def lora_load_calls(self, directory) -> list[str]:
        """The diffusers calls that load this run's LoRA from ``directory`` into a ``WanPipeline`` ``pipe``: an A14B
        pair's a call per trained expert (the low-noise one's from the ``transformer_2`` subdirectory)."""
        if not self.paired:
            return [f"pipe.load_lora_weights({str(directory)!r})"]
        calls = []
        for name in self.trained_denoisers():
            if name == "transformer":
                calls.append(f"pipe.load_lora_weights({str(directory)!r}, adapter_name='high')")
            else:
                calls.append(
                    f"pipe.load_lora_weights({str(Path(directory) / name)!r}, adapter_name='low', "
                    f"load_into_{name}=True)"
                )
        return calls

    def frozen_parts(self) -> list:
        return [m for m in (self.frozen_expert,) if m is not None]

    @property
    def device(self) -> torch.device:
        return self._device if self._device is not None else self.denoiser.device

    # ----- geometry ---------------------------------------------------------------------------
    @property
    def vae_factor(self) -> int:
        return int(self.pipe.vae_scale_factor_spatial)

    @property
    def temporal_factor(self) -> int:
        return int(self.pipe.vae_scale_factor_temporal)

    def check_frames(self, frames: int) -> None:
        k = self.temporal_factor
        if frames < 1 or (frames - 1) % k:
            lower = max(1, (frames - 1) // k * k + 1)
            raise UserError(
                f"--num-frames {frames}: Wan's VAE compresses time {k}x, so it takes {k}k + 1 frames "
                f"(e.g. {lower} or {lower + k})"
            )

    def native_resolution(self) -> str:
        return "480x832"  # WanPipeline.__call__'s default height and width

    def check_resolution(self, resolution: int) -> None:
        patch = self.denoiser.config.patch_size
        step = self.vae_factor * int(patch[1])
        if resolution % step or resolution < step:
            raise UserError(
                f"--resolution {resolution}: Wan packs {patch[1]}x{patch[2]} patches of {self.vae_factor}x-downsampled "
                f"latents, so the size must be a multiple of {step} (e.g. {max(step, resolution - resolution % step)})"
            )

    def latent_frames(self, frames: int | None = None) -> int:
        return ((frames or self.num_frames) - 1) // self.temporal_factor + 1

    def latent_shape(self, resolution) -> tuple[int, ...]:
        h, w = hw(resolution)
        c = int(self.denoiser.config.in_channels)
        return (c, self.latent_frames(), h // self.vae_factor, w // self.vae_factor)

    def vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        cfg = self.pipe.vae.config
        shape = (1, int(cfg.z_dim), 1, 1, 1)
        mean = torch.tensor(cfg.latents_mean, device=latents.device, dtype=latents.dtype).view(shape)
        std = torch.tensor(cfg.latents_std, device=latents.device, dtype=latents.dtype).view(shape)
        return latents * std + mean

    # ----- text -------------------------------------------------------------------------------
    def _t5(self, prompts):
        """``_get_t5_prompt_embeds``: (B, max_sequence_length, 4096), the padding zeroed. On the planner's fake weights
        (whose lengths have no values to cut at) zeros of that shape: the shape is all the planner reads."""
        if is_fake(next(self.t5.parameters())):
            width = int(self.t5.config.d_model)
            return {"umt5": torch.zeros(len(prompts), self.max_sequence_length, width, dtype=self.t5.dtype)}
        embeds = self.pipe._get_t5_prompt_embeds(
            list(prompts), max_sequence_length=self.max_sequence_length, device=self.t5.device
        )
        return {"umt5": embeds}

    def _combine(self, clip, t5):
        return t5["umt5"].to(self.device), None

    def encode(self, prompts: list[str], guided: bool, size) -> WanConditioning:
        """``guided`` (the sampler's two-row guidance) is unused: the guidance is the conditioning's."""
        hidden, _ = self.embeddings(list(prompts))
        hidden = hidden.to(self.denoiser.dtype)
        scale = float(self.guidance_scale if self.guidance_scale is not None else 1.0)
        neg = self.embeddings([""] * len(prompts))[0].to(hidden.dtype) if scale > 1 else None
        return WanConditioning(
            hidden,
            neg,
            scale,
            scale_2=self.guidance_scale_2,
            boundary=self.boundary,
            trained=self.lora_on if self.paired and self.lora_on != "both" else "high",
            other=self.frozen_expert,
            expand_timesteps=bool(self.pipe.config.get("expand_timesteps", False)),
        )

    def sampler_options(self, resolution) -> dict:
        """The schedule: a ``FlowMatchEulerDiscreteScheduler`` pipeline's own grid; for the hub's UniPC flow
        scheduler its sigmas linspace(1, 1/T, N + 1)[:-1] before the shift (UniPC's ``use_flow_sigmas``), which the
        Euler scheduler shifts by the same ``flow_shift`` (UniPC's timesteps are those sigmas x T as integers; the
        sampler keeps them unrounded). One branch for the sampler (guidance is the conditioning's)."""
        config = self.pipe.scheduler.config
        unipc = bool(config.get("use_flow_sigmas", False)) or getattr(self.pipe.scheduler, "flow_grid", False)
        total = int(config.get("num_train_timesteps", 1000))

        def schedule(n: int) -> dict:
            if not unipc:
                return {}
            return {"sigmas": torch.linspace(1, 1 / total, n + 1)[:-1].tolist()}

        return {"schedule": schedule, "guidance_scale": 1.0}


# ComfyUI's Wan model (Comfy-Org/ComfyUI comfy/ldm/wan/model.py: WanAttentionBlock's self_attn / cross_attn with
# Linear q, k, v, o, and ffn = Sequential(Linear, GELU, Linear)) keeps Wan's own names, and its LoRA key map has no Wan
# branch for diffusers names (comfy/lora.py, model_lora_keys_unet): a diffusers file's keys find no weight there. The
# export renames each module as diffusers' scripts/convert_wan_to_diffusers.py renamed it, backwards (and as diffusers'
# own loader, lora_conversion_utils._convert_non_diffusers_wan_lora_to_diffusers, reads such a file: tested).
_COMFYUI_ATTENTION = {"attn1": "self_attn", "attn2": "cross_attn"}
_COMFYUI_LINEAR = {
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "o",
    "add_k_proj": "k_img",
    "add_v_proj": "v_img",
}
_COMFYUI_FFN = {"ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2"}


def comfyui_name(module: str) -> str | None:
    """A Wan transformer module's diffusers name (``blocks.3.attn1.to_q``) as ComfyUI's Wan model names it
    (``blocks.3.self_attn.q``); None for a module outside the blocks' attention and feed-forward."""
    parts = module.split(".", 2)
    if len(parts) != 3 or parts[0] != "blocks" or not parts[1].isdigit():
        return None
    block, rest = f"blocks.{parts[1]}", parts[2]
    if rest in _COMFYUI_FFN:
        return f"{block}.{_COMFYUI_FFN[rest]}"
    attention, _, linear = rest.partition(".")
    if attention in _COMFYUI_ATTENTION and linear in _COMFYUI_LINEAR:
        return f"{block}.{_COMFYUI_ATTENTION[attention]}.{_COMFYUI_LINEAR[linear]}"
    return None


def _stacks(config: dict) -> dict[str, int]:
    return {"transformer.blocks": int(config.get("num_layers", 0)) - 1}


def _overrides(config: dict, depths: dict) -> dict:
    return {"num_layers": 1 + depths.get("transformer.blocks", int(config["num_layers"]) - 1)}


def _blocks(model) -> list:
    blocks = [(b, "transformer.blocks") for b in model.blocks]
    blocks[0] = (blocks[0][0], "transformer.first")
    return blocks


# The planner's full-size architectures (plan/configs/*.json, each naming its source: diffusers'
# scripts/convert_wan_to_diffusers.py, and Wan's own umt5_xxl() for the text encoder). Wan 2.1 and the A14B pair share
# the 16-channel VAE (8x spatial, 4x temporal) and the UniPC flow scheduler with flow_shift 3; TI2V-5B has the
# 48-channel VAE 2.2 (16x spatial: 2x2 patches inside the VAE) and flow_shift 5. The pipeline's own settings
# (boundary_ratio, expand_timesteps) are the "pipeline" entry, as model_index.json holds them.
_WAN21_PARTS = dict(vae="wan21_vae", text_encoder="umt5_xxl_encoder", scheduler="wan21_scheduler")
PLAN_ARCHITECTURES = {
    "wan21-t2v-1.3b": dict(transformer="wan21_t2v_13b_transformer", **_WAN21_PARTS),
    "wan21-t2v-14b": dict(transformer="wan21_t2v_14b_transformer", **_WAN21_PARTS),
    "wan22-ti2v-5b": dict(
        transformer="wan22_ti2v_5b_transformer",
        vae="wan22_vae",
        text_encoder="umt5_xxl_encoder",
        scheduler="wan22_ti2v_scheduler",
        pipeline="wan22_ti2v_5b_pipeline",
    ),
    "wan22-t2v-a14b": dict(
        transformer="wan22_t2v_a14b_transformer",
        transformer_2="wan22_t2v_a14b_transformer",
        pipeline="wan22_t2v_a14b_pipeline",
        **_WAN21_PARTS,
    ),
}


def assemble(parts: dict, tokenizer, tokenizer_2=None, tokenizer_3=None):
    """Tokenizer: UMT5's (T5's kind)."""
    from diffusers import WanPipeline

    return WanPipeline(**parts, tokenizer=tokenizer)


FAMILY = Family(
    name="wan",
    order=80,  # Wan 2.1: 2025-02-25 (Wan 2.2: 2025-07-28)
    label="Wan",
    pipelines=("WanPipeline",),
    adapter=WanAdapter,
    denoiser="transformer",
    flow=True,
    cached_encoder="text_encoder",  # UMT5-XXL, about 11 GB in bf16
    # WanPipeline's own call defaults (num_inference_steps=50, guidance_scale=5.0, max_sequence_length=512)
    defaults=dict(**WAN21, lora_targets=WAN_TARGETS, max_sequence_length=512),
    assemble=assemble,
    aliases={
        "wan21-t2v-1.3b": Alias(("Wan-AI/Wan2.1-T2V-1.3B-Diffusers",), dict(WAN21), plan="wan21-t2v-1.3b"),
        "wan22-ti2v-5b": Alias(
            ("Wan-AI/Wan2.2-TI2V-5B-Diffusers",), dict(WAN21, num_frames=121), plan="wan22-ti2v-5b"
        ),
        "wan21-t2v-14b": Alias(("Wan-AI/Wan2.1-T2V-14B-Diffusers",), dict(WAN21), plan="wan21-t2v-14b"),
        "wan22-t2v-a14b": Alias(
            ("Wan-AI/Wan2.2-T2V-A14B-Diffusers",),
            dict(WAN21, sample_steps=40, guidance_scale=4.0, guidance_scale_2=3.0),
            plan="wan22-t2v-a14b",
        ),
    },
    fsdp_blocks=("WanTransformerBlock",),
    comfyui_name=comfyui_name,
    plan_architectures=PLAN_ARCHITECTURES,
    plan_tokenizers=lambda parts, clip: (planner_t5_tokenizer(), None, None),
    layers=Layers(_stacks, _overrides, _blocks),
    options=("num_frames", "frame_weights", "lora_on", "guidance_scale_2"),
    lora_parts=("transformer_2",),  # --lora-on low/both: the low-noise expert's LoRA (see the module docstring)
)

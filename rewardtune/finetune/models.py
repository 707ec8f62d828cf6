"""Diffusion models: aliases, loading, and one adapter per family.

The adapters are the only place SD 1.x/2.x and SDXL differ: how prompts become the UNet's
conditioning (SD: one text encoder; SDXL: two, pooled embeddings and ``add_time_ids``). They use the
pipelines' own ``encode_prompt`` so the fine-tuned model sees exactly what ``pipe(...)`` feeds it.
The flow-matching families (SD3/SD3.5, FLUX.1) have theirs in ``flow_models``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import OfflineError, UserError
from ..sources import resolve
from .flow_models import FLOW_ADAPTERS

# The public base checkpoints. runwayml's SD 1.5 repo was taken down; its mirror comes first.
ALIASES = {
    "sd15": ("stable-diffusion-v1-5/stable-diffusion-v1-5", "runwayml/stable-diffusion-v1-5"),
    "sd21": ("stabilityai/stable-diffusion-2-1",),
    "sdxl": ("stabilityai/stable-diffusion-xl-base-1.0",),
    "sd3-medium": ("stabilityai/stable-diffusion-3-medium-diffusers",),
    "sd35-medium": ("stabilityai/stable-diffusion-3.5-medium",),
    "sd35-large": ("stabilityai/stable-diffusion-3.5-large",),
    "sd35-large-turbo": ("stabilityai/stable-diffusion-3.5-large-turbo",),
    "flux-dev": ("black-forest-labs/FLUX.1-dev",),
    "flux-schnell": ("black-forest-labs/FLUX.1-schnell",),
}
FAMILIES = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
}
# What a training run needs from a hub snapshot: configs, tokenizers, full-precision safetensors weights
# (the transformers and T5 of SD3/FLUX come in shards).
ALLOW_PATTERNS = [
    "model_index.json",
    "*/*.json",
    "*/*.txt",
    "*/*.model",
    "*/diffusion_pytorch_model.safetensors",
    "*/model.safetensors",
    "*/diffusion_pytorch_model-*-of-*.safetensors",
    "*/model-*-of-*.safetensors",
]


def resolve_model(name: str) -> Path:
    """A local diffusers-format directory for an alias, a directory, or a hub id."""
    name = str(name)
    if "/" not in name and not Path(name).expanduser().exists() and name not in ALIASES:
        raise UserError(
            f"--model '{name}' is not an alias ({', '.join(ALIASES)}), a directory, or a hub id (owner/name)"
        )
    candidates = ALIASES.get(name, (name,))
    for i, hub_id in enumerate(candidates):
        try:
            path = resolve(hub_id, f"--model {name}", allow_patterns=ALLOW_PATTERNS)
            break
        except OfflineError:
            if i == len(candidates) - 1:
                raise
    if not (path / "model_index.json").is_file():
        raise UserError(
            f"--model '{name}': '{path}' has no model_index.json; pass a diffusers-format pipeline directory"
        )
    return path


def model_family(path: Path) -> str:
    """'sd', 'sdxl', 'sd3' or 'flux', read from ``model_index.json``'s ``_class_name`` (never guessed from the name)."""
    try:
        cls = json.loads((path / "model_index.json").read_text()).get("_class_name", "")
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(
            f"--model: '{path / 'model_index.json'}' is unreadable ({type(exc).__name__}); re-download the model"
        ) from None
    if cls not in FAMILIES:
        raise UserError(
            f"--model: '{path}' is a {cls or 'unknown pipeline'}; finetune supports "
            f"{', '.join(FAMILIES)} (SD 1.x/2.x, SDXL, SD3/SD3.5, FLUX.1)"
        )
    return FAMILIES[cls]


def pipeline_class(family: str):
    import diffusers

    name = {v: k for k, v in FAMILIES.items()}[family]
    return getattr(diffusers, name)


def load_pipeline(name: str, dtype: torch.dtype = torch.float32, check=None, quantize: str = "none"):
    """(pipeline, family): frozen weights in ``dtype`` and the training scheduler built from the model's config.
    ``check(family)`` runs once the family is known, before any weights load (option errors fail fast).
    ``quantize`` 'nf4' or 'int8': the UNet/transformer loaded through bitsandbytes (compute in ``dtype``)."""
    path = resolve_model(name)
    family = model_family(path)
    if check is not None:
        check(family)
    cls = pipeline_class(family)
    kw = {"safety_checker": None, "requires_safety_checker": False} if family == "sd" else {}
    try:
        if quantize != "none":
            kw.update(_quantized_denoiser(path, family, quantize, dtype))
        pipe = cls.from_pretrained(path, **_dtype_kwarg(dtype), **kw)
    except (OSError, ValueError) as exc:
        raise UserError(
            f"--model '{name}': could not load the pipeline from '{path}' ({str(exc).splitlines()[0][:200]})"
        ) from None
    return prepare_pipeline(pipe)


def pipeline_family(pipe) -> str:
    family = FAMILIES.get(type(pipe).__name__)
    if family is None:
        raise UserError(f"a {type(pipe).__name__} cannot be fine-tuned; supported: {', '.join(FAMILIES)}")
    return family


def training_scheduler(pipe):
    """The scheduler the trainer samples ``pipe`` with, built from its scheduler's config (a new object).

    SD/SDXL: DDIM on the model's own betas, timestep spacing and prediction type, with the SD pipelines' own
    config fixes (no x0 clipping, latents are not in [-1, 1]; steps_offset 1) and ending at a clean sample
    (``set_alpha_to_one``: the last step goes to alpha 1, not to alphas_cumprod[0]). The SD 1.x/2.x/SDXL configs
    on the hub carry ``set_alpha_to_one: false``, which would leave sigma ~0.03 of noise in every trained-on
    image, where the stock Euler sampler of SDXL ends clean: with alpha 1 at the end, DDIM at eta 0 and the stock
    Euler scheduler give the same images. SD3/FLUX: the flow-matching Euler scheduler their pipelines ship
    (shift, dynamic shifting as configured)."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    if pipeline_family(pipe) in FLOW_ADAPTERS:
        return FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    return DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False, steps_offset=1, set_alpha_to_one=True)


def prepare_pipeline(pipe):
    """(pipeline, family) for an already built pipeline: the training scheduler, frozen parts, no progress bars."""
    family = pipeline_family(pipe)
    pipe.scheduler = training_scheduler(pipe)
    pipe.set_progress_bar_config(disable=True)
    for part in ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(pipe, part, None)
        if module is not None:
            module.requires_grad_(False)
            module.eval()
    return pipe, family


def assemble_pipeline(family: str, parts: dict, tokenizer, tokenizer_2=None, tokenizer_3=None):
    """The family's pipeline from built parts (``unet`` or ``transformer``, ``vae``, ``text_encoder``[``_2``,
    ``_3``], ``scheduler``), with the settings every rewardtune pipeline has: no safety checker, no watermark,
    SDXL's zeroed empty prompt. Tokenizers: SD3 CLIP-L, CLIP-G, T5; FLUX CLIP-L, T5."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    if family == "sd":
        return StableDiffusionPipeline(
            **parts, tokenizer=tokenizer, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    if family == "sdxl":
        return StableDiffusionXLPipeline(
            **parts,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2 or tokenizer,
            force_zeros_for_empty_prompt=True,
            add_watermarker=False,
        )
    if family == "sd3":
        return StableDiffusion3Pipeline(
            **parts, tokenizer=tokenizer, tokenizer_2=tokenizer_2 or tokenizer, tokenizer_3=tokenizer_3
        )
    if family == "flux":
        return FluxPipeline(**parts, tokenizer=tokenizer, tokenizer_2=tokenizer_2)
    raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES.values())}")


def _quantized_denoiser(path: Path, family: str, quantize: str, dtype: torch.dtype) -> dict:
    """{component name: the denoiser loaded in 4-bit NF4 or 8-bit} (bitsandbytes).

    On a GPU diffusers quantizes while loading (``quantization_config``). diffusers refuses that without a GPU
    ("No GPU found. A GPU is needed for quantization.", 0.42), while bitsandbytes' own layers run on the CPU: there
    the denoiser loads in ``dtype`` and every ``nn.Linear`` is swapped for bitsandbytes' layer, as diffusers'
    quantizer does (it converts every Linear of these models; none keeps fp32), quantized on the CPU."""
    import diffusers
    from diffusers import BitsAndBytesConfig

    name = "unet" if family in ("sd", "sdxl") else "transformer"
    model_cls = getattr(diffusers, json.loads((path / "model_index.json").read_text())[name][1])
    if not torch.cuda.is_available():
        model = model_cls.from_pretrained(path, subfolder=name, **_dtype_kwarg(dtype))
        return {name: quantize_linears_on_cpu(model.requires_grad_(False), quantize, dtype)}
    if quantize == "nf4":
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    return {name: model_cls.from_pretrained(path, subfolder=name, quantization_config=config, **_dtype_kwarg(dtype))}


def quantize_linears_on_cpu(model: torch.nn.Module, quantize: str, dtype: torch.dtype) -> torch.nn.Module:
    """``model`` (on the CPU) with every ``nn.Linear`` replaced by bitsandbytes' ``Linear4bit`` (NF4, blocksize 64,
    no double quantization: diffusers' ``BitsAndBytesConfig`` defaults) or ``Linear8bitLt`` (threshold 6.0, no fp16
    copy: the config's defaults), frozen, quantized by bitsandbytes on the CPU; computes in ``dtype``."""
    import bitsandbytes as bnb

    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear:
                continue
            bias = child.bias is not None
            weight = child.weight.data.to(dtype)
            if quantize == "nf4":
                layer = bnb.nn.Linear4bit(
                    child.in_features, child.out_features, bias, dtype, False, quant_type="nf4", device="meta"
                )
                layer.weight = bnb.nn.Params4bit(
                    weight, requires_grad=False, compress_statistics=False, quant_type="nf4", module=layer
                )
                # bitsandbytes repacks the weight for AVX512-BF16 inference on an eval-mode forward without gradient
                # (the sampler's first steps) and its repacked matmul has no backward: later steps would fail
                layer.support_avx512bf16_for_cpu = False
            else:
                layer = bnb.nn.Linear8bitLt(
                    child.in_features, child.out_features, bias, has_fp16_weights=False, threshold=6.0, device="meta"
                )
                layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
            if bias:
                layer.bias = torch.nn.Parameter(child.bias.data.to(dtype), requires_grad=False)
            layer.source_cls = torch.nn.Linear  # as diffusers' replace_with_bnb_linear marks its layers
            setattr(parent, child_name, layer.to("cpu"))  # bitsandbytes quantizes on the move to a device
    return model


def cpu_quantization_problem(quantize: str) -> str | None:
    """None when bitsandbytes' ``nf4``/``int8`` layer, as ``quantize_linears_on_cpu`` builds it, quantizes, runs
    forward and passes a gradient to its input on the CPU (what a LoRA on a frozen quantized base needs, through
    every later sampling step); else the first line of what failed."""
    try:
        gen = torch.Generator().manual_seed(0)
        model = quantize_linears_on_cpu(torch.nn.Sequential(torch.nn.Linear(64, 64)), quantize, torch.float32).eval()
        with torch.no_grad():  # the trainer's order: sampling steps without gradient, then steps with it
            model(torch.randn(2, 64, generator=gen))
        x = torch.randn(2, 64, generator=gen, requires_grad=True)
        model(x).square().sum().backward()
        if x.grad is None or not bool(torch.isfinite(x.grad).all()):
            return "no finite gradient reached the layer's input"
    except Exception as exc:  # an old bitsandbytes without a CPU backend fails in several ways
        return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
    return None


def _dtype_kwarg(dtype: torch.dtype) -> dict:
    """diffusers renamed ``torch_dtype`` to ``dtype`` (0.36); pass whichever this version takes."""
    if dtype == torch.float32:
        return {}
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401  (only in versions taking dtype=)

        return {"dtype": dtype}
    except ImportError:
        return {"torch_dtype": dtype}


@dataclass
class Conditioning:
    """What a UNet gets besides the latent; rows are [uncond..., cond...] under guidance.

    Every family's conditioning has ``guided`` and ``call(model, x, t)``: the sampler never needs to know
    how a family's denoiser is called."""

    hidden: torch.Tensor
    added: dict | None
    guided: bool

    def unet_kwargs(self) -> dict:
        kw = {"encoder_hidden_states": self.hidden}
        if self.added is not None:
            kw["added_cond_kwargs"] = self.added
        return kw

    def call(self, model, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return model(x, t, **self.unet_kwargs(), return_dict=False)[0]


class UNetAdapter:
    """What the trainer needs to know of a UNet family (SD 1.x/2.x, SDXL): the denoiser that carries the
    LoRA, its text encoders, latent geometry, the VAE's latent scaling, and (in subclasses) prompt encoding.
    A flow-matching family implements the same methods for its transformer."""

    family = ""
    sampler_kind = "ddim"  # which truncated sampler steps this family (sampler.make_sampler)
    guidance_kind = "cfg"  # classifier-free guidance rows when --guidance-scale > 1

    def __init__(self, pipe, **options):
        """``options`` (guidance_scale, max_sequence_length) matter to the flow families only."""
        self.pipe = pipe

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.unet

    def text_encoders(self) -> list:
        return text_encoders(self.pipe)

    def cache_prompts(self, prompts: list[str]) -> None:
        """Nothing to cache: the SD/SDXL text encoders are small and stay beside the UNet."""

    def encode(self, prompts: list[str], guided: bool, size: tuple[int, int]) -> Conditioning:
        raise NotImplementedError

    def native_resolution(self) -> int:
        return int(self.pipe.unet.config.sample_size) * self.pipe.vae_scale_factor

    def check_resolution(self, resolution: int) -> None:
        f = self.pipe.vae_scale_factor
        if resolution % f:
            raise UserError(f"--resolution {resolution} is not divisible by the VAE's factor {f}")
        smallest = f * 2 ** (len(self.pipe.unet.config.block_out_channels) - 1)  # the UNet halves the latent per level
        if resolution < smallest:
            raise UserError(f"--resolution {resolution} is too small for this model; use at least {smallest}")

    def latent_shape(self, resolution: int) -> tuple[int, ...]:
        """One sample's latent shape, in the layout the sampler works in."""
        s = resolution // self.pipe.vae_scale_factor
        return (self.pipe.unet.config.in_channels, s, s)

    def vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The sampler's latents as the VAE decoder takes them (undo the scaling and shift)."""
        cfg = self.pipe.vae.config
        z = latents / cfg.scaling_factor
        if getattr(cfg, "shift_factor", None):
            z = z + cfg.shift_factor
        return z


class SDAdapter(UNetAdapter):
    """SD 1.x/2.x: one CLIP text encoder; the unconditional rows encode the empty prompt."""

    family = "sd"

    def encode(self, prompts: list[str], guided: bool, size: tuple[int, int]) -> Conditioning:
        device = self.pipe.text_encoder.device
        cond, uncond = self.pipe.encode_prompt(list(prompts), device, 1, guided)
        hidden = torch.cat([uncond, cond]) if guided else cond
        return Conditioning(hidden, None, guided)


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


ADAPTERS = {"sd": SDAdapter, "sdxl": SDXLAdapter, **FLOW_ADAPTERS}


def make_adapter(pipe, family: str, cfg=None):
    """The family's adapter; ``cfg`` (a FinetuneConfig or anything with its option names) gives the options
    adapters take (FLUX's guidance embedding value, T5's sequence length)."""
    if cfg is None:
        return ADAPTERS[family](pipe)
    options = dict(guidance_scale=cfg.guidance_scale, max_sequence_length=getattr(cfg, "max_sequence_length", None))
    if family in FLOW_ADAPTERS and getattr(cfg, "prompt_cache_gib", None) is not None:
        options["prompt_cache_gib"] = cfg.prompt_cache_gib
    return ADAPTERS[family](pipe, **options)


def text_encoders(pipe) -> list:
    return [m for m in (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)) if m is not None]

"""Diffusion models: resolving a model (alias, directory, hub id), loading its pipeline (and a quantized base),
and the pieces every family shares. What differs between families lives in their modules (``families/``):
this module asks the registry and never names a family."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch

from ..errors import OfflineError, UserError
from ..sources import resolve
from . import families
from .adapters import text_encoders  # noqa: F401  (the pipeline's text encoders; imported from here)

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
    known = families.aliases()
    if "/" not in name and not Path(name).expanduser().exists() and name not in known:
        raise UserError(
            f"--model '{name}' is not an alias ({', '.join(known)}), a directory, or a hub id (owner/name)"
        )
    candidates = known[name][1].hub if name in known else (name,)
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
    """The family's name, from ``model_index.json``'s ``_class_name`` (never guessed from the name)."""
    try:
        cls = json.loads((path / "model_index.json").read_text()).get("_class_name", "")
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(
            f"--model: '{path / 'model_index.json'}' is unreadable ({type(exc).__name__}); re-download the model"
        ) from None
    family = families.by_pipeline_class(cls)
    if family is None:
        raise UserError(
            f"--model: '{path}' is a {cls or 'unknown pipeline'}; finetune supports "
            f"{', '.join(families.pipeline_classes())} ({families.supported()})"
        )
    return family.name


def pipeline_class(family: str, path: Path | None = None):
    """The diffusers pipeline class: the directory's own (``model_index.json``'s, one of the family's) when ``path``
    is given and the family has several (FLUX.2: dev and klein), else the family's first."""
    import diffusers

    names = families.by_name(family).pipelines
    name = names[0]
    if path is not None and len(names) > 1:
        name = json.loads((path / "model_index.json").read_text()).get("_class_name", name)
    return getattr(diffusers, name if name in names else names[0])


def load_pipeline(
    name: str,
    dtype: torch.dtype = torch.float32,
    check=None,
    quantize: str = "none",
    text_encoder: str = "none",
    without: tuple[str, ...] = (),
):
    """(pipeline, family): frozen weights in ``dtype`` and the training scheduler built from the model's config.
    ``check(family)`` runs once the family is known, before any weights load (option errors fail fast).
    ``quantize`` 'nf4' or 'int8': the UNet/transformer loaded through bitsandbytes (compute in ``dtype``);
    ``text_encoder`` the same for the family's large text encoder (``Family.cached_encoder``); ``without``:
    components not loaded at all (None in the pipeline), e.g. that encoder when every prompt's embedding is stored."""
    path = resolve_model(name)
    family = model_family(path)
    if check is not None:
        check(family)
    spec = families.by_name(family)
    kw = {**spec.load_kwargs, **dict.fromkeys(without)}
    try:
        if quantize != "none":  # every denoiser: an A14B pair's frozen expert is as large as the trained one
            for part in denoiser_parts(path, spec):
                kw.update(_quantized_component(path, part, quantize, dtype))
        if text_encoder != "none" and spec.cached_encoder and spec.cached_encoder not in without:
            kw.update(_quantized_component(path, spec.cached_encoder, text_encoder, dtype))
        pipe = pipeline_class(family, path).from_pretrained(path, **_dtype_kwarg(dtype), **kw)
    except (OSError, ValueError) as exc:
        raise UserError(
            f"--model '{name}': could not load the pipeline from '{path}' ({str(exc).splitlines()[0][:200]})"
        ) from None
    return prepare_pipeline(pipe)


def pipeline_family(pipe) -> str:
    family = families.by_pipeline_class(type(pipe).__name__)
    if family is None:
        raise UserError(
            f"a {type(pipe).__name__} cannot be fine-tuned; supported: {', '.join(families.pipeline_classes())}"
        )
    return family.name


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

    if families.by_name(pipeline_family(pipe)).flow:
        config = pipe.scheduler.config
        if config.get("use_flow_sigmas", False):  # a multistep solver on flow sigmas (Wan's UniPC): Euler steps
            scheduler = FlowMatchEulerDiscreteScheduler(  # on its shifted sigmas (the family's sampler_options)
                num_train_timesteps=config.get("num_train_timesteps", 1000), shift=config.get("flow_shift", 1.0)
            )
            scheduler.flow_grid = True
            return scheduler
        return FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    return DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False, steps_offset=1, set_alpha_to_one=True)


def prepare_pipeline(pipe):
    """(pipeline, family) for an already built pipeline: the training scheduler, frozen parts, no progress bars."""
    family = pipeline_family(pipe)
    pipe.scheduler = training_scheduler(pipe)
    pipe.set_progress_bar_config(disable=True)
    for part in ("unet", "transformer", "transformer_2", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(pipe, part, None)
        if module is not None:
            module.requires_grad_(False)
            module.eval()
    return pipe, family


def assemble_pipeline(family: str, parts: dict, tokenizer, tokenizer_2=None, tokenizer_3=None):
    """The family's pipeline from built parts (its denoiser, ``vae``, text encoders, ``scheduler``), with the
    settings every rewardtune pipeline has (no safety checker, no watermark; each family's ``assemble``)."""
    return families.by_name(family).assemble(parts, tokenizer, tokenizer_2, tokenizer_3)


def denoiser_parts(path: Path, spec) -> list[str]:
    """The directory's denoisers: the family's (``unet``/``transformer``) and those of its ``lora_parts`` that
    ``model_index.json`` fills (Wan2.2-A14B's ``transformer_2``; Wan 2.1 lists it as ``[null, null]``)."""
    index = json.loads((path / "model_index.json").read_text())
    extra = [p for p in spec.lora_parts if (index.get(p) or [None])[0] is not None]
    return [spec.denoiser, *extra]


def _quantized_component(path: Path, name: str, quantize: str, dtype: torch.dtype) -> dict:
    """{component name: the component loaded in 4-bit NF4 or 8-bit} (bitsandbytes): the denoiser, or a text encoder
    (a transformers model).

    On a GPU the library quantizes while loading (``quantization_config``). diffusers refuses that without a GPU
    ("No GPU found. A GPU is needed for quantization.", 0.42), while bitsandbytes' own layers run on the CPU: there
    the component loads in ``dtype`` and every ``nn.Linear`` is swapped for bitsandbytes' layer, as the libraries'
    quantizers do (they convert every Linear of these models; none keeps fp32), quantized on the CPU."""
    library, cls_name = json.loads((path / "model_index.json").read_text())[name]
    module = importlib.import_module(library)
    model_cls = getattr(module, cls_name)
    if not torch.cuda.is_available():
        model = model_cls.from_pretrained(path, subfolder=name, **_dtype_kwarg(dtype))
        return {name: quantize_linears_on_cpu(model.requires_grad_(False), quantize, dtype)}
    config_cls = module.BitsAndBytesConfig
    if quantize == "nf4":
        config = config_cls(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    else:
        config = config_cls(load_in_8bit=True)
    return {name: model_cls.from_pretrained(path, subfolder=name, quantization_config=config, **_dtype_kwarg(dtype))}


def keeps_full_precision(model: torch.nn.Module, name: str) -> bool:
    """Whether bitsandbytes' quantizers leave ``model``'s Linear ``name`` (its dotted path) unconverted: it lies in one
    of the modules the model keeps in float32 (``_keep_in_fp32_modules``: T5's ``wo``, whose weight dtype its forward
    casts activations to; Wan's ``time_embedder``, whose first weight's dtype its forward casts the timestep
    embedding to). The rule of diffusers' ``replace_with_bnb_linear`` (0.42): the Linear's own name is one, or the
    path runs through one."""
    keep = getattr(model, "_keep_in_fp32_modules", None) or ()
    name = name.strip(".")
    return any(name.rsplit(".", 1)[-1] == key or key + "." in name or key == name for key in keep)


def quantize_linears_on_cpu(model: torch.nn.Module, quantize: str, dtype: torch.dtype) -> torch.nn.Module:
    """``model`` (on the CPU) with every ``nn.Linear`` replaced by bitsandbytes' ``Linear4bit`` (NF4, blocksize 64,
    no double quantization: diffusers' ``BitsAndBytesConfig`` defaults) or ``Linear8bitLt`` (threshold 6.0, no fp16
    copy: the config's defaults), frozen, quantized by bitsandbytes on the CPU; computes in ``dtype``. Layers the
    model keeps in full precision (``keeps_full_precision``) stay as they are, as the libraries' quantizers leave
    them."""
    import bitsandbytes as bnb

    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear or keeps_full_precision(model, f"{parent_name}.{child_name}"):
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


def make_adapter(pipe, family: str, cfg=None, store=None, device=None):
    """The family's adapter; ``cfg`` (a FinetuneConfig or anything with its option names) gives the options
    adapters take (FLUX's guidance embedding value, T5's sequence length, the prompt cache: its size, where the
    large text encoder runs); ``store``: a ``PromptStore`` to read and fill; ``device``: the accelerator when the
    pipeline has no denoiser (encode-prompts)."""
    spec = families.by_name(family)
    if cfg is None:
        return spec.adapter(pipe)
    options = dict(guidance_scale=cfg.guidance_scale, max_sequence_length=getattr(cfg, "max_sequence_length", None))
    if spec.flow:
        if getattr(cfg, "prompt_cache_gib", None) is not None:
            options["prompt_cache_gib"] = cfg.prompt_cache_gib
        options.update(store=store, encoder_device=getattr(cfg, "text_encoder_device", "accelerator"), device=device)
    adapter = spec.adapter(pipe, **options)
    if hasattr(adapter, "configure"):  # options of its own (a video family's frames)
        adapter.configure(cfg)
    return adapter

"""LoRA through peft and diffusers: add adapters, save them in diffusers format, export kohya, load.

Formats are the libraries' own: ``get_peft_model_state_dict`` + ``convert_state_dict_to_diffusers`` +
``save_lora_weights`` (with the adapter config as metadata); the kohya export for ComfyUI, A1111 and
kohya-ss/sd-scripts writes the names their loaders map (``kohya_state``).

The trained scale (alpha / rank) is folded into each ``lora_B`` of the diffusers-format file and its metadata says
alpha = rank: every client then applies the trained update, including those that read no alpha from this file
(ComfyUI and Forge look for ``<module>.alpha`` tensors, which diffusers refuses in a file beside ``lora_A/B`` keys
for SD/SDXL/SD3 and, for FLUX, beside the metadata). Text-encoder keys keep CLIP's ``text_model.`` level, the
names ComfyUI maps (transformers 5 dropped it from ``CLIPTextModel``; diffusers strips it again when loading).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..errors import UserError
from ..nonfinite import check_finite_weights
from ..sources import load_state_dict, save_state_dict, writing
from . import families

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
KOHYA_NAME = "pytorch_lora_weights_kohya.safetensors"
COMFYUI_SUFFIX = "_comfyui"  # --export comfyui: <LoRA file stem>_comfyui.safetensors beside each LoRA file
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def add_lora(model: torch.nn.Module, rank: int, alpha: float, targets: list[str]) -> None:
    """Add a trainable LoRA adapter named 'default' (B = 0, so the model starts unchanged) on ``targets``.

    diffusers models take it through their ``add_adapter``; text encoders through peft directly (the
    transformers wrapper refuses some peft versions), recording ``peft_config`` the same way.
    """
    from diffusers import ModelMixin
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(targets))
    try:
        if isinstance(model, ModelMixin):
            model.add_adapter(config)
        else:
            inject_adapter_in_model(config, model, adapter_name="default")
            model.peft_config = {"default": config}
    except ValueError as exc:
        raise UserError(f"--lora-targets {' '.join(targets)}: {str(exc).splitlines()[0][:200]}") from None


def set_adapters_enabled(enabled: bool, *models) -> None:
    """Switch every LoRA layer of ``models`` on or off (off = the base model)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for model in models:
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                module.enable_adapters(enabled)


def trainable_parameters(*models) -> list[torch.nn.Parameter]:
    return [p for m in models if m is not None for p in m.parameters() if p.requires_grad]


def _metadata(model):
    """The adapter config as the file's metadata, with alpha = rank: the file's ``lora_B`` carry the scale."""
    config = getattr(model, "peft_config", {}).get("default")
    if config is None:
        return None
    return {**config.to_dict(), "lora_alpha": float(config.r), "alpha_pattern": {}}


def _baked(model, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (peft keys) with the adapter's scale alpha / rank folded into every ``lora_B`` weight."""
    config = getattr(model, "peft_config", {}).get("default")
    scale = 1.0 if config is None else config.lora_alpha / config.r
    if scale == 1.0:
        return state
    return {k: v * scale if ".lora_B." in k else v for k, v in state.items()}


def _with_text_model(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Text-encoder keys under CLIP's ``text_model.`` level (transformers 4's names, the ones ComfyUI maps)."""
    return {k if k.startswith("text_model.") else "text_model." + k: v for k, v in state.items()}


def file_scales(path: str | Path) -> dict[str, float]:
    """Per component (``unet``, ``transformer``, ``text_encoder``...), the scale alpha / rank a diffusers-format LoRA
    file's metadata asks for: 1.0 for rewardtune's files since the scale is in ``lora_B``, alpha / rank for files
    written before; components without metadata get diffusers' default, 1.0."""
    with safe_open(str(path), "pt") as f:
        meta = json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}"))
    out = {}
    for key, alpha in meta.items():
        component, _, field = key.partition(".")
        if field == "lora_alpha" and meta.get(f"{component}.r"):
            out[component] = float(alpha) / float(meta[f"{component}.r"])
    return out


def denoiser_name(model) -> str:
    """'unet' or 'transformer': the denoiser's component name, the prefix of its keys in a LoRA file."""
    from diffusers import UNet2DConditionModel

    return "unet" if isinstance(model, UNet2DConditionModel) else "transformer"


def weight_name(component: str, main: str) -> str:
    """The LoRA file of a trained denoiser ``component``, relative to the output directory: the family's ``main``
    one's is ``pytorch_lora_weights.safetensors`` (what ``pipe.load_lora_weights(directory)`` reads), another's (a
    second expert, which its pipeline's loader takes from a file of its own) ``<component>/pytorch_lora_weights.
    safetensors``. A subdirectory, not a second name beside the first: given a directory, diffusers'
    ``load_lora_weights`` loads its only ``.safetensors`` file whatever its name (``_best_guess_weight_name``), so a
    lone ``pytorch_lora_weights_transformer_2.safetensors`` would go into ``transformer`` without a word; a
    directory with no LoRA file of its own makes that call fail."""
    return WEIGHT_NAME if component == main else f"{component}/{WEIGHT_NAME}"


def save_lora(
    directory: str | Path,
    pipe_cls,
    unet,
    text_encoders_: list | tuple = (),
    states: list | None = None,
    weight_name: str = WEIGHT_NAME,
) -> Path:
    """Write ``directory/<weight_name>`` (by default pytorch_lora_weights.safetensors, which
    ``pipe.load_lora_weights(directory)`` loads), the scale alpha / rank folded into ``lora_B`` and text-encoder keys
    under ``text_model.`` (module docstring).

    ``unet``: the denoiser (a UNet, or the SD3/FLUX transformer, whose peft keys the loaders take as they are).
    ``states``: full state dicts of [unet, *text_encoders_] gathered across processes (optional).
    The file is written next to the target and renamed into place (atomic).
    """
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    directory = Path(directory)
    states = states or [None] * (1 + len(text_encoders_))
    name = denoiser_name(unet)
    layers = _baked(unet, get_peft_model_state_dict(unet, state_dict=states[0]))
    if name == "unet":
        layers = convert_state_dict_to_diffusers(layers)
    kw = {f"{name}_lora_layers": layers, f"{name}_lora_adapter_metadata": _metadata(unet)}
    for name, te, sd in zip(["text_encoder", "text_encoder_2"], text_encoders_, states[1:]):
        kw[f"{name}_lora_layers"] = _with_text_model(_baked(te, get_peft_model_state_dict(te, state_dict=sd)))
        kw[f"{name}_lora_adapter_metadata"] = _metadata(te)
    layers = {
        f"{k[: -len('_lora_layers')]}.{n}": t
        for k, v in kw.items()
        if k.endswith("_lora_layers")
        for n, t in v.items()
    }
    check_finite_weights(layers, f"the LoRA for '{directory / weight_name}'")
    target = directory / weight_name
    with writing(target, "the LoRA"):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".lora-", dir=target.parent))
        try:
            pipe_cls.save_lora_weights(tmp, weight_name=target.name, **kw)
            os.replace(tmp / target.name, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def export_comfyui(path: str | Path, family: str) -> Path:
    """Write the diffusers LoRA file ``path`` in the names of ComfyUI's own model (``Family.comfyui_name``): each
    ``<denoiser>.<module>.lora_A/B.weight`` as ``diffusion_model.<ComfyUI module>.lora_A/B.weight``, the form ComfyUI's
    generic key map takes for every weight of its model (comfy/lora.py, ``model_lora_keys_unet``). The scale is folded
    into lora_B (``save_lora``) and no ``.alpha`` tensor is written, so ComfyUI's scale 1.0 applies the trained update.
    Written beside ``path`` as ``<stem>_comfyui.safetensors``, atomically; returns its path."""
    rename = families.by_name(family).comfyui_name
    if rename is None:
        raise ValueError(f"the ComfyUI export has no names for family {family!r}")
    path = Path(path)
    out = path.with_name(f"{path.stem}{COMFYUI_SUFFIX}{path.suffix}")
    state = {}
    for key, tensor in load_file(str(path)).items():
        module, leaf = key.split(".", 1)[1].rsplit(".lora_", 1)
        name = rename(module)
        if name is None:
            raise UserError(
                f"--export comfyui ('{path}'): ComfyUI's {family} model has no module for '{module}'; train the "
                f"default --lora-targets, or load the diffusers file"
            )
        state[f"diffusion_model.{name}.lora_{leaf}"] = tensor
    save_state_dict(state, out, "the ComfyUI LoRA")
    return out


# Kohya names, as ComfyUI (comfy/lora.py), kohya-ss/sd-scripts (networks/lora.py) and A1111
# (extensions-builtin/Lora/networks.py) map them (tests/test_lora_export.py holds each loader's rule):
# ``<prefix>_<module path with "_" for ".">`` + ``.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``.
# One text encoder (SD 1.x/2.x) is ``lora_te``, SDXL's two ``lora_te1`` / ``lora_te2``; a text encoder's
# path starts at ``text_model.`` as in transformers 4's CLIPTextModel (transformers 5 dropped that level
# from CLIPTextModel but not from CLIPTextModelWithProjection, so it is put back where missing).
_KOHYA_TE_PREFIX = {1: {"text_encoder": "lora_te"}, 2: {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}}
_KOHYA_WEIGHT = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}
_KOHYA_TE_MODULE = re.compile(
    r"text_model\.encoder\.layers\.\d+\.(self_attn\.[qkv]_proj|self_attn\.out_proj|mlp\.fc[12])"
)


def kohya_state(
    state: dict[str, torch.Tensor], alpha: float, text_encoders: int | None = None, what: str = "LoRA"
) -> dict[str, torch.Tensor]:
    """``state`` (peft keys: ``unet.`` / ``text_encoder.`` / ``text_encoder_2.`` + module + ``.lora_A/B.weight``)
    in kohya names with one ``.alpha`` per module. ``text_encoders``: how many the model has (1: SD 1.x/2.x,
    2: SDXL); None: 2 if the state holds ``text_encoder_2`` keys, else 1."""
    if text_encoders is None:
        text_encoders = 2 if any(k.startswith("text_encoder_2.") for k in state) else 1
    prefixes = {"unet": "lora_unet", **_KOHYA_TE_PREFIX[text_encoders]}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        part, _, rest = key.partition(".")
        module, _, weight = rest.partition(".lora_")
        weight = "lora_" + weight
        if part not in prefixes or weight not in _KOHYA_WEIGHT:
            raise UserError(
                f"{what}: key '{key}' has no kohya name (the kohya export covers LoRA on SD 1.x/2.x and SDXL: "
                f"{', '.join(f'{p}.*' for p in prefixes)} with lora_A/lora_B weights)"
            )
        if part != "unet":
            module = module if module.startswith("text_model.") else "text_model." + module
            if not _KOHYA_TE_MODULE.fullmatch(module):
                raise UserError(
                    f"{what}: text encoder module '{module}' (key '{key}') is not one the kohya loaders map "
                    f"(encoder layers' self_attn q/k/v/out_proj and mlp fc1/fc2)"
                )
        name = f"{prefixes[part]}_{module.replace('.', '_')}"
        out[f"{name}.{_KOHYA_WEIGHT[weight]}"] = tensor
        out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def export_kohya(directory: str | Path, alpha: float, family: str | None = None) -> Path:
    """Write the saved diffusers LoRA with kohya names (see ``kohya_state``) for ComfyUI, A1111 and kohya-ss/sd-scripts.

    ``alpha`` is the trained one (the scale is alpha/rank); ``family`` (one with ``Family.kohya_text_encoders``: SD,
    SDXL) says how many text encoders the model has; without it, a file with ``text_encoder_2`` keys is SDXL's.
    """
    from diffusers.utils.state_dict_utils import convert_all_state_dict_to_peft

    count = None if family is None else families.by_name(family).kohya_text_encoders
    if family is not None and count is None:
        raise ValueError(f"the kohya export has no layout for family {family!r}")
    directory = Path(directory)
    src = directory / WEIGHT_NAME
    what = f"--export kohya ('{src}')"
    state = load_file(str(src))
    other = sorted({k.split(".")[0] for k in state} - {"unet", "text_encoder", "text_encoder_2"})
    if other:
        raise UserError(
            f"{what}: the kohya export covers LoRA on SD 1.x/2.x and SDXL (unet, text_encoder, "
            f"text_encoder_2); this file also has '{other[0]}' weights"
        )
    state = convert_all_state_dict_to_peft(state)  # diffusers' own lora.down/up keys to lora_A/B
    # kohya files carry the trained alpha, so lora_B goes back to the trained one: B = B_file * file scale / (alpha / r)
    scales = file_scales(src)
    state = {
        k: v * scales.get(k.split(".")[0], 1.0) / (alpha / v.shape[1]) if ".lora_B." in k else v
        for k, v in state.items()
    }
    save_state_dict(kohya_state(state, alpha, count, what), directory / KOHYA_NAME, "the kohya LoRA")
    return directory / KOHYA_NAME


def check_lora_dir(path: str | Path, what: str = "LoRA", weight_name: str = WEIGHT_NAME) -> Path:
    """The LoRA file in ``path`` (a directory holding ``weight_name``, or the file itself)."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / weight_name
    if not p.is_file():
        raise UserError(
            f"{what}: '{path}' is not a LoRA; expected a directory holding {weight_name} (as written by rewardtune finetune)"
        )

    try:
        with safe_open(str(p), "pt") as f:
            keys = list(f.keys())
    except Exception as exc:
        raise UserError(
            f"{what}: '{p}' is not a readable safetensors file ({type(exc).__name__}); re-export it"
        ) from None
    if not any("lora" in k for k in keys):
        raise UserError(
            f"{what}: '{p}' holds no LoRA weights (no 'lora' keys among {len(keys)}); pass a LoRA directory"
        )
    return p


class _CaptureWarnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def load_lora(pipe, path: str | Path, what: str = "LoRA") -> str:
    """``pipe.load_lora_weights`` on a checked LoRA (diffusers or kohya format); returns the adapter name.

    Every weight in the file must land in the model: diffusers drops keys that match no module
    without a word, so the loaded tensors are counted, and a warning about keys is an error too.
    """
    from peft.utils import get_peft_model_state_dict

    p = check_lora_dir(path, what)
    with safe_open(str(p), "pt") as f:
        expected = sum(1 for k in f.keys() if not k.endswith(".alpha"))
    before = {n for names in pipe.get_list_adapters().values() for n in names}
    handler = _CaptureWarnings()
    loggers = [logging.getLogger(n) for n in ("diffusers", "peft")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        pipe.load_lora_weights(str(p.parent), weight_name=p.name)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise UserError(f"{what}: '{p}' does not fit this model ({str(exc).splitlines()[0][:200]})") from None
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
    bad = [m for m in handler.messages if "unexpected keys" in m or "missing keys" in m]
    if bad:
        raise UserError(f"{what}: '{p}' does not fit this model: {bad[0][:200]}")
    new = {n for names in pipe.get_list_adapters().values() for n in names} - before
    name = new.pop() if len(new) == 1 else None
    loaded = sum(
        len(get_peft_model_state_dict(getattr(pipe, c), adapter_name=name))
        for c, names in pipe.get_list_adapters().items()
        if name in names
    )
    if name is None or loaded != expected:
        raise UserError(
            f"{what}: only {loaded} of the {expected} tensors in '{p}' match this model's modules; "
            f"was it trained for another model (SD 1.x vs 2.x vs SDXL vs SD3 vs FLUX)?"
        )
    return name


def load_into_adapters(
    path: str | Path, unet, text_encoders_: list | tuple = (), what: str = "LoRA", weight_name: str = WEIGHT_NAME
) -> None:
    """Load a diffusers-format LoRA file into the existing trainable adapters (same targets and rank), as the update
    the file applies (its metadata's alpha / rank, folded into ``lora_B`` by ``save_lora``) at the adapters' alpha.

    Used by ``--init-lora`` and ``--resume``; keys for parts without an adapter are an error. Every part is
    checked before any is loaded.
    """
    from peft.utils import set_peft_model_state_dict

    for model, sub in adapters_fit(path, unet, text_encoders_, what, weight_name):
        set_peft_model_state_dict(model, sub)


def adapters_fit(
    path: str | Path, unet, text_encoders_: list | tuple = (), what: str = "LoRA", weight_name: str = WEIGHT_NAME
) -> list:
    """(model, its part of the LoRA file in peft's names, at the adapter's alpha) for each part with weights in the
    file, once every key has an adapter of its shape (a floating-point tensor); else a one-line ``UserError``.
    Loads nothing."""
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    file = check_lora_dir(path, what, weight_name)
    state = load_state_dict(file, what)
    scales = file_scales(file)
    parts = {denoiser_name(unet): unet, **{n: te for n, te in zip(["text_encoder", "text_encoder_2"], text_encoders_)}}
    used, fits = 0, []
    for prefix, model in parts.items():
        sub = {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}
        if not sub:
            continue
        if prefix == "unet":
            sub = convert_unet_state_dict_to_peft(sub)
        if not hasattr(model, "text_model"):  # a flattened CLIPTextModel (transformers 5), or the denoiser
            sub = {k.removeprefix("text_model."): v for k, v in sub.items()}
        config = getattr(model, "peft_config", {}).get("default")
        own = config.lora_alpha / config.r if config is not None else 1.0
        if scales.get(prefix, 1.0) != own:  # the file's update at this adapter's alpha: B_file * file scale / own
            sub = {k: v * scales.get(prefix, 1.0) / own if ".lora_B." in k else v for k, v in sub.items()}
        own = {k.replace(".default", ""): v.shape for k, v in model.state_dict().items() if "lora_" in k}
        unknown = [k for k in sub if k not in own]
        if unknown:
            raise UserError(
                f"{what}: '{path}' has {len(unknown)} {prefix} keys this model's adapter lacks (e.g. {unknown[0]}); "
                f"use the same --lora-targets and --train-text-encoder it was trained with"
            )
        wrong = [k for k, v in sub.items() if tuple(v.shape) != tuple(own[k])]
        if wrong:
            k = wrong[0]
            raise UserError(
                f"{what}: '{path}' tensor {prefix}.{k} has shape {tuple(sub[k].shape)}, the adapter "
                f"{tuple(own[k])}; use the same --lora-rank it was trained with"
            )
        integral = [k for k, v in sub.items() if not v.is_floating_point()]
        if integral:
            raise UserError(f"{what}: '{path}' tensor {prefix}.{integral[0]} has dtype {sub[integral[0]].dtype}")
        fits.append((model, sub))
        used += len(sub)
    if used != len(state):
        missing = [k for k in state if not any(k.startswith(p + ".") for p in parts)]
        raise UserError(
            f"{what}: '{path}' has weights for parts that are not trained here (e.g. {missing[0] if missing else '?'}); "
            f"add --train-text-encoder if it was trained with it"
        )
    return fits

"""``rewardtune encode-prompts``: fill a ``--prompt-embeddings`` directory ahead of training.

Only the text encoders load (the denoiser and the VAE do not), on the accelerator or the CPU
(``--text-encoder-device``), optionally quantized (``--quantize-text-encoder``). A later ``finetune`` with the
same prompts, model and encoder settings then never loads its large text encoder.
"""

from __future__ import annotations

import json

import torch

from ..config import precision_dtype
from ..errors import UserError
from . import families
from .config import SHARED_WITH_ENCODE, EncodePromptsConfig, FinetuneConfig
from .defaults import check_family_options, resolve_defaults
from .models import load_pipeline, make_adapter, model_family, resolve_model
from .prompt_store import store_for
from .prompts import load_prompts


def encode_prompts(cfg: EncodePromptsConfig) -> dict:
    """Encode every prompt of ``cfg.prompts`` (and the held-out ones, and the empty prompt guidance uses) that the
    directory does not hold yet; returns counts and where they are."""
    cfg.validate()
    ft = FinetuneConfig(
        **{k: getattr(cfg, k) for k in SHARED_WITH_ENCODE}, output=cfg.output, prompt_embeddings=cfg.output
    ).validate()
    prompts = load_prompts(ft.prompts)
    held_out = load_prompts(ft.eval_prompts, "--eval-prompts")[: ft.eval_size] if ft.eval_prompts else []
    every = list(dict.fromkeys([*prompts, *held_out, ""]))
    path = resolve_model(ft.model)
    spec = families.by_name(model_family(path))
    if spec.cached_encoder is None:
        raise UserError(
            f"encode-prompts: {spec.label} models encode prompts with CLIP beside the denoiser at every step; "
            f"there is nothing to store (it is for the flow models' large text encoders)"
        )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = precision_dtype(ft.mixed_precision)
    store = store_for(ft, path, spec, dtype)
    missing = store.missing(every)
    result = {"prompts": len(every), "encoded": len(missing), "directory": str(store.dir)}
    if not missing:
        return result
    pipe, family = load_pipeline(
        ft.model,
        dtype,
        check=lambda family: check_family_options(ft, family),
        text_encoder=ft.quantize_text_encoder,
        without=(spec.denoiser, "vae"),
    )
    resolve_defaults(ft, pipe, family, json.loads((path / spec.denoiser / "config.json").read_text()))
    adapter = make_adapter(pipe, family, ft, store=store, device=device)
    for te in adapter.text_encoders():  # the CLIP encoders are not stored, only the large one
        te.requires_grad_(False)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        adapter.cache_prompts(missing)
    return result

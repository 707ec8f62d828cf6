"""Baseline rewards from public releases: CLIP, PickScore, HPS v2 / v2.1 and the LAION aesthetic predictor.

Each builder is ``BUILDERS[name](source=None, dtype=None, sources=None, get=None)``: ``source`` is the
reward's own local directory, file or hub id (default: ``REWARD_SOURCES[name].hub``), ``sources`` the other
sources of the same call (PickScore reads ``backbone``, the aesthetic head reads ``clip``) and ``get``
the loader's ``get(name)`` so the aesthetic head shares the ``clip`` reward's CLIP when both are loaded.
"""

from __future__ import annotations

import functools
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from ..prompt_checks import OpenClipLimit
from ..sources import REWARD_SOURCES, apply_state_dict, find_file, load_state_dict, resolve
from .base import Reward
from .clip_tower import (
    TOKENIZER_FILES,
    WEIGHT_FILES,
    ClipPreprocess,
    ClipTower,
    CosineReward,
    normalize,
)
from .imagereward import build_imagereward
from .tower_head import TowerHeadReward

HF_META = ["*.json", "*.txt"]
# The weights files of each HPS version in xswu/HPSv2 (hpsv2's utils.hps_version_map names the compressed ones).
HPS_FILES = {"2.1": ["HPS_v2.1_compressed.pt", "HPS_v2.1.pt"], "2.0": ["HPS_v2_compressed.pt", "HPS_v2.pt"]}
OPEN_CLIP_CONFIG = "open_clip_config.json"
HPS_DEFAULT_ARCH = "ViT-H-14"
AESTHETIC_FILES = ["sac+logos+ava1-l14-linearMSE.safetensors", "sac+logos+ava1-l14-linearMSE.pth"]


# ---------------------------------------------------------------- rewards


class ClipReward(CosineReward):
    """CLIP score as the plain cosine of the L2-normalised text and image embeddings, in [-1, 1]
    (not the 100x logit, nor CLIPScore's 2.5 * max(cos, 0))."""

    name = "clip"


class PickScoreReward(ClipReward):
    """PickScore (Kirstain et al. 2023): ``logit_scale.exp() * cosine`` of its fine-tuned CLIP-H, as its
    model card computes it (about 100x the cosine, typically ~20)."""

    name = "pickscore"

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        self.check_inputs(images, prompts)
        return self.tower.model.logit_scale.exp().float() * self.cosines(images, prompts)


class HPSv2Reward(Reward):
    """HPS v2.0 / v2.1 (Wu et al. 2023): cosine of the normalised open_clip image and text features, which
    is what ``hpsv2.score`` reports (the diagonal of ``image_features @ text_features.T``)."""

    def __init__(self, model: nn.Module, tokenizer, preprocess: ClipPreprocess, version: str = "2.1", weights=""):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.limit = OpenClipLimit(tokenizer)
        self.version, self.weights = version, str(weights)
        self.name = f"hpsv{version}"

    def provenance(self) -> dict:
        return {self.name: {"version": self.version, "weights": self.weights}}

    def text_limits(self) -> list:
        return [self.limit]

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        self.check_inputs(images, prompts)
        param = next(self.model.parameters())
        pixels = self.preprocess(images.to(param.device)).to(param.dtype)
        image = self.model.encode_image(pixels).float()
        text = self.model.encode_text(self.tokenizer(list(prompts)).to(param.device)).float()
        return (normalize(image) * normalize(text)).sum(-1)


class AestheticReward(TowerHeadReward):
    """LAION improved aesthetic predictor: a linear MLP on the L2-normalised CLIP ViT-L/14 image embedding,
    predicting a 1-10 rating (no activation). The head is the same MLP as HP's (768 -> 1024 -> 128 -> 64 -> 16 -> 1)."""

    name = "aesthetic"
    normalize_embedding = True


# ---------------------------------------------------------------- loading helpers


def _hf_dir(source, what: str) -> Path:
    """An HF model directory; from the hub, safetensors weights are fetched, ``.bin`` only when there are none."""
    directory = resolve(source, what, allow_patterns=HF_META + ["*.safetensors"])
    if directory.is_dir() and not any((directory / n).is_file() for n in WEIGHT_FILES):
        directory = resolve(source, what, allow_patterns=HF_META + ["*.bin"])
    return directory


def _has_tokenizer(directory: Path) -> bool:
    return directory.is_dir() and any((directory / n).is_file() for n in TOKENIZER_FILES)


def _clip_tower(source, dtype) -> ClipTower:
    return ClipTower.from_dir(_hf_dir(source or REWARD_SOURCES["clip"].hub, "CLIP model"), "CLIP model", dtype)


# ---------------------------------------------------------------- builders


def build_clip(source=None, dtype=None, sources=None, get=None) -> ClipReward:
    """An HF CLIP directory or hub id (default: ``REWARD_SOURCES["clip"].hub``, OpenAI's ViT-L/14)."""
    return ClipReward(_clip_tower(source, dtype))


def build_pickscore(source=None, dtype=None, sources=None, get=None) -> PickScoreReward:
    """PickScore's CLIPModel; its tokenizer from the model directory if it holds one, else from ``backbone``
    or the processor it was trained with (the table's ``tokenizer_hub``, tokenizer files only)."""
    entry = REWARD_SOURCES["pickscore"]
    model_dir = _hf_dir(source or entry.hub, "PickScore model")
    if _has_tokenizer(model_dir):
        return PickScoreReward(ClipTower.from_dir(model_dir, "PickScore model", dtype))
    backbone = (sources or {}).get("backbone")
    proc_dir = resolve(backbone or entry.tokenizer_hub, "PickScore processor", allow_patterns=HF_META)
    return PickScoreReward(
        ClipTower.from_dir(
            model_dir,
            "PickScore model",
            dtype,
            tokenizer_dir=proc_dir,
            tokenizer_what=f"PickScore processor (no tokenizer in '{model_dir}')",
        )
    )


def _hps_checkpoint(source, version: str) -> Path:
    """The HPS ``version`` weights file: ``source`` itself when it is a file (refused when its name is the other
    version's), else the version's file in the directory or hub repo."""
    what = f"HPS v{version} checkpoint"
    files = HPS_FILES[version]
    path = resolve(source or REWARD_SOURCES["hpsv2"].hub, what, allow_patterns=[files[0], OPEN_CLIP_CONFIG])
    if not path.is_file():
        return find_file(path, files, what)
    other = next((v for v, names in HPS_FILES.items() if v != version and path.name in names), None)
    if other is not None:
        raise UserError(
            f"{what}: '{path}' is HPS v{other}'s file; pass --reward hpsv{other} to use it, or give v{version}'s "
            f"({' or '.join(files)})"
        )
    return path


def _open_clip_model(config_dir: Path):
    """The architecture from ``open_clip_config.json`` (hub layout: ``model_cfg``, ``preprocess_cfg``) in
    ``config_dir`` if there is one, else ViT-H-14; never downloads weights. Returns (model, tokenizer)."""
    import open_clip

    has_config = (config_dir / OPEN_CLIP_CONFIG).is_file()
    name = f"local-dir:{config_dir}" if has_config else HPS_DEFAULT_ARCH
    logging.disable(logging.WARNING)  # open_clip warns "initialized randomly": our checkpoint comes next
    try:
        if has_config:
            model = open_clip.create_model(name, load_weights=False)
        else:
            model = open_clip.create_model(name, pretrained=None)
        tokenizer = open_clip.get_tokenizer(name)
    except Exception as exc:
        where = config_dir / OPEN_CLIP_CONFIG if has_config else HPS_DEFAULT_ARCH
        raise UserError(
            f"HPS v2 architecture: could not build the open_clip model from {where} "
            f"({type(exc).__name__}: {str(exc)[:200]})"
        ) from None
    finally:
        logging.disable(logging.NOTSET)
    return model.eval(), tokenizer


def _open_clip_preprocess(model) -> ClipPreprocess:
    import open_clip

    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg.get("size", 224)
    size = size[0] if isinstance(size, (tuple, list)) else size
    return ClipPreprocess(size, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]))


def build_hpsv2(source=None, dtype=None, sources=None, get=None, version: str = "2.1") -> HPSv2Reward:
    """HPS v``version`` weights over open_clip ViT-H-14: a ``.pt`` holding ``{'state_dict': ...}`` or a
    directory with the version's file; an ``open_clip_config.json`` beside it picks another architecture."""
    ckpt = _hps_checkpoint(source, version)
    state = load_state_dict(ckpt, f"HPS v{version} checkpoint")
    model, tokenizer = _open_clip_model(ckpt.parent)
    loaded = apply_state_dict(model, state, f"HPS v2 checkpoint '{ckpt}'")
    total = len(model.state_dict())
    if loaded < total:
        warnings.warn(
            f"HPS v2 checkpoint '{ckpt}' sets only {loaded} of the model's {total} tensors; "
            f"the rest keep their random init",
            stacklevel=2,
        )
    if dtype is not None:
        model.to(dtype)
    return HPSv2Reward(model, tokenizer, _open_clip_preprocess(model), version, ckpt.resolve())


def _aesthetic_head_file(source) -> Path:
    path = resolve(source or REWARD_SOURCES["aesthetic"].hub, "aesthetic predictor", allow_patterns=AESTHETIC_FILES)
    return path if path.is_file() else find_file(path, AESTHETIC_FILES, "aesthetic predictor")


def build_aesthetic(source=None, dtype=None, sources=None, get=None) -> AestheticReward:
    """The head file (or a directory holding it) over the ``clip`` reward's CLIP (shared when ``get`` is given)."""
    head_file = _aesthetic_head_file(source)
    state = load_state_dict(head_file, "aesthetic predictor")
    tower = get("clip").tower if get is not None else _clip_tower((sources or {}).get("clip"), dtype)
    return AestheticReward.from_head_state(tower, state, f"aesthetic predictor '{head_file}'")


BUILDERS = {
    "clip": build_clip,
    "pickscore": build_pickscore,
    "hpsv2.0": functools.partial(build_hpsv2, version="2.0"),
    "hpsv2.1": functools.partial(build_hpsv2, version="2.1"),
    "aesthetic": build_aesthetic,
    "imagereward": build_imagereward,
}

"""What each stage trains, which layers it freezes, and how the result is written to disk.

Output layouts (read back by ``rewardtune.rewards.icthp``):
- ICT: ``<out>/`` is a full HF CLIP directory (``model.safetensors``, ``config.json``, tokenizer files,
  ``preprocessor_config.json``); with ``export_official`` also ``<out>/pytorch_model.bin``.
- HP: ``<out>/hp_backbone/`` likewise and ``<out>/hp_scorer/mlp_pytorch_model.safetensors`` (``HPHead``);
  with ``export_official`` also ``hp_backbone/pytorch_model.bin`` and ``hp_scorer/mlp_pytorch_model.bin``.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from ..nonfinite import check_finite_weights
from ..rewards.clip_tower import ClipTower, embedding, normalize
from ..rewards.icthp import HPHead, ICTReward
from ..sources import resolve, reward_model_dir, save_state_dict, writing

# Files of an HF CLIP directory besides the weights: tokenizer and image preprocessor.
SIDECAR_FILES = [
    "vocab.json",
    "merges.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "preprocessor_config.json",
]


class ICTTrainee(nn.Module):
    """The CLIP being fine-tuned as ICT: normalised text and image embeddings."""

    def __init__(self, clip):
        super().__init__()
        self.clip = clip

    def forward(self, input_ids, attention_mask, pixel_values):
        text = embedding(self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask))
        image = embedding(self.clip.get_image_features(pixel_values=pixel_values))
        return normalize(text.float()), normalize(image.float())


class HPTrainee(nn.Module):
    """The partly unfrozen HP CLIP and its head: raw HP scores (before the sigmoid)."""

    def __init__(self, clip, head: HPHead):
        super().__init__()
        self.clip = clip
        self.head = head

    def forward(self, pixel_values):
        features = embedding(self.clip.get_image_features(pixel_values=pixel_values))
        return self.head(features).squeeze(-1).float()


def tokenize(tower: ClipTower, prompts: list[str]) -> dict[str, torch.Tensor]:
    """``tower.tokenize`` padded to the longest prompt instead of 77 tokens: CLIP's causal text model pools
    at the end token, so the embeddings are the same, for a fraction of the compute on short prompts."""
    limit = min(
        int(getattr(tower.tokenizer, "model_max_length", 77) or 77),
        tower.model.config.text_config.max_position_embeddings,
    )
    tok = tower.tokenizer(list(prompts), padding="longest", truncation=True, max_length=limit, return_tensors="pt")
    return {"input_ids": tok["input_ids"].to(tower.device), "attention_mask": tok["attention_mask"].to(tower.device)}


def _tower_parts(clip, which: str):
    """(embedding-side modules, layers bottom-up including the final norm) of one CLIP tower."""
    if which == "text":
        t = clip.text_model
        return [t.embeddings], list(t.encoder.layers) + [t.final_layer_norm]
    v = clip.vision_model
    return [v.embeddings, v.pre_layrnorm], list(v.encoder.layers) + [v.post_layernorm]


def freeze_bottom(clip, which: str, ratio: float, embeddings: bool = False) -> int:
    """Freeze the first ``int(ratio * (layers + 1))`` of a tower's layers and final norm, counted as the
    released code counts them; with ``embeddings``, also the embeddings below them (the released code
    leaves those trainable, so backward still runs through the frozen layers). Returns the layers frozen."""
    embeds, layers = _tower_parts(clip, which)
    n = int(len(layers) * ratio)
    for module in (embeds if n and embeddings else []) + layers[:n]:
        module.requires_grad_(False)
    return n


def setup_ict(clip, freeze_ratio: float, freeze_embeddings: bool = False) -> ICTTrainee:
    """ICT: the whole CLIP trains, except the bottom ``freeze_ratio`` of each tower and the unused logit scale."""
    clip.requires_grad_(True)
    clip.logit_scale.requires_grad_(False)
    freeze_bottom(clip, "text", freeze_ratio, freeze_embeddings)
    freeze_bottom(clip, "vision", freeze_ratio, freeze_embeddings)
    return ICTTrainee(clip)


def setup_hp(clip, freeze_ratio: float, freeze_embeddings: bool = False) -> HPTrainee:
    """HP: text tower and both projections frozen, the bottom ``freeze_ratio`` of the vision layers frozen,
    a fresh head (initialised as released) on the projected image embedding."""
    clip.requires_grad_(False)
    clip.vision_model.requires_grad_(True)
    freeze_bottom(clip, "vision", freeze_ratio, freeze_embeddings)
    head = HPHead(input_dim=clip.config.projection_dim)
    return HPTrainee(clip, head)


def enable_checkpointing(clip) -> None:
    """Recompute activations in backward (non-reentrant, so frozen bottom layers are fine)."""
    if hasattr(clip, "activation_checkpointing_enable"):
        clip.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:  # transformers 4.x
        clip.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def load_backbone(source: str) -> tuple[ClipTower, Path]:
    """The CLIP to train, and the directory its tokenizer and preprocessor files come from."""
    directory = resolve(source, "CLIP backbone")
    tower = ClipTower.from_dir(directory, "CLIP backbone")
    tower.model.train()
    return tower, directory


def ict_model_dir(ict: str) -> Path:
    """The directory of the ICT model ``--ict`` names (a run directory's ``best/`` when it kept one)."""
    ict_dir = resolve(ict, "ICT model (--ict)")
    return reward_model_dir(ict_dir, "ICT model (--ict)") if ict_dir.is_dir() else ict_dir


def load_frozen_ict(ict: str, backbone: str) -> ICTReward:
    """The ICT model the HP stage ranks with: our full-CLIP output as is, a released layout over ``backbone``."""
    ict_dir = ict_model_dir(ict)
    full = ict_dir.is_dir() and (ict_dir / "config.json").is_file() and (ict_dir / "vocab.json").is_file()
    reward = ICTReward.load(ict=str(ict_dir), backbone=None if full else backbone)
    reward.requires_grad_(False)
    return reward.eval()


def cpu_preprocess(tower: ClipTower) -> nn.Module:
    """A CPU copy of the tower's torch preprocessing, for data loader workers."""
    return copy.deepcopy(tower.preprocess).cpu()


def same_preprocess(a: nn.Module, b: nn.Module) -> bool:
    return a.size == b.size and torch.equal(a.mean.cpu(), b.mean.cpu()) and torch.equal(a.std.cpu(), b.std.cpu())


def split_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under ``prefix.`` with the prefix removed, on the CPU."""
    n = len(prefix) + 1
    return {k[n:]: v.detach().cpu().contiguous() for k, v in state.items() if k.startswith(prefix + ".")}


def write_clip_dir(clip, state: dict[str, torch.Tensor], source_dir: Path, directory: Path, official: bool) -> None:
    """A full HF CLIP directory: weights (safetensors), config, and the backbone's tokenizer/preprocessor."""
    directory.mkdir(parents=True, exist_ok=True)
    clip.save_pretrained(directory, state_dict=state)
    for name in SIDECAR_FILES:
        if (source_dir / name).is_file():
            shutil.copyfile(source_dir / name, directory / name)
    if official:
        _torch_save(state, directory / "pytorch_model.bin")


def _torch_save(obj, path: Path) -> None:
    """``torch.save`` through an open file, so a failed write keeps its OSError (a path gives a bare RuntimeError)."""
    with open(path, "wb") as f:
        torch.save(obj, f)


def write_ict(clip, state, source_dir: Path, out: Path, official: bool) -> None:
    """The ICT model (a full CLIP directory) in ``out``: staged in ``out/.staging``, then moved into place."""
    check_finite_weights(state, f"the ICT model for '{out}'")
    staging = out / ".staging"
    with writing(out, "the ICT model", cleanup=staging):
        shutil.rmtree(staging, ignore_errors=True)
        write_clip_dir(clip, split_state(state, "clip"), source_dir, staging, official)
        publish(staging, out)


def write_hp(clip, state, source_dir: Path, out: Path, official: bool) -> None:
    """The HP model (``hp_backbone/``, ``hp_scorer/``) in ``out``: staged in ``out/.staging``, then moved."""
    check_finite_weights(state, f"the HP model for '{out}'")
    staging = out / ".staging"
    with writing(out, "the HP model", cleanup=staging):
        shutil.rmtree(staging, ignore_errors=True)
        write_clip_dir(clip, split_state(state, "clip"), source_dir, staging / "hp_backbone", official)
        head = split_state(state, "head")
        save_state_dict(head, staging / "hp_scorer" / "mlp_pytorch_model.safetensors", "the HP head")
        if official:
            _torch_save(head, staging / "hp_scorer" / "mlp_pytorch_model.bin")
        publish(staging, out)


def publish(staging: Path, out: Path) -> None:
    """Move every file of ``staging`` to the same place under ``out`` (each move atomic), then drop ``staging``."""
    for path in sorted(p for p in staging.rglob("*") if p.is_file()):
        target = out / path.relative_to(staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
    shutil.rmtree(staging, ignore_errors=True)

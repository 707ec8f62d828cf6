"""Where models come from: aliases, local directories, hub ids; safe checkpoint loading.

Checkpoints are untrusted. Safetensors is preferred; pickled ``.bin``/``.pt`` files are opened with
``torch.load(weights_only=True)`` so a pickle that would run code is refused, never executed.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import option
from .errors import OfflineError, UserError


@dataclass(frozen=True)
class RewardSource:
    """One reward source option (``--KEY`` of score / eval-reward, ``KEY`` of the finetune config)."""

    hub: str  # the public release used when the option is not given
    help: str  # what the option names: the flag's help, before its default
    default_help: str = ""  # how the default is chosen, where that is more than ``hub`` (``{hub}`` is filled in)
    tokenizer_hub: str = ""  # where the tokenizer comes from when the release has none (PickScore; --backbone overrides)

    def help_text(self) -> str:
        return f"{self.help} (default: {(self.default_help or '{hub}').format(hub=self.hub)})"


# The reward sources, in flag order: the one place their keys, hub defaults and help are written.
REWARD_SOURCES: dict[str, RewardSource] = {
    "ict": RewardSource("8y/ICT", "ICT checkpoint: a local directory (released layout or ours) or hub id"),
    "hp": RewardSource("8y/HP", "HP checkpoint: a directory with hp_backbone/ and hp_scorer/, or hub id"),
    "backbone": RewardSource("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "CLIP backbone the ICT/HP checkpoints lay over",
                             default_help="the checkpoint dir if it is a full CLIP, else {hub}"),
    "clip": RewardSource("openai/clip-vit-large-patch14", "CLIP model for the 'clip' reward"),
    "pickscore": RewardSource("yuvalkirstain/PickScore_v1", "PickScore model",
                              tokenizer_hub="laion/CLIP-ViT-H-14-laion2B-s32B-b79K"),
    "hpsv2": RewardSource("xswu/HPSv2", "HPS v2 checkpoint file or directory"),
    "aesthetic": RewardSource("camenduru/improved-aesthetic-predictor", "LAION aesthetic predictor directory"),
}


def source_option(key: str):
    """The config field of reward source ``key`` (default "": the reward's own), its help from the table."""
    return option("", REWARD_SOURCES[key].help_text())


def resolve(source: str | os.PathLike, what: str, allow_patterns: list[str] | None = None) -> Path:
    """Return a local directory for ``source``: an existing directory, or a hub id fetched or cached.

    ``what`` names the model in error messages (e.g. "ICT checkpoint").
    """
    src = str(source)
    path = Path(src).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        return path  # a single file (e.g. a .safetensors head)
    looks_local = src.startswith((".", "/", "~")) or src.count("/") != 1 or os.sep + os.sep in src
    if looks_local:
        raise UserError(f"{what}: '{src}' does not exist; pass an existing directory or a hub id (owner/name)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover - huggingface_hub comes with transformers
        raise UserError(f"{what}: huggingface_hub is not installed; pass a local directory instead of '{src}'") from exc
    try:
        return Path(snapshot_download(src, allow_patterns=allow_patterns, local_files_only=_offline()))
    except Exception as exc:  # network errors, missing repo, offline mode
        name = type(exc).__name__
        raise OfflineError(
            f"{what}: '{src}' is not in the local cache and could not be fetched from the hub ({name}); "
            f"download it where the hub is reachable and pass its local directory instead"
        ) from None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def find_file(directory: Path, names: list[str], what: str) -> Path:
    """The first of ``names`` that exists in ``directory``; a clear error listing them otherwise."""
    for name in names:
        p = directory / name
        if p.is_file():
            return p
    listed = ", ".join(names)
    raise UserError(f"{what}: none of [{listed}] found in '{directory}'; point to the directory that holds one of them")


def load_state_dict(path: str | os.PathLike, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Load a state dict from safetensors or a pickle restricted to tensors (``weights_only``)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what}: file '{path}' does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:
            raise UserError(f"{what}: '{path}' is not a readable safetensors file ({exc}); re-download or re-export it") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unsafe pickle"
        raise UserError(
            f"{what}: refused to load '{path}': it is a pickle that needs more than tensors to load "
            f"({first[:160]}); convert it to safetensors where you trust it"
        ) from None
    except Exception as exc:
        raise UserError(f"{what}: '{path}' is not a readable checkpoint ({type(exc).__name__}: {str(exc)[:160]})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{what}: '{path}' does not hold a state dict of tensors")
    return obj


def apply_state_dict(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str, strip_prefixes=("module.",)) -> int:
    """Load ``state`` over ``module`` non-strictly, like the released code, but refuse a checkpoint that
    matches none of the module's keys (that would silently leave a random or base model).

    Returns how many tensors were loaded. Shape mismatches are errors.
    """
    own = module.state_dict()
    cleaned = {}
    for k, v in state.items():
        for p in strip_prefixes:
            if k.startswith(p):
                k = k[len(p):]
        cleaned[k] = v
    matched = [k for k in cleaned if k in own]
    if not matched:
        sample = ", ".join(list(cleaned)[:3])
        raise UserError(
            f"{what}: none of its {len(cleaned)} keys (e.g. {sample}) match the model; "
            f"is it the right checkpoint for this backbone?"
        )
    for k in matched:
        if tuple(cleaned[k].shape) != tuple(own[k].shape):
            raise UserError(
                f"{what}: tensor '{k}' has shape {tuple(cleaned[k].shape)} but the model expects "
                f"{tuple(own[k].shape)}; use the backbone the checkpoint was trained on (--backbone)"
            )
    module.load_state_dict({k: cleaned[k] for k in matched}, strict=False)
    return len(matched)


def save_state_dict(state: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write safetensors atomically (temp file, then rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp))
    os.replace(tmp, path)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)

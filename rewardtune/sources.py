"""Where models come from: aliases, local directories, hub ids; safe checkpoint loading.

Checkpoints are untrusted. Safetensors is preferred; pickled ``.bin``/``.pt`` files are opened with
``torch.load(weights_only=True)`` so a pickle that would run code is refused, never executed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .config import option
from .errors import OfflineError, UserError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class RewardSource:
    """One reward source option (``--KEY`` of score / eval-reward, ``KEY`` of the finetune config)."""

    hub: str  # the public release used when the option is not given
    help: str  # what the option names: the flag's help, before its default
    default_help: str = ""  # how the default is chosen, where that is more than ``hub`` (``{hub}`` is filled in)
    tokenizer_hub: str = (
        ""  # where the tokenizer comes from when the release has none (PickScore; --backbone overrides)
    )

    def help_text(self) -> str:
        return f"{self.help} (default: {(self.default_help or '{hub}').format(hub=self.hub)})"


# The reward sources, in flag order: the one place their keys, hub defaults and help are written.
REWARD_SOURCES: dict[str, RewardSource] = {
    "ict": RewardSource("8y/ICT", "ICT checkpoint: a local directory (released layout or ours) or hub id"),
    "hp": RewardSource("8y/HP", "HP checkpoint: a directory with hp_backbone/ and hp_scorer/, or hub id"),
    "backbone": RewardSource(
        "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        "CLIP backbone the ICT/HP checkpoints lay over",
        default_help="the checkpoint dir if it is a full CLIP, else {hub}",
    ),
    "clip": RewardSource("openai/clip-vit-large-patch14", "CLIP model for the 'clip' reward"),
    "pickscore": RewardSource(
        "yuvalkirstain/PickScore_v1", "PickScore model", tokenizer_hub="laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    ),
    "hpsv2": RewardSource("xswu/HPSv2", "HPS v2 checkpoint file or directory"),
    "aesthetic": RewardSource("camenduru/improved-aesthetic-predictor", "LAION aesthetic predictor directory"),
    "imagereward": RewardSource(
        "THUDM/ImageReward", "ImageReward directory (ImageReward.pt and med_config.json) or its .pt/.safetensors file"
    ),
    "imagereward_tokenizer": RewardSource(
        "google-bert/bert-base-uncased",
        "BERT tokenizer ImageReward reads prompts with: a directory or hub id",
        default_help="the ImageReward directory if it holds one, else {hub}",
    ),
    "hpsv3": RewardSource("MizzenAI/HPSv3", "HPSv3 checkpoint: HPSv3.safetensors or a directory holding it"),
    "qwen2vl": RewardSource(
        "Qwen/Qwen2-VL-7B-Instruct", "Qwen2-VL base of HPSv3: its config and tokenizer (json/txt; no weights read)"
    ),
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
    _check_hub_id(src, what)
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover - huggingface_hub comes with transformers
        raise UserError(
            f"{what}: huggingface_hub is not installed; pass a local directory instead of '{src}'"
        ) from exc
    try:
        return Path(snapshot_download(src, allow_patterns=allow_patterns, local_files_only=_offline()))
    except Exception as exc:  # network errors, missing repo, offline mode
        name = type(exc).__name__
        raise OfflineError(
            f"{what}: '{src}' is not in the local cache and could not be fetched from the hub ({name}); "
            f"download it where the hub is reachable and pass its local directory instead"
        ) from None


def _check_hub_id(src: str, what: str) -> None:
    """A source that is not an existing path must read as a hub id (owner/name)."""
    if src.startswith((".", "/", "~")) or src.count("/") != 1 or os.sep + os.sep in src:
        raise UserError(f"{what}: '{src}' does not exist; pass an existing directory or a hub id (owner/name)")


def check_available(source: str | os.PathLike, what: str) -> None:
    """Raise the error ``resolve`` would for ``source``, without downloading anything: a local path must exist;
    a hub id must be in the local cache when the hub is offline (online, fetching it is the loader's job)."""
    src = str(source)
    if Path(src).expanduser().exists():
        return
    _check_hub_id(src, what)
    if _offline():
        resolve(src, what)  # local files only: a cache lookup


BEST_DIR = "best"  # a train-reward run's best validation model, beside the last step's in the run directory
_SAID: set[str] = set()


def reward_model_dir(directory: Path, what: str) -> Path:
    """The model to load from ``directory``: a train-reward run's ``best/`` when it kept one (the step with
    the best validation metric), else ``directory`` itself (the last step, or any other model directory).
    For a run directory, one line on stderr (rank 0, once per directory) says which was used."""
    best = directory / BEST_DIR
    record = best / "trainer_state.json"
    if record.is_file() and best.is_dir():
        try:
            info = json.loads(record.read_text())
            shown = f"step {info['step']}, {info['metric']} {float(info['value']):.4g}"
        except (OSError, ValueError, KeyError, TypeError):
            shown = "its trainer_state.json is unreadable"
        _say_once(
            f"{what}: using the best validation model of the run in '{directory}': '{best}' ({shown}); "
            f"the last step's model stays in '{directory}'"
        )
        return best
    if (directory / "metrics.json").is_file() and (directory / "runs.jsonl").is_file():
        _say_once(
            f"{what}: the run in '{directory}' kept no {BEST_DIR}/ (it trained without validation data); "
            f"using its last step's model"
        )
    return directory


def _say_once(line: str) -> None:
    if line not in _SAID and int(os.environ.get("RANK", "0")) == 0:
        _SAID.add(line)
        print(line, file=sys.stderr, flush=True)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def find_file(directory: Path, names: list[str], what: str) -> Path:
    """The first of ``names`` that exists in ``directory``; a clear error listing them otherwise."""
    for name in names:
        p = directory / name
        if p.is_file():
            return p
    listed = ", ".join(names)
    raise UserError(
        f"{what}: none of [{listed}] found in '{directory}'; point to the directory that holds one of them"
    )


def load_state_dict(path: str | os.PathLike, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Load a state dict from safetensors or a pickle restricted to tensors (``weights_only``)."""
    import torch  # noqa: PLC0415 - here, not at the top: the configs import this module (REWARD_SOURCES), and --help no torch
    from safetensors.torch import load_file  # noqa: PLC0415

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what}: file '{path}' does not exist")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as exc:
            raise UserError(
                f"{what}: '{path}' is not a readable safetensors file ({exc}); re-download or re-export it"
            ) from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unsafe pickle"
        raise UserError(
            f"{what}: refused to load '{path}': it is a pickle that needs more than tensors to load "
            f"({first[:160]}); convert it to safetensors where you trust it"
        ) from None
    except Exception as exc:
        raise UserError(
            f"{what}: '{path}' is not a readable checkpoint ({type(exc).__name__}: {str(exc)[:160]})"
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{what}: '{path}' does not hold a state dict of tensors")
    return obj


def apply_state_dict(
    module: torch.nn.Module, state: dict[str, torch.Tensor], what: str, strip_prefixes=("module.",)
) -> int:
    """Load ``state`` over ``module`` non-strictly, like the released code, but refuse a checkpoint that
    matches none of the module's keys (that would silently leave a random or base model).

    Returns how many tensors were loaded. Shape mismatches are errors.
    """
    own = module.state_dict()
    cleaned = {}
    for k, v in state.items():
        for p in strip_prefixes:
            if k.startswith(p):
                k = k[len(p) :]
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


def save_state_dict(
    state: dict[str, torch.Tensor],
    path: str | os.PathLike,
    what: str = "weights",
    metadata: dict[str, str] | None = None,
) -> None:
    """Write safetensors atomically (temp file, then rename); a failed write is a one-line ``UserError``."""
    from safetensors.torch import save  # noqa: PLC0415

    data = save({k: v.detach().contiguous().cpu() for k, v in state.items()}, metadata=metadata)
    atomic_write_bytes(path, data, what)


def atomic_write_text(path: str | os.PathLike, text: str, what: str = "file") -> None:
    """Write ``text`` atomically (temp file, then rename; directories made as needed): a reader sees the old
    file or the new one, never half of one. A failed write is a one-line ``UserError``; the temp file goes."""
    atomic_write_bytes(path, text.encode("utf-8"), what)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, what: str = "file") -> None:
    """``atomic_write_text`` for bytes."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with writing(path, what, cleanup=tmp):
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_bytes(tmp, data)
        os.replace(tmp, path)


def _write_bytes(path: Path, data: bytes) -> None:
    """The one low-level write of the helpers above (tests make it fail as a full disk would)."""
    with open(path, "wb") as f:
        f.write(data)


# Why a write failed, by errno, and what to do about it.
WRITE_FAILURES = {
    errno.ENOSPC: ("no space left on the device", "free space there or write to another disk"),
    errno.EDQUOT: ("the disk quota is exceeded", "free space within the quota or write elsewhere"),
    errno.EFBIG: (
        "the file is larger than the file system or the process's file size limit (ulimit -f) allows",
        "write to another file system or raise the limit",
    ),
    errno.EROFS: ("the file system is read-only", "choose a writable location"),
    errno.EACCES: ("permission denied", "choose a location you may write to"),
    errno.EPERM: ("operation not permitted", "choose a location you may write to"),
    errno.ENOTDIR: ("a file is in the way where a directory is needed", "move that file or choose another location"),
    errno.EIO: ("an input/output error of the device", "check the disk, or write elsewhere"),
}


def write_errno(exc: BaseException) -> int | None:
    """The OS error behind a failed write, if it is one of ``WRITE_FAILURES``: an ``OSError`` anywhere in the
    exception's chain (torch.save wraps it in a RuntimeError), or safetensors' '(os error N)' message."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        code = exc.errno if isinstance(exc, OSError) else None
        if code is None:
            m = re.search(r"\(os error (\d+)\)", str(exc))
            code = int(m.group(1)) if m else None
        if code in WRITE_FAILURES:
            return code
        exc = exc.__cause__ or exc.__context__
    return None


def write_failed(exc: BaseException, what: str, path: str | os.PathLike) -> UserError | None:
    """The one-line ``UserError`` for a write of ``what`` to ``path`` that failed with ``exc``; None when
    ``exc`` is not an environment error of the write (a bug, which should keep its traceback)."""
    code = write_errno(exc)
    if code is None:
        return None
    reason, action = WRITE_FAILURES[code]
    return UserError(f"could not write {what} '{path}': {reason}; {action} (nothing was replaced)")


@contextlib.contextmanager
def writing(path: str | os.PathLike, what: str, cleanup: str | os.PathLike | None = None):
    """Around a write of ``what`` to ``path``: on any failure remove ``cleanup`` (a temp file or a staging
    directory), and turn a full disk, read-only or forbidden path into a one-line ``UserError``."""
    try:
        yield
    except BaseException as exc:
        if cleanup is not None:
            _remove(Path(cleanup))
        error = (
            write_failed(exc, what, path) if isinstance(exc, Exception) and not isinstance(exc, UserError) else None
        )
        if error is None:
            raise
        raise error from None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()

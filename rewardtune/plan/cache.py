"""The planner's answers kept on disk, so a plan asked again answers at once.

An answer is reused only for the same inputs: every option of the config (the output directory aside), the
planner's own arguments, the contents of the model's and reward backbone's config files (a local directory's
``*.json``, never its weights), the source of this rewardtune (every ``.py`` and shipped config) and the versions
of Python and the libraries the trace runs (torch, diffusers, transformers, peft, accelerate). Anything else
changed is a different key, so a stale answer cannot be returned. Files live in ``$REWARDTUNE_CACHE_DIR/plan``
(default ``$XDG_CACHE_HOME/rewardtune``, else ``~/.cache/rewardtune``); a file that cannot be read is ignored and
written again. This module imports nothing heavy: the CLI looks an answer up before loading any model code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import tempfile
from importlib import metadata
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent
LIBRARIES = ("torch", "diffusers", "transformers", "peft", "accelerate")
_CODE: list[str] = []  # the package's digest, once per process


def cache_dir() -> Path:
    """Where the planner keeps its answers (see the module docstring)."""
    root = os.environ.get("REWARDTUNE_CACHE_DIR")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = str(Path(xdg) / "rewardtune") if xdg else str(Path.home() / ".cache" / "rewardtune")
    return Path(root).expanduser() / "plan"


def _code_digest() -> str:
    if not _CODE:
        h = hashlib.sha256()
        for path in sorted([*PACKAGE.rglob("*.py"), *(PACKAGE / "plan" / "configs").glob("*.json")]):
            h.update(str(path.relative_to(PACKAGE)).encode())
            h.update(path.read_bytes())
        _CODE.append(h.hexdigest())
    return _CODE[0]


def _configs_digest(*places) -> str:
    """The ``*.json`` files of each local directory among ``places`` (and its subfolders, one level down)."""
    h = hashlib.sha256()
    for place in places:
        if not place:
            continue
        directory = Path(str(place)).expanduser()
        if not directory.is_dir():
            continue
        for path in sorted([*directory.glob("*.json"), *directory.glob("*/*.json")]):
            h.update(str(path.relative_to(directory)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"


def key(cfg, pipeline_dir, reward_config, vae_block_checkpointing, target, full_depth) -> str:
    """The digest of everything a plan's answer depends on (see the module docstring)."""
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "output"}
    hp_backbone = str(Path(cfg.hp) / "hp_backbone") if cfg.hp else None
    parts = {
        "config": fields,
        "arguments": [str(pipeline_dir), reward_config, vae_block_checkpointing, target, full_depth],
        "files": _configs_digest(pipeline_dir or cfg.model, cfg.backbone, cfg.ict, hp_backbone),
        "code": _code_digest(),
        "versions": [platform.python_version(), *(_version(n) for n in LIBRARIES)],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def load(digest: str) -> dict | None:
    """The answer stored under ``digest``, or None."""
    path = cache_dir() / f"{digest}.json"
    try:
        return json.loads(path.read_text())["answer"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def store(digest: str, answer: dict) -> None:
    """Keep ``answer`` under ``digest`` (written to a temporary file, then renamed); a cache that cannot be
    written is skipped: the answer is still returned."""
    directory = cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".plan-", dir=directory)
        with os.fdopen(fd, "w") as f:
            json.dump({"answer": answer}, f)
        os.replace(tmp, directory / f"{digest}.json")
    except OSError:
        pass

"""``PromptCache``: the prompt embeddings of a training run, computed once, kept off the accelerator.

Flow-matching families cache their text encoders' outputs so that T5-XXL (about 9.5 GB in bf16) can leave the
accelerator after one pass over the prompt set. The embeddings are large too: FLUX.1-dev's 512 T5 tokens of
width 4096 are 4 MiB a prompt in bf16 (8 MiB in fp32), so 10k prompts would be 40-80 GB of host memory. The
cache keeps entries in memory up to ``ram_bytes`` and writes the rest to disk, one safetensors file per prompt
in a private temporary directory that is removed with the cache (or when the process exits).
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import weakref
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

DEFAULT_RAM_GIB = 8.0


class PromptCache:
    """prompt -> {name: CPU tensor}. ``put`` merges names into a prompt's entry; ``get`` returns the entry."""

    def __init__(self, ram_bytes: int | float = DEFAULT_RAM_GIB * 2**30, directory: str | Path | None = None):
        """``directory``: where spilled entries go (a new temporary directory under it, removed with the cache)."""
        self.ram_bytes = ram_bytes
        self._ram: dict[str, dict[str, torch.Tensor]] = {}
        self._disk: dict[str, Path] = {}
        self._used = 0
        self._parent = directory
        self._dir: Path | None = None

    def __contains__(self, prompt: str) -> bool:
        return prompt in self._ram or prompt in self._disk

    def __len__(self) -> int:
        return len(self._ram) + len(self._disk)

    @property
    def ram_used(self) -> int:
        """Bytes of the entries held in memory."""
        return self._used

    @property
    def spilled(self) -> int:
        """How many prompts' entries are on disk."""
        return len(self._disk)

    def names(self, prompt: str) -> set[str]:
        return set(self.get(prompt)) if prompt in self else set()

    def get(self, prompt: str) -> dict[str, torch.Tensor]:
        if prompt in self._ram:
            return self._ram[prompt]
        return load_file(self._disk[prompt])

    def put(self, prompt: str, parts: dict[str, torch.Tensor]) -> None:
        parts = {k: v.detach().to("cpu").contiguous() for k, v in parts.items()}
        if prompt in self._disk:
            self._write(prompt, {**load_file(self._disk[prompt]), **parts})
            return
        old = self._ram.pop(prompt, {})
        self._used -= sum(_nbytes(v) for v in old.values())
        entry = {**old, **parts}
        size = sum(_nbytes(v) for v in entry.values())
        if self._used + size <= self.ram_bytes:
            self._ram[prompt] = entry
            self._used += size
        else:
            self._write(prompt, entry)

    def _write(self, prompt: str, entry: dict[str, torch.Tensor]) -> None:
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="rewardtune-prompt-cache-", dir=self._parent))
            weakref.finalize(self, shutil.rmtree, self._dir, True)
        path = self._dir / (hashlib.sha256(prompt.encode()).hexdigest()[:32] + ".safetensors")
        save_file(entry, str(path))
        self._disk[prompt] = path

    @property
    def directory(self) -> Path | None:
        """The directory of the spilled entries (None while nothing has spilled)."""
        return self._dir


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()

"""``PromptStore``: prompt embeddings on disk that later runs reuse (``--prompt-embeddings DIR``,
``rewardtune encode-prompts``).

The large text encoders of the flow families -- T5-XXL (4.7B) and now LLMs: Qwen2.5-VL-7B, Qwen3, Mistral-Small
(8-48 GB in bf16) -- run once per prompt and are then never needed again. A store keeps their outputs so that a
second run with the same prompts never loads the encoder at all. Entries are keyed by everything that changes
them: the encoder's weights (``rundir.weights_identity`` of its folder), the family, the sequence length, the
dtype it ran in and its quantization; a change of any of them starts a fresh subdirectory beside the old one, so
nothing stale is ever read. One safetensors file per prompt (its name a hash of the prompt; the prompt itself in
the file's metadata, checked on read), written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import UserError
from ..rundir import weights_identity
from ..sources import writing

FORMAT = 1


class PromptStore:
    """A directory of prompt embeddings for one encoder setting (``key``): ``get(prompt)`` or None, ``put``."""

    def __init__(self, root: str | Path, key: dict):
        self.root = Path(root).expanduser()
        if self.root.exists() and not self.root.is_dir():
            raise UserError(f"--prompt-embeddings '{self.root}' is a file; pass a directory")
        self.key = {"format": FORMAT, **key}
        digest = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:16]
        self.dir = self.root / digest

    def _path(self, prompt: str) -> Path:
        return self.dir / (hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:40] + ".safetensors")

    def __contains__(self, prompt: str) -> bool:
        """Whether this prompt's entry is there (its file's header names the prompt: read, not the tensors)."""
        try:
            with safe_open(str(self._path(prompt)), "pt") as f:
                return (f.metadata() or {}).get("prompt") == prompt
        except Exception:  # absent or damaged
            return False

    def missing(self, prompts) -> list[str]:
        return [p for p in dict.fromkeys(prompts) if p not in self]

    def get(self, prompt: str) -> dict[str, torch.Tensor] | None:
        """The stored entry, or None (absent, or a file that is not this prompt's: it is ignored and rewritten)."""
        path = self._path(prompt)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), "pt") as f:
                if (f.metadata() or {}).get("prompt") != prompt:
                    return None
                return {k: f.get_tensor(k) for k in f.keys()}
        except Exception:  # a damaged file: computed again
            return None

    def put(self, prompt: str, parts: dict[str, torch.Tensor]) -> None:
        path = self._path(prompt)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with writing(path, "the prompt embeddings", cleanup=tmp):
            self.dir.mkdir(parents=True, exist_ok=True)
            key_file = self.dir / "key.json"
            if not key_file.is_file():
                key_file.write_text(json.dumps(self.key, indent=2))
            save_file({k: v.detach().to("cpu").contiguous() for k, v in parts.items()}, str(tmp), {"prompt": prompt})
            os.replace(tmp, path)


def store_for(cfg, model_dir: Path, family, dtype: torch.dtype) -> PromptStore | None:
    """The store ``--prompt-embeddings`` names for this model's large text encoder, keyed by everything its
    embeddings depend on; None without the option or for a family without such an encoder. The sequence length,
    when left to the model, is keyed by what decides it: the alias and the transformer's config."""
    if not getattr(cfg, "prompt_embeddings", "") or family.cached_encoder is None:
        return None
    length = cfg.max_sequence_length
    if length is None:
        config = model_dir / family.denoiser / "config.json"
        text = json.dumps(json.loads(config.read_text()), sort_keys=True) if config.is_file() else ""
        length = {"default_of": cfg.defaults_from or cfg.model, "config": hashlib.sha256(text.encode()).hexdigest()}
    key = {
        "family": family.name,
        "encoder": family.cached_encoder,
        "weights": weights_identity(model_dir / family.cached_encoder),
        "max_sequence_length": length,
        "dtype": str(dtype).removeprefix("torch."),
        "quantize": getattr(cfg, "quantize_text_encoder", "none"),
    }
    return PromptStore(cfg.prompt_embeddings, key)

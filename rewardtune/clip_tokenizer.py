"""CLIP's real BPE tokenizer written offline for ``transformers.CLIPTokenizer``, from the merges open_clip ships.

The planner builds the full 49,408-token tokenizer with it, the demo builder and the tiny test models a
reduced one; nothing here downloads.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

N_MERGES = 49152 - 256 - 2  # the merges CLIP uses out of open_clip's file
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP byte alphabet in vocabulary order: printable bytes as themselves, then the rest as code
    points >= 256 (the first 256 tokens of CLIP's vocabulary)."""
    keep = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    order = keep + [b for b in range(256) if b not in keep]
    return [chars[b] for b in order]


def clip_merges() -> list[tuple[str, str]]:
    """The 48,894 BPE merges of CLIP, read from the file open_clip ships."""
    from open_clip.tokenizer import default_bpe

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    return [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]


def bpe(parts: list[str], rank: dict[tuple[str, str], int], used: set | None = None) -> list[str]:
    """``parts`` after BPE with the merges ranked in ``rank`` (lowest first, every occurrence); each merge applied is
    added to ``used`` when given."""
    while len(parts) > 1:
        pairs = [(parts[i], parts[i + 1]) for i in range(len(parts) - 1)]
        best = min(pairs, key=lambda p: rank.get(p, 1 << 30))
        if best not in rank:
            break
        if used is not None:
            used.add(best)
        merged, i = [], 0
        while i < len(parts):
            if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


def _merges_used(words: list[str], merges: list[tuple[str, str]]) -> set[tuple[str, str]]:
    """The merges BPE applies when tokenising ``words`` (so a reduced vocabulary tokenises them alike)."""
    rank = {m: i for i, m in enumerate(merges)}
    used = set()
    for word in words:
        bpe(list(word[:-1]) + [word[-1] + "</w>"], rank, used)
    return used


def write_clip_tokenizer(directory: str | Path, words: list[str] | None = None) -> int:
    """Write ``vocab.json``, ``merges.txt`` and tokenizer configs for ``transformers.CLIPTokenizer``.

    With ``words``, keep only the merges those (lower-case) words need: a small vocabulary that
    tokenises them exactly as full CLIP does, for tiny models. Returns the vocabulary size.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    merges = clip_merges()
    if words is not None:
        used = _merges_used(sorted({w.lower() for w in words if w}), merges)
        merges = [m for m in merges if m in used]
    alphabet = bytes_to_unicode()
    vocab_list = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "do_lower_case": True,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (directory / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}, indent=2)
    )
    return len(vocab_list)

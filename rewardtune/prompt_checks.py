"""Prompts as the models will read them: blank prompts, and prompts longer than a text encoder takes.

A text encoder reads at most a fixed number of tokens (77 for CLIP); a longer prompt is cut there, and
nothing downstream says so. Each command counts such prompts once, before it starts, and notes them on
stderr: one line per limit, naming what cuts them.

A *limit* is any object with ``label`` (e.g. "CLIP text encoder"), ``max_tokens`` and
``count_truncated(prompts) -> int``: ``ClipTower``, ``HFTokenLimit`` and ``OpenClipLimit`` are ones.
"""

from __future__ import annotations

import sys
import unicodedata


def is_blank(text) -> bool:
    """True for a prompt with nothing to read: empty, or only whitespace, control or invisible format
    characters (a zero-width space, a byte-order mark)."""
    if not isinstance(text, str):
        return True
    return all(ch.isspace() or unicodedata.category(ch) in ("Cc", "Cf") for ch in text)


def hf_token_counts(tokenizer, prompts: list[str]) -> list[int]:
    """Tokens per prompt for a Hugging Face tokenizer, special tokens included, nothing cut."""
    if not prompts:
        return []
    ids = tokenizer(list(prompts), add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
    return [len(x) for x in ids]


class HFTokenLimit:
    """The limit of one or more Hugging Face tokenizers read side by side (SDXL's two): a prompt is cut
    when it is longer than any of them reads (each its own ``model_max_length``)."""

    def __init__(self, tokenizers: list, label: str):
        self.tokenizers = [t for t in tokenizers if t is not None]
        self.label = label
        self.max_tokens = min(int(t.model_max_length) for t in self.tokenizers)

    def count_truncated(self, prompts: list[str]) -> int:
        cut = [False] * len(prompts)
        for tok in self.tokenizers:
            limit = int(tok.model_max_length)
            cut = [c or n > limit for c, n in zip(cut, hf_token_counts(tok, prompts))]
        return sum(cut)


class OpenClipLimit:
    """An open_clip tokenizer's ``context_length`` (HPS v2)."""

    label = "open_clip text encoder"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.max_tokens = int(tokenizer.context_length)

    def count_truncated(self, prompts: list[str]) -> int:
        if not prompts:
            return 0
        # One position more than the model reads: a prompt that fits leaves it as padding (0); a longer
        # one puts a token there.
        ids = self.tokenizer(list(prompts), context_length=self.max_tokens + 1)
        return int((ids[:, self.max_tokens] != 0).sum())


def reward_limits(rewards: dict) -> list[tuple[object, str]]:
    """(limit, reward name) for every text encoder the named rewards read prompts with. A reward that
    does not say (a module passed in from Python) contributes none."""
    out = []
    for name, reward in rewards.items():
        for limit in getattr(reward, "text_limits", lambda: [])():
            out.append((limit, name))
    return out


def long_prompt_notes(
    prompts: list[str], limits: list[tuple[object, str | None]], what: str = "prompts", where: str = ""
) -> list[str]:
    """One line per limit that cuts some of ``prompts`` (counted once each, repeats aside). ``limits`` are
    (limit, who) pairs; a limit shared by several rewards is counted once and lists them all; ``who`` may
    be None (the diffusion model's own encoder). ``what`` is the plural noun the note uses ("training
    prompts"), ``where`` an optional phrase after it (" in split 'test'")."""
    unique = list(dict.fromkeys(prompts))
    groups: dict[int, tuple[object, list[str]]] = {}
    for limit, who in limits:
        names = groups.setdefault(id(limit), (limit, []))[1]
        if who is not None and who not in names:
            names.append(who)
    lines: dict[tuple, list[str]] = {}
    for limit, names in groups.values():
        n = limit.count_truncated(unique)
        if n:
            key = (limit.label, limit.max_tokens, n)
            lines.setdefault(key, []).extend(x for x in names if x not in lines.get(key, []))
    out = []
    for (label, max_tokens, n), names in lines.items():
        by = f" (reward{'s' if len(names) > 1 else ''} {', '.join(names)})" if names else ""
        if len(unique) == 1:
            head, verb = f"the {what.removesuffix('s')}{where} is", "is"
        else:
            verb = "is" if n == 1 else "are"
            head = f"{n} of {len(unique)} {what}{where} {verb}"
        owner = label + ("'" if label.endswith("s") else "'s")
        out.append(f"note: {head} longer than the {owner} {max_tokens} tokens{by} and {verb} cut there")
    return out


def report_long_prompts(
    prompts: list[str], limits: list[tuple[object, str | None]], what: str = "prompts", where: str = ""
) -> int:
    """Print ``long_prompt_notes`` on stderr; returns how many lines were printed."""
    lines = long_prompt_notes(prompts, limits, what, where)
    for line in lines:
        print(line, file=sys.stderr, flush=True)
    return len(lines)

"""Prompt sets: a text file with one prompt a line, or ``builtin:NAME`` from ``rewardtune/prompts``; and the
one note per run on prompts longer than the text encoders read."""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import UserError
from ..prompt_checks import HFTokenLimit, is_blank, report_long_prompts, reward_limits

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "prompts"


def builtin_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.txt"))


def load_prompts(spec: str, what: str = "--prompts") -> list[str]:
    """The non-blank lines of a prompt file, stripped; ``builtin:NAME`` picks a bundled set. A line of only
    whitespace or invisible characters is blank too, so no prompt is ever empty."""
    spec = str(spec)
    if is_blank(spec):
        raise UserError(
            f"{what} is empty ({spec!r}); give a text file with one prompt a line, or builtin:NAME "
            f"({', '.join(builtin_names())})"
        )
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        path = BUILTIN_DIR / f"{name}.txt"
        if not path.is_file():
            raise UserError(f"{what}: no built-in prompt set '{name}'; built-in sets: {', '.join(builtin_names())}")
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise UserError(
                f"{what}: prompt file '{spec}' does not exist; give a text file with one prompt a line, "
                f"or builtin:NAME ({', '.join(builtin_names())})"
            )
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is not part of the first prompt
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{what}: '{path}' is not a readable UTF-8 text file ({type(exc).__name__})") from None
    # one prompt a line: split on \n alone (\r\n too); str.splitlines() also splits on \f, \x1c-\x1e, U+0085,
    # U+2028 and U+2029, which can stand inside a prompt
    prompts = [line.strip() for line in text.split("\n") if not is_blank(line)]
    if not prompts:
        raise UserError(f"{what}: '{path}' holds no prompts; write one prompt a line")
    return prompts


def note_long_prompts(trainer, eval_prompts: list[str]) -> None:
    """Note once, before the first batch (main process), how many training prompts the diffusion model's
    text encoder(s) and the reward cut, and how many evaluation prompts those and the eval reward cut;
    diffusers' own warning, which repeats at every batch, is silenced (on every process). ``trainer``
    needs ``prompts``, ``pipe``, ``reward``, ``eval_reward``, ``cfg.eval_prompts`` and ``accelerator``."""
    pipe = trainer.pipe
    logging.getLogger(type(pipe).__module__).addFilter(_QUIET_TRUNCATION)  # the same object is added once
    if not trainer.accelerator.is_main_process:
        return
    tokenizers = [getattr(pipe, "tokenizer", None), getattr(pipe, "tokenizer_2", None)]
    n = sum(t is not None for t in tokenizers)
    model = [(HFTokenLimit(tokenizers, f"diffusion model's text encoder{'s' if n > 1 else ''}"), None)] if n else []
    rewards = reward_limits({_name(trainer.reward): trainer.reward})
    evals = reward_limits({_name(trainer.eval_reward): trainer.eval_reward}) if trainer.eval_reward is not None else []
    report_long_prompts(trainer.prompts, model + rewards, "training prompts")
    # Evaluation prompts drawn from the training set were counted above, save by the eval reward.
    report_long_prompts(
        eval_prompts, (model + rewards + evals) if trainer.cfg.eval_prompts else evals, "evaluation prompts"
    )


class _NoTruncationWarning(logging.Filter):
    """Drops the SD/SDXL pipelines' per-call "part of your input was truncated" warning (noted once instead)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "input was truncated" not in record.getMessage()


_QUIET_TRUNCATION = _NoTruncationWarning()


def _name(reward) -> str:
    return str(getattr(reward, "name", None) or type(reward).__name__)

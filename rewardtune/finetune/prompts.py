"""Prompt sets: a text file with one prompt a line, or ``builtin:NAME`` from ``rewardtune/prompts``."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "prompts"


def builtin_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.txt"))


def load_prompts(spec: str, what: str = "--prompts") -> list[str]:
    """The non-blank lines of a prompt file, stripped; ``builtin:NAME`` picks a bundled set."""
    spec = str(spec)
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        path = BUILTIN_DIR / f"{name}.txt"
        if not path.is_file():
            raise UserError(f"{what}: no built-in prompt set '{name}'; built-in sets: {', '.join(builtin_names())}")
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise UserError(f"{what}: prompt file '{spec}' does not exist; give a text file with one prompt a line, "
                            f"or builtin:NAME ({', '.join(builtin_names())})")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{what}: '{path}' is not a readable UTF-8 text file ({type(exc).__name__})") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"{what}: '{path}' holds no prompts; write one prompt a line")
    return prompts

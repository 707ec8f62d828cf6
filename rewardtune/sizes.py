"""Image/video sizes: ``--resolution`` is one number (a square) or ``HEIGHTxWIDTH`` (``480x832``).

A config holds the value as given: an int for a square (so a square run's config.yaml reads as before), the text
``"480x832"`` otherwise; everything that needs pixels reads ``hw(value)``. No torch here (the CLI's --help)."""

from __future__ import annotations

import re

from .errors import UserError

_HW = re.compile(r"^\s*(\d+)\s*[xX×]\s*(\d+)\s*$")


def parse_resolution(value):
    """An int (square, 0 = the model's native size) or ``"HxW"`` (two different sides), from an int, its text or
    ``HxW`` text; a one-line ``UserError`` for anything else."""
    if isinstance(value, bool):
        raise UserError(f"--resolution: give one size (512) or HEIGHTxWIDTH (480x832), got {value}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, (tuple, list)) and len(value) == 2:
        value = f"{value[0]}x{value[1]}"
    text = str(value).strip()
    if text.isdigit():
        return int(text)
    match = _HW.match(text)
    if not match:
        raise UserError(f"--resolution: give one size (512) or HEIGHTxWIDTH (480x832), got {value!r}")
    h, w = int(match[1]), int(match[2])
    return h if h == w else f"{h}x{w}"


def hw(resolution) -> tuple[int, int]:
    """(height, width) of an int, an ``HxW`` text or a pair."""
    if isinstance(resolution, (tuple, list)):
        return int(resolution[0]), int(resolution[1])
    value = parse_resolution(resolution) if isinstance(resolution, str) else resolution
    if isinstance(value, str):
        h, w = value.split("x")
        return int(h), int(w)
    return int(value), int(value)


def shown(resolution) -> str:
    """``HxW`` text of a size (``512x512`` for a square)."""
    h, w = hw(resolution)
    return f"{h}x{w}"


def check_size(adapter, resolution) -> None:
    """The adapter's ``check_resolution`` (written for one side) on each side; an error for one side of a
    non-square size names the whole ``--resolution``."""
    h, w = hw(resolution)
    for side in dict.fromkeys((h, w)):
        try:
            adapter.check_resolution(side)
        except UserError as err:
            if h == w:
                raise
            raise UserError(f"{err} [--resolution {h}x{w}: the {'height' if side == h else 'width'}]") from None

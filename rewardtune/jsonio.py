"""Strict JSON in and out: no ``NaN``/``Infinity`` literals, which Python's ``json`` writes and reads by default
but which are not JSON (other readers -- ``jq``, browsers, most languages -- reject the whole file)."""

from __future__ import annotations

import json
import math

NONFINITE_KEY = "nonfinite"


def _refuse(constant: str):
    raise ValueError(f"{constant} is not JSON")


def loads(text: str):
    """``json.loads`` that refuses ``NaN``, ``Infinity`` and ``-Infinity`` (a ``ValueError``)."""
    return json.loads(text, parse_constant=_refuse)


def _clean(value, path: str, found: list[str]):
    if isinstance(value, float) and not math.isfinite(value):
        found.append(path or "(the value)")
        return None
    if isinstance(value, dict):
        return {k: _clean(v, f"{path}.{k}" if path else str(k), found) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v, f"{path}[{i}]", found) for i, v in enumerate(value)]
    return value


def dumps(data, **kw) -> str:
    """``data`` as strict JSON: a non-finite number becomes ``null``, and a dict at the top lists where under
    ``"nonfinite"`` (so a diverged metric reads as missing, with a flag, not as a broken file)."""
    found: list[str] = []
    clean = _clean(data, "", found)
    if found and isinstance(clean, dict):
        clean[NONFINITE_KEY] = found
    return json.dumps(clean, allow_nan=False, **kw)

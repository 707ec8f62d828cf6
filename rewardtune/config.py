"""Typed configs: one dataclass per command. YAML recipes are those dataclasses on disk, CLI flags
override them, and an unknown key is an error that lists the valid ones.

Each option is documented once, in ``field(metadata={"help": ...})``; the CLI help comes from there.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from pathlib import Path

import yaml

from .errors import UserError

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"


def option(default, help: str, **kw):
    """A config field with its help text (the single source of the flag's documentation)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return dataclasses.field(default=default, metadata={"help": help, **kw})


PRECISIONS = ("no", "fp16", "bf16")  # accelerate's mixed-precision names, the choices of --mixed-precision
PRECISION_DTYPES = {"no": "float32", "fp16": "float16", "bf16": "bfloat16",
                    "fp32": "float32", "float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}


def precision_dtype(name: str):
    """The torch dtype of a precision name: accelerate's ``no``/``fp16``/``bf16`` (``--mixed-precision``), or
    ``fp32``/``float32``/``float16``/``bfloat16``. The one table of these names; torch is imported on use."""
    import torch

    if name not in PRECISION_DTYPES:
        raise ValueError(f"unknown precision '{name}'; valid: {', '.join(PRECISION_DTYPES)}")
    return getattr(torch, PRECISION_DTYPES[name])


def _base_type(tp):
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    if origin in (list, tuple):
        return list
    return tp


def add_config_args(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """One ``--flag-name`` per field; defaults stay None so only flags actually given override."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or f.metadata.get("cli") is False:
            continue
        flag = "--" + f.name.replace("_", "-")
        tp = _base_type(hints[f.name])
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        if default not in (None, [], ""):
            help_text += f" (default: {default})"
        kw = {"dest": f.name, "default": None, "help": help_text}
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif tp is list:
            parser.add_argument(flag, nargs="+", **kw)
        else:
            parser.add_argument(flag, type=tp if tp in (int, float) else str, **kw)


def recipe_path(name_or_path: str) -> Path:
    """A recipe by path, or by name among the bundled ones (``train_ict`` -> recipes/train_ict.yaml)."""
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return p
    for cand in (RECIPES_DIR / name_or_path, RECIPES_DIR / f"{name_or_path}.yaml"):
        if cand.is_file():
            return cand
    names = sorted(x.stem for x in RECIPES_DIR.glob("*.yaml")) if RECIPES_DIR.is_dir() else []
    raise UserError(f"config: '{name_or_path}' is neither a file nor a bundled recipe; bundled: {', '.join(names) or 'none'}")


def load_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"config: '{path}' is not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"config: '{path}' must hold a mapping of option names to values")
    return data


def check_keys(cls, keys, where: str) -> None:
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in keys if k not in valid]
    if unknown:
        parts = []
        for k in unknown:
            close = difflib.get_close_matches(str(k), valid, n=1)
            parts.append(f"'{k}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        raise UserError(f"config: unknown key(s) in {where}: {', '.join(parts)}; valid keys: {', '.join(valid)}")


def _coerce(cls, key, value):
    tp = _base_type(typing.get_type_hints(cls)[key])
    if value is None:
        return None
    try:
        if tp is bool and not isinstance(value, bool):
            if str(value).lower() in ("true", "1", "yes"):
                return True
            if str(value).lower() in ("false", "0", "no"):
                return False
            raise ValueError
        if tp in (int, float):
            if isinstance(value, bool):
                raise ValueError
            return tp(value)
        if tp is list:
            return list(value) if isinstance(value, (list, tuple)) else [value]
        if tp is str:
            return str(value)
    except (TypeError, ValueError):
        raise UserError(f"config: '{key}' must be {tp.__name__}, got {value!r}") from None
    return value


def build_config(cls, args: argparse.Namespace | None = None, config: str | None = None, **overrides):
    """Defaults <- recipe YAML (``config``) <- CLI flags (non-None values in ``args``) <- ``overrides``."""
    values: dict = {}
    if config:
        path = recipe_path(config)
        data = load_yaml(path)
        check_keys(cls, data, f"'{path}'")
        values.update(data)
    names = {f.name for f in dataclasses.fields(cls)}
    if args is not None:
        values.update({k: v for k, v in vars(args).items() if k in names and v is not None})
    check_keys(cls, overrides, "overrides")
    values.update(overrides)
    cfg = cls(**{k: _coerce(cls, k, v) for k, v in values.items()})
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def config_to_yaml(cfg) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)

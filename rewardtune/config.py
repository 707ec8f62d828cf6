"""Typed configs: one dataclass per command. YAML recipes are those dataclasses on disk, CLI flags
override them, and an unknown key is an error that lists the valid ones.

Each option is declared once, with ``option(...)``: its help (the CLI help comes from there), its choices,
its range (checked by ``check_values``) and its deprecated names (accepted as flags and recipe keys with a
one-line warning). Another command's config reuses a field with ``derived``.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import sys
import types
import typing
from pathlib import Path

import yaml

from .errors import UserError

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"


def option(default, help: str, *, choices=None, aliases: tuple[str, ...] = (), min=None, max=None,
           positive: bool = False, cli: bool = True):
    """A config field and everything about it, said once: ``help`` (the flag's documentation), ``choices``,
    the inclusive range ``min``..``max`` (``positive``: above 0, for values where 0 makes no sense), and
    ``aliases``, deprecated names still accepted as flags and recipe keys. ``cli=False``: no flag."""
    meta = {"help": help, "aliases": tuple(aliases), "min": min, "max": max, "positive": positive, "cli": cli}
    if choices is not None:
        meta["choices"] = list(choices)
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def derived(cls, name: str, default=dataclasses.MISSING, help: str | None = None) -> dataclasses.Field:
    """Field ``name`` of config ``cls`` declared again in another config: the same help, choices, range and
    aliases (so they live once, in ``cls``), with this config's own ``default`` and, where it must say
    something else, its own ``help``."""
    source = next((f for f in dataclasses.fields(cls) if f.name == name), None)
    if source is None:
        raise TypeError(f"{cls.__name__} has no field '{name}'")
    meta = dict(source.metadata)
    if default is dataclasses.MISSING:
        default = source.default if source.default is not dataclasses.MISSING else source.default_factory()
    meta["help"] = help if help is not None else meta["help"]
    return option(default, **meta)


def flag_name(name: str) -> str:
    """``lora_rank`` -> ``--lora-rank``."""
    return "--" + name.replace("_", "-")


def aliases_of(cls) -> dict[str, str]:
    """Deprecated name -> current field name, for every ``option(aliases=...)`` of ``cls``."""
    return {old: f.name for f in dataclasses.fields(cls) for old in f.metadata.get("aliases", ())}


def _range_problem(value, lo, hi, positive: bool) -> str | None:
    """What ``value`` must be when it is outside its declared range, else None."""
    if positive and value <= 0:
        return "positive"
    if lo is not None and hi is not None and not lo <= value <= hi:
        return f"in [{lo}, {hi}]"
    if lo is not None and value < lo:
        return "0 or more" if lo == 0 else f"at least {lo}"
    if hi is not None and value > hi:
        return f"at most {hi}"
    return None


def check_values(cfg) -> None:
    """Check every field of ``cfg`` against its declared choices and range; raise a one-line ``UserError``
    naming the flag. Messages start with the config class's ``ERROR_PREFIX`` (e.g. ``"demo: "``), if any."""
    prefix = getattr(cfg, "ERROR_PREFIX", "")
    for f in dataclasses.fields(cfg):
        value, meta = getattr(cfg, f.name), f.metadata
        if value is None or isinstance(value, bool):
            continue
        choices = meta.get("choices")
        if choices is not None and value not in choices:
            raise UserError(f"{prefix}{flag_name(f.name)} '{value}' is not one of {', '.join(map(str, choices))}")
        if isinstance(value, (int, float)):
            problem = _range_problem(value, meta.get("min"), meta.get("max"), meta.get("positive", False))
            if problem:
                raise UserError(f"{prefix}{flag_name(f.name)} must be {problem}, got {value}")


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
    """One ``--flag-name`` per field; defaults stay None so only flags actually given override. A field's
    deprecated names become hidden flags of their own (``build_config`` maps them, with a warning)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or f.metadata.get("cli") is False:
            continue
        tp = _base_type(hints[f.name])
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        if default not in (None, [], ""):
            help_text += f" (default: {default})"
        aliases = f.metadata.get("aliases", ())
        if aliases:
            help_text += f" [deprecated name: {', '.join(flag_name(a) for a in aliases)}]"
        kw = {"dest": f.name, "default": None, "help": help_text}
        if f.metadata.get("choices") is not None:
            kw["choices"] = f.metadata["choices"]
        _add_flag(parser, flag_name(f.name), tp, kw)
        for old in aliases:
            _add_flag(parser, flag_name(old), tp, {**kw, "dest": old, "help": argparse.SUPPRESS})


def _add_flag(parser: argparse.ArgumentParser, flag: str, tp, kw: dict) -> None:
    if tp is bool:
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
    elif tp is list:
        parser.add_argument(flag, nargs="+", **kw)
    else:
        parser.add_argument(flag, type=tp if tp in (int, float) else str, **kw)


def rename_aliases(cls, values: dict, where: str, as_flags: bool = False) -> dict:
    """``values`` with deprecated names replaced by the current ones, printing one line on stderr for each;
    giving a deprecated name and its current name together is an error. ``as_flags``: name them as flags."""
    out = dict(values)
    for old, new in aliases_of(cls).items():
        if old not in out:
            continue
        shown_old, shown_new = (flag_name(old), flag_name(new)) if as_flags else (f"'{old}'", f"'{new}'")
        if new in out:
            raise UserError(f"config: {shown_old} and {shown_new} both given {where}; {shown_old} is the deprecated "
                            f"name of {shown_new}: keep only {shown_new}")
        out[new] = out.pop(old)
        if os.environ.get("RANK", "0") == "0":  # once per run, not once per process
            print(f"rewardtune: warning: {shown_old} {where} is deprecated; use {shown_new}", file=sys.stderr)
    return out


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
    """Defaults <- recipe YAML (``config``) <- CLI flags (non-None values in ``args``) <- ``overrides``;
    deprecated names are accepted in each; then ``validate`` (or, without one, ``check_values``)."""
    values: dict = {}
    if config:
        path = recipe_path(config)
        data = rename_aliases(cls, load_yaml(path), f"in '{path}'")
        check_keys(cls, data, f"'{path}'")
        values.update(data)
    names = {f.name for f in dataclasses.fields(cls)} | set(aliases_of(cls))
    if args is not None:
        given = {k: v for k, v in vars(args).items() if k in names and v is not None}
        values.update(rename_aliases(cls, given, "on the command line", as_flags=True))
    overrides = rename_aliases(cls, overrides, "in the overrides")
    check_keys(cls, overrides, "overrides")
    values.update(overrides)
    cfg = cls(**{k: _coerce(cls, k, v) for k, v in values.items()})
    if hasattr(cfg, "validate"):
        cfg.validate()
    else:
        check_values(cfg)
    return cfg


def config_to_yaml(cfg) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)

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
import math
import os
import re
import sys
import types
import typing
from pathlib import Path

import yaml

from .errors import UserError

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
MAX_RECIPE_DEPTH = 8  # levels of nested mappings and lists in a recipe (a recipe needs 2)
MAX_RECIPE_VALUES = 10_000  # values in a recipe once its YAML aliases are expanded
FLOAT32_MAX = 3.4028234663852886e38


def option(
    default,
    help: str,
    *,
    choices=None,
    aliases: tuple[str, ...] = (),
    min=None,
    max=None,
    positive: bool = False,
    cli: bool = True,
    parse=None,
):
    """A config field and everything about it, said once: ``help`` (the flag's documentation), ``choices``,
    the inclusive range ``min``..``max`` (``positive``: above 0, for values where 0 makes no sense), and
    ``aliases``, deprecated names still accepted as flags and recipe keys. ``cli=False``: no flag. ``parse``: a
    function reading the flag's text and the recipe's value (for a value of more than one type)."""
    meta = {"help": help, "aliases": tuple(aliases), "min": min, "max": max, "positive": positive, "cli": cli}
    if parse is not None:
        meta["parse"] = parse
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
        if isinstance(value, float) and not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
            beyond = "" if not math.isfinite(value) else " (beyond float32's range, which torch computes in)"
            raise UserError(f"{prefix}{flag_name(f.name)} must be a finite number, got {value}{beyond}")
        if isinstance(value, (int, float)):
            problem = _range_problem(value, meta.get("min"), meta.get("max"), meta.get("positive", False))
            if problem:
                raise UserError(f"{prefix}{flag_name(f.name)} must be {problem}, got {value}")


PRECISIONS = ("no", "fp16", "bf16")  # accelerate's mixed-precision names, the choices of --mixed-precision
PRECISION_DTYPES = {
    "no": "float32",
    "fp16": "float16",
    "bf16": "bfloat16",
    "fp32": "float32",
    "float32": "float32",
    "float16": "float16",
    "bfloat16": "bfloat16",
}


def precision_dtype(name: str):
    """The torch dtype of a precision name: accelerate's ``no``/``fp16``/``bf16`` (``--mixed-precision``), or
    ``fp32``/``float32``/``float16``/``bfloat16``. The one table of these names; torch is imported on use."""

    if name not in PRECISION_DTYPES:
        raise ValueError(f"unknown precision '{name}'; valid: {', '.join(PRECISION_DTYPES)}")
    import torch  # noqa: PLC0415 - here, not at the top: --help and the configs stay free of torch

    return getattr(torch, PRECISION_DTYPES[name])


def _optional(tp) -> bool:
    """Whether the annotation ``tp`` admits None (``X | None``, ``Optional[X]``)."""
    origin = typing.get_origin(tp)
    return (origin is typing.Union or origin is types.UnionType) and type(None) in typing.get_args(tp)


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
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        )
        if default not in (None, [], ""):
            help_text += f" (default: {default})"
        aliases = f.metadata.get("aliases", ())
        if aliases:
            help_text += f" [deprecated name: {', '.join(flag_name(a) for a in aliases)}]"
        kw = {"dest": f.name, "default": None, "help": help_text}
        if f.metadata.get("choices") is not None:
            kw["choices"] = f.metadata["choices"]
        tp = str if "parse" in f.metadata else tp  # read as text; ``_coerce`` parses it, as it does a recipe's value
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
            raise UserError(
                f"config: {shown_old} and {shown_new} both given {where}; {shown_old} is the deprecated "
                f"name of {shown_new}: keep only {shown_new}"
            )
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
    raise UserError(
        f"config: '{name_or_path}' is neither a file nor a bundled recipe; bundled: {', '.join(names) or 'none'}"
    )


def load_yaml(path: Path) -> dict:
    """A recipe's mapping. Nesting deeper than ``MAX_RECIPE_DEPTH`` or more than ``MAX_RECIPE_VALUES`` values
    once aliases are expanded (an alias bomb) is refused before anything is built from it."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"config: '{path}' is not a text (UTF-8) file; a recipe is YAML text") from None
    except OSError as exc:
        raise UserError(f"config: cannot read '{path}' ({exc.strerror or exc})") from None
    try:
        _check_nesting(text, path)
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None:
            _measure(node, 1, {}, set(), path)
        data = yaml.load(text, Loader=_RecipeLoader) or {}
    except _Surprise as exc:
        raise UserError(f"config: '{path}' line {exc.line}: {exc}") from None
    except yaml.YAMLError as exc:
        raise UserError(f"config: '{path}' is not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"config: '{path}' must hold a mapping of option names to values")
    return data


class _Surprise(Exception):
    def __init__(self, message: str, node):
        super().__init__(message)
        self.line = node.start_mark.line + 1


# YAML 1.1 (PyYAML's) reads these plain scalars as numbers that YAML 1.2 -- and a reader of the recipe --
# takes otherwise: a leading 0 as octal (010 -> 8), colons as base 60 (1:30 -> 90).
_OCTAL = re.compile(r"^[-+]?0[0-7_]+$")
_BASE60 = re.compile(r"^[-+]?[0-9][0-9_]*(:[0-5]?[0-9])+(\.[0-9_]*)?$")


class _RecipeLoader(yaml.SafeLoader):
    """YAML's safe loader with YAML 1.1's surprises refused: a key given twice (PyYAML keeps the last without a
    word), octal and base-60 numbers. Booleans stay 1.1's (yes/no/on/off); ``_coerce`` names those."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise _Surprise(
                    f"'{key}' is given twice (lines {seen[key]} and {key_node.start_mark.line + 1}); keep one",
                    key_node,
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node):
        text = str(node.value)
        if _OCTAL.match(text) or _BASE60.match(text):
            kind = "an octal number" if _OCTAL.match(text) else "a base-60 number"
            raise _Surprise(
                f"'{text}' reads as {kind} in YAML 1.1 ({super().construct_yaml_int(node)}); write the number you "
                f"mean without a leading 0 or colons, or quote it if it is text",
                node,
            )
        return super().construct_yaml_int(node)

    def construct_yaml_float(self, node):
        if _BASE60.match(str(node.value)):
            raise _Surprise(
                f"'{node.value}' reads as a base-60 number in YAML 1.1; write the number you mean, or quote it", node
            )
        return super().construct_yaml_float(node)


_RecipeLoader.add_constructor("tag:yaml.org,2002:int", _RecipeLoader.construct_yaml_int)
_RecipeLoader.add_constructor("tag:yaml.org,2002:float", _RecipeLoader.construct_yaml_float)


def _too_deep(path) -> UserError:
    return UserError(
        f"config: '{path}' nests values deeper than {MAX_RECIPE_DEPTH} levels; a recipe is a mapping of "
        f"option names to values (numbers, text, lists of them)"
    )


def _check_nesting(text: str, path) -> None:
    """Refuse deep nesting from the parser's events, before any tree is built (building one recurses)."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_RECIPE_DEPTH:
                raise _too_deep(path)
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def _measure(node, depth: int, memo: dict, path_ids: set, path) -> tuple[int, int]:
    """(values, levels) of a YAML node with its aliases expanded, counted without expanding them (a node
    reached by several aliases is counted once and multiplied). Refuses too many, too deep, or a cycle."""
    if depth > MAX_RECIPE_DEPTH:
        raise _too_deep(path)
    key = id(node)
    if key in path_ids:
        raise UserError(
            f"config: '{path}' holds a YAML alias inside its own anchor (a recursive value); write the values out"
        )
    if key not in memo:
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        else:
            children = []
        path_ids.add(key)
        sizes = [_measure(c, depth + 1, memo, path_ids, path) for c in children]
        path_ids.discard(key)
        memo[key] = (1 + sum(n for n, _ in sizes), 1 + max((h for _, h in sizes), default=0))
    values, levels = memo[key]
    if depth - 1 + levels > MAX_RECIPE_DEPTH:
        raise _too_deep(path)
    if values > MAX_RECIPE_VALUES:
        raise UserError(
            f"config: '{path}' expands to more than {MAX_RECIPE_VALUES} values through its YAML aliases; "
            f"a recipe is a short mapping of option names to values: write them out"
        )
    return values, levels


def check_keys(cls, keys, where: str) -> None:
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in keys if k not in valid]
    if unknown:
        parts = []
        for k in unknown:
            close = difflib.get_close_matches(str(k), valid, n=1)
            parts.append(f"'{k}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        raise UserError(f"config: unknown key(s) in {where}: {', '.join(parts)}; valid keys: {', '.join(valid)}")


_SCALARS = (str, int, float)


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _kind(value) -> str:
    return {dict: "a mapping ", list: "a list ", tuple: "a list ", set: "a set "}.get(type(value), "")


def _coerce(cls, key, value):
    """``value`` as the type of field ``key``; a one-line ``UserError`` naming the key for a value of the wrong
    kind (a list where a number belongs, nested lists, a mapping where text belongs, 2.5 steps)."""
    tp = _base_type(typing.get_type_hints(cls)[key])
    if value is None:
        return None
    parse = next((f.metadata.get("parse") for f in dataclasses.fields(cls) if f.name == key), None)
    if parse is not None:
        return parse(value)

    def wrong(what: str) -> UserError:
        return UserError(f"config: '{key}' must be {what}, got {_kind(value)}{_shown(value)}")

    if tp is list:
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        if isinstance(value, dict) or not all(isinstance(v, _SCALARS) and not isinstance(v, bool) for v in items):
            raise wrong("a list of names or numbers (not nested, no mappings, no empty items)")
        return items
    if isinstance(value, (list, tuple, dict, set)):
        raise wrong(getattr(tp, "__name__", str(tp)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "1", "yes"):
            return True
        if str(value).lower() in ("false", "0", "no"):
            return False
        raise wrong("bool (true or false)")
    if tp is str:
        if isinstance(value, bool):  # YAML reads an unquoted no/yes/off/on as a boolean
            raise UserError(
                f"config: '{key}' must be str, got the boolean {str(value).lower()} (YAML reads unquoted "
                f"yes/no/on/off so); quote it if you mean the word, e.g. {key}: 'no'"
            )
        return str(value)
    if tp is int:
        return _whole_number(value, wrong)
    if tp is float:
        if isinstance(value, bool):
            raise wrong("float")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise wrong("float") from None
    return value


def _whole_number(value, wrong) -> int:
    """An int from an int, its text, or a whole float (YAML reads 1e3 as text, 1000.0 as a float)."""
    if isinstance(value, bool):
        raise wrong("int (a whole number)")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise wrong("int (a whole number)") from None
    if not number.is_integer():  # also NaN and the infinities
        raise wrong("int (a whole number)")
    return int(number)


def _check_given(cls, values: dict, where: str) -> None:
    """An option given without a value (``eta:`` in a recipe reads as None) is an error, unless None is one of
    its values (an Optional field, where it means 'the default')."""
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if value is None and key in hints and not _optional(hints[key]):
            raise UserError(f"config: '{key}' {where} has no value; give it one or remove the line")


def build_config(cls, args: argparse.Namespace | None = None, config: str | None = None, **overrides):
    """Defaults <- recipe YAML (``config``) <- CLI flags (non-None values in ``args``) <- ``overrides``;
    deprecated names are accepted in each; then ``validate`` (or, without one, ``check_values``)."""
    values: dict = {}
    if config:
        path = recipe_path(config)
        data = rename_aliases(cls, load_yaml(path), f"in '{path}'")
        check_keys(cls, data, f"'{path}'")
        _check_given(cls, data, f"in '{path}'")
        values.update(data)
    names = {f.name for f in dataclasses.fields(cls)} | set(aliases_of(cls))
    if args is not None:
        given = {k: v for k, v in vars(args).items() if k in names and v is not None}
        values.update(rename_aliases(cls, given, "on the command line", as_flags=True))
    overrides = rename_aliases(cls, overrides, "in the overrides")
    check_keys(cls, overrides, "overrides")
    _check_given(cls, overrides, "in the overrides")
    values.update(overrides)
    cfg = cls(**{k: _coerce(cls, k, v) for k, v in values.items()})
    if hasattr(cfg, "validate"):
        cfg.validate()
    else:
        check_values(cfg)
    return cfg


def config_to_yaml(cfg) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)

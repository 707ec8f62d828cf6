"""Flags and parsing shared by several subcommands."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from ..config import flag_name, precision_dtype
from ..errors import UserError
from ..sources import REWARD_SOURCES
from ..threads import THREADS_HELP

if TYPE_CHECKING:
    import torch

DTYPE_NAMES = ("fp32", "float32", "fp16", "float16", "bf16", "bfloat16")  # --dtype; config.precision_dtype maps them


def add_source_args(parser: argparse.ArgumentParser) -> None:
    """One ``--KEY`` flag per reward source of ``REWARD_SOURCES`` (stored as ``src_KEY``)."""
    group = parser.add_argument_group("reward sources (local directories or hub ids)")
    for key, source in REWARD_SOURCES.items():
        group.add_argument(flag_name(key), dest=f"src_{key}", default=None, metavar="SRC", help=source.help_text())


def add_threads_arg(parser: argparse.ArgumentParser) -> None:
    """``--threads N``: the command's torch CPU threads (``rewardtune.cli`` applies it, or its default, before the
    command runs)."""
    parser.add_argument("--threads", type=int, default=None, metavar="N", help=THREADS_HELP)


def sources_from_args(args: argparse.Namespace) -> dict:
    """The reward source flags that were given, as ``load_reward`` keyword arguments."""
    return {k: getattr(args, f"src_{k}") for k in REWARD_SOURCES if getattr(args, f"src_{k}", None) is not None}


def parse_device(name: str | None) -> torch.device:
    import torch

    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device '{name}' is not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device '{name}': no CUDA GPU is available here; use --device cpu")
    return dev


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name in (None, ""):
        return None
    if name not in DTYPE_NAMES:
        raise UserError(f"--dtype '{name}' is not one of {', '.join(sorted(DTYPE_NAMES))}")
    return precision_dtype(name)

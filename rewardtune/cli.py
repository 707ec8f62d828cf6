"""``rewardtune`` command line: subcommands and argument parsing only; the work lives elsewhere."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from . import __version__
from .errors import UserError

# Each module in rewardtune.commands defines register(subparsers); the subcommand's parser has
# ``func(args) -> int``.
COMMANDS = ["score", "train_reward", "eval_reward", "data", "finetune", "plan", "demo"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rewardtune", description="Reward models (ICT, HP) and reward fine-tuning of diffusion models."
    )
    parser.add_argument("--version", action="version", version=f"rewardtune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"rewardtune.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_libraries()
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"rewardtune {args.command}: error: {exc}", file=sys.stderr)
        if os.environ.get("REWARDTUNE_DEBUG"):
            raise
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"rewardtune {args.command}: interrupted", file=sys.stderr)
        return 130


def _quiet_libraries() -> None:
    """Library load bars and info logs drown our own progress output; keep warnings. (transformers is
    imported here, not at the top, so that ``--help`` and argument errors stay fast.)"""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_warning()


if __name__ == "__main__":
    sys.exit(main())

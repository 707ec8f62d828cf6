"""``rewardtune`` command line: subcommands and argument parsing only; the work lives elsewhere."""

from __future__ import annotations

import argparse
import atexit
import importlib
import logging
import os
import sys

from . import __version__, stops, threads
from .errors import UserError

# Each module in rewardtune.commands defines register(subparsers); the subcommand's parser has
# ``func(args) -> int``.
COMMANDS = ["score", "train_reward", "eval_reward", "data", "finetune", "encode_prompts", "plan", "demo"]


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
    rc = _main(argv)
    if argv is None and _launched_processes() > 1:
        _exit_without_finalizing(rc)
    return rc


def _launched_processes() -> int:
    """How many processes the launcher started (torchrun's ``WORLD_SIZE``; 1 outside a distributed launch)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def _exit_without_finalizing(rc: int) -> None:
    """End one process of a distributed run (``accelerate launch``/torchrun) once its command is done: the exit
    handlers run (log and tracker flushes, temporary files), then the process ends without Python's interpreter
    teardown. A Gloo process group's C++ worker threads can still be releasing a finished collective's tensors
    when the main thread finalizes the interpreter; a worker that then needs the GIL is torn down and the process
    aborts (SIGABRT, "terminate called without an active exception"), after every output was written, and the
    launcher reports the run failed. Seen twice in about 140 two-process train-reward runs on 2 busy CPUs (a core dump:
    ``ProcessGroupGloo::runLoop`` -> ``~AsyncAllgatherWork`` -> ``decref_pyobject`` -> ``take_gil`` ->
    ``pthread_exit`` during ``Py_FinalizeEx``); destroying the process group first does not stop those threads."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(rc)


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        threads.configure(getattr(args, "threads", None))  # before anything imports torch
        _quiet_libraries(args)
        with stops.handled():
            return int(args.func(args) or 0)
    except stops.Stopped as exc:
        print(f"rewardtune {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except UserError as exc:
        print(f"rewardtune {args.command}: error: {exc}", file=sys.stderr)
        if os.environ.get("REWARDTUNE_DEBUG"):
            raise
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"rewardtune {args.command}: interrupted", file=sys.stderr)
        return 130


# bitsandbytes (installed with the gpu and test extras) warns when it is imported, on CPUs with AVX512-BF16, that an
# optional faster CPU kernel for 4-bit matmuls (the `kernels` package) is missing. peft and diffusers import it
# whenever it is installed, so every command printed it; only a 4-bit base on the CPU would use that kernel.
BNB_CPU_KERNEL_LOGGER = "bitsandbytes.backends.cpu.ops"
BNB_CPU_KERNEL_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _DropNotice(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def _quiet_libraries(args: argparse.Namespace) -> None:
    """Library load bars and info logs drown our own progress output; keep warnings, except bitsandbytes'
    missing-CPU-kernel notice unless the command quantizes the base. (transformers is imported here, not at
    the top, so that ``--help`` and argument errors stay fast.)"""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_warning()
    bnb = logging.getLogger(BNB_CPU_KERNEL_LOGGER)
    ours = [f for f in bnb.filters if isinstance(f, _DropNotice)]
    if getattr(args, "quantize_base", None):
        for f in ours:
            bnb.removeFilter(f)
    elif not ours:
        bnb.addFilter(_DropNotice(BNB_CPU_KERNEL_NOTICE))


if __name__ == "__main__":
    sys.exit(main())

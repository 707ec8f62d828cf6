"""Commands that answer at once: ``--help``, ``COMMAND --help`` and ``--version`` import no torch (how long they
take is measured by benchmarks/cli_startup.py, not here); the help says what the commands do today."""

from __future__ import annotations

import subprocess
import sys

import pytest

from rewardtune import __version__
from rewardtune.cli import COMMANDS
from rewardtune.testing.cli import HANG_SECONDS, offline_env

# What must stay out of a process that only prints help: torch and the model libraries that import it.
HEAVY = ("torch", "numpy", "transformers", "diffusers", "accelerate", "peft", "open_clip")


def imported_by(*args: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    """``rewardtune ARGS`` under ``python -X importtime``, and the top-level packages it imported."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "rewardtune.cli", *args],
        env=offline_env(),
        capture_output=True,
        text=True,
        timeout=HANG_SECONDS,
    )
    modules = {line.rsplit("|", 1)[1].strip().split(".")[0] for line in done.stderr.splitlines() if "|" in line}
    return done, modules


@pytest.mark.parametrize(
    "args", [["--help"], ["--version"], *[[c.replace("_", "-"), "--help"] for c in COMMANDS], ["data", "check", "-h"]]
)
def test_help_and_version_import_no_torch(args):
    done, modules = imported_by(*args)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "rewardtune" in modules and not modules & set(HEAVY), sorted(modules & set(HEAVY))
    assert (__version__ in done.stdout) if args == ["--version"] else ("usage: rewardtune" in done.stdout)


def test_help_texts_say_what_the_commands_do_today():
    top = subprocess.run([sys.executable, "-m", "rewardtune.cli", "--help"], capture_output=True, text=True).stdout
    assert "SD 1.x/2.x, SDXL, SD3/3.5 or FLUX.1" in " ".join(top.split())
    demo = subprocess.run(
        [sys.executable, "-m", "rewardtune.cli", "demo", "--help"], capture_output=True, text=True
    ).stdout
    demo = " ".join(demo.split())
    # --sample-steps quotes its numbers at the demo's own guidance (1.0), not at 2 as it once did
    assert "guidance 2" not in demo and "at the default guidance 1.0" in demo
    for command in ("score", "eval-reward", "finetune", "train-reward", "demo"):
        text = subprocess.run(
            [sys.executable, "-m", "rewardtune.cli", command, "--help"], capture_output=True, text=True
        ).stdout
        assert "--threads" in text and "OMP_NUM_THREADS" in " ".join(text.split()), command

"""The command line as a user runs it, for tests: ``python -m rewardtune.cli`` in a subprocess, offline."""

from __future__ import annotations

import os
import subprocess
import sys


def offline_env(**extra: str) -> dict[str, str]:
    """This process's environment with the hub offline, no GPU and one OpenMP thread that sleeps while it waits
    (what ``rewardtune.threads`` asks for: tests share their cores with each other and with other work), plus
    ``extra``."""
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "OMP_WAIT_POLICY": "PASSIVE",
        "CUDA_VISIBLE_DEVICES": "",
        "TOKENIZERS_PARALLELISM": "false",
        **extra,
    }


def cli_command(*args) -> list[str]:
    return [sys.executable, "-m", "rewardtune.cli", *map(str, args)]


def run_cli(*args, env: dict | None = None, cwd=None, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """``rewardtune ARGS`` to completion, its output captured as text (``env`` default: ``offline_env()``)."""
    return subprocess.run(
        cli_command(*args),
        env=offline_env() if env is None else env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )

"""The command line as a user runs it, for tests: ``python -m rewardtune.cli`` in a subprocess, offline."""

from __future__ import annotations

import os
import subprocess
import sys

# A wall-clock limit in a test only catches a hang, never a speed target: the suite runs on 2-core machines that other
# work shares (issue #26: at load 8-13 a CPU-bound step took 5-20x its idle time, and CPUs differ up to 3x), so every
# limit is this, many times what the slowest guarded call takes on an idle machine (the demo --compare test's few
# minutes). Speed is measured by the scripts in benchmarks/, with their results committed.
HANG_SECONDS = 1800


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


def one_line_error(res: subprocess.CompletedProcess, command: str, *expect: str) -> str:
    """The refusal: exit code 2, no traceback, the last stderr line (above it at most progress bars) is the error
    of ``command``, holding each of ``expect``; returns that line."""
    assert res.returncode == 2, (res.returncode, res.stderr[-3000:])
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith(f"rewardtune {command}: error: "), last
    for text in expect:
        assert text in last, last
    return last


def cli_command(*args) -> list[str]:
    return [sys.executable, "-m", "rewardtune.cli", *map(str, args)]


def run_cli(
    *args, env: dict | None = None, cwd=None, timeout: float = HANG_SECONDS, **kwargs
) -> subprocess.CompletedProcess:
    """``rewardtune ARGS`` to completion, its output captured as text (``env`` default: ``offline_env()``;
    ``timeout``: a hang guard, see ``HANG_SECONDS``)."""
    return subprocess.run(
        cli_command(*args),
        env=offline_env() if env is None else env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )

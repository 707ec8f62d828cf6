"""Clean stops on SIGTERM and SIGINT: what schedulers (Slurm, Kubernetes) send before they kill, and Ctrl-C.

Inside ``handled()`` (the CLI runs every command in it) both signals raise ``Stopped``, which unwinds the
command as ``KeyboardInterrupt`` does: every ``with`` block closes, so the run's lock is released and a failed
start leaves nothing. Inside ``deferred()`` -- a training step, a checkpoint being written -- the first signal
is only noted; the training loop asks ``requested()`` after each step, writes a checkpoint and raises
``Stopped`` itself, so a ``--resume`` continues from that step. A second signal stops at once. The exit code
is the shell's for the signal: 143 for SIGTERM, 130 for SIGINT.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT)
_state = {"deferring": 0, "received": []}


class Stopped(BaseException):  # noqa: N818 (like KeyboardInterrupt: not an error of the program)
    """The run was stopped by a signal; ``str()`` is the one line the CLI prints, ``exit_code`` 128 + signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum, self.exit_code = signum, 128 + signum


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name + (" (Ctrl-C)" if signum == signal.SIGINT else "")


def _handler(signum, frame) -> None:
    _state["received"].append(signum)
    if _state["deferring"] and len(_state["received"]) == 1:
        print(
            f"rewardtune: {signal_name(signum)} received: stopping after the current step "
            f"(send it again to stop at once)",
            file=sys.stderr,
            flush=True,
        )
        return
    raise Stopped(f"stopped by {signal_name(signum)}", signum)


@contextlib.contextmanager
def handled():
    """While inside: SIGTERM and SIGINT raise ``Stopped`` (main thread only; elsewhere signals cannot be
    handled). The handlers before are put back after, so a command run in-process leaves its caller's."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {sig: signal.signal(sig, _handler) for sig in SIGNALS}
    _state["received"] = []
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
        _state["received"] = []


def requested() -> int | None:
    """The signal received inside ``deferred()`` and not yet acted on, or None."""
    return _state["received"][0] if _state["received"] else None


@contextlib.contextmanager
def deferred():
    """A stretch that a first signal does not cut short (it is noted for ``requested()``); if it is still
    pending when the outermost such stretch ends, ``Stopped`` is raised then."""
    _state["deferring"] += 1
    try:
        yield
    finally:
        _state["deferring"] -= 1
    pending = requested()
    if pending is not None and not _state["deferring"]:
        raise Stopped(f"stopped by {signal_name(pending)}", pending)


def clear() -> None:
    """Forget a noted signal (after acting on it)."""
    _state["received"] = []

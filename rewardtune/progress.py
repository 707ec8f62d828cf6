"""Progress lines of a training loop: the first step's time, an estimate of the time left within the first
few steps, then a line at least every minute, so a run on a slow or busy machine is never silent for long."""

from __future__ import annotations

import time
from collections.abc import Callable


def duration(seconds: float) -> str:
    """``45 s``, ``12 min``, ``2 h 05 min``."""
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


class StepProgress:
    """Call ``step(n)`` after each optimizer step ``n`` of a run that goes from ``start`` to ``total``. It says
    (through ``say``) when the first step is done, and, once ``estimate_after`` steps are done, the pace and the
    time left; after that at most ``every`` seconds pass between lines. The pace is measured from the end of the
    first step (which also pays for warm-up), over the steps and whatever else the loop did between them
    (evaluations, checkpoints), so the time left includes them."""

    def __init__(
        self,
        who: str,
        total: int,
        start: int = 0,
        every: float = 60.0,
        estimate_after: int = 3,
        say: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.who, self.total, self.start, self.every = who, total, start, every
        self.estimate_after = estimate_after
        self.say = say if say is not None else (lambda line: print(line, flush=True))
        self.clock = clock
        self.t0 = clock()
        self.first: tuple[int, float] | None = None  # (step, time) when the first step of this process ended
        self.last_line = self.t0
        self.estimated = False

    def step(self, n: int) -> None:
        now = self.clock()
        if self.first is None:
            self.first = (n, now)
            self._line(n, now, f"first step took {duration(now - self.t0)}")
            return
        done, spent = n - self.first[0], now - self.first[1]
        if n >= self.total:
            return
        if not self.estimated and n - self.start >= self.estimate_after or now - self.last_line >= self.every:
            self.estimated = True
            pace = spent / done
            self._line(n, now, f"{pace:.2f} s/step, about {duration(pace * (self.total - n))} left")

    def _line(self, n: int, now: float, text: str) -> None:
        self.last_line = now
        self.say(f"{self.who}step {n}/{self.total}: {text}")

"""Progress lines of a training loop (``rewardtune.progress``), on a made-up clock."""

from __future__ import annotations

from rewardtune.progress import StepProgress, duration


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def run(step_seconds, total=300, start=0, **kw) -> list[str]:
    clock, lines = Clock(), []
    progress = StepProgress("finetune: ", total, start, say=lines.append, clock=clock, **kw)
    for i, dt in enumerate(step_seconds, start=start + 1):
        clock.now += dt
        progress.step(i)
    return lines


def test_first_step_then_an_estimate_within_three_steps_then_every_minute():
    lines = run([5.0] + [2.0] * 99)  # a slow first step (warm-up), then 2 s a step: a line every 30 steps
    assert lines[0] == "finetune: step 1/300: first step took 5 s"
    assert lines[1] == "finetune: step 3/300: 2.00 s/step, about 10 min left"  # 297 steps x 2 s
    later = [int(line.split("/")[0].rsplit(" ", 1)[1]) for line in lines[2:]]
    assert later == [33, 63, 93]  # every 60 s after the last line


def test_a_slow_run_says_something_every_minute_from_its_second_step():
    lines = run([300.0, 90.0, 90.0], total=10)  # the busy-machine case: minutes per step
    assert lines == [
        "finetune: step 1/10: first step took 5 min",
        "finetune: step 2/10: 90.00 s/step, about 12 min left",
        "finetune: step 3/10: 90.00 s/step, about 10 min left",
    ]


def test_a_resumed_run_counts_from_its_checkpoint_and_the_last_step_is_silent():
    lines = run([1.0, 1.0, 1.0, 1.0], total=104, start=100)
    assert lines == [
        "finetune: step 101/104: first step took 1 s",
        "finetune: step 103/104: 1.00 s/step, about 1 s left",
    ]


def test_durations_read_as_people_say_them():
    assert [duration(s) for s in (0.4, 89, 90, 3000, 5400, 7500)] == [
        "0 s",
        "89 s",
        "2 min",
        "50 min",
        "1 h 30 min",
        "2 h 05 min",
    ]

"""The run directory both trainers share: checkpoint names old and new, completeness, rotation, the
start-over/resume rules, and the all-or-nothing checkpoint write (on a real one-process accelerator)."""

from __future__ import annotations

import json

import pytest

from rewardtune.errors import UserError
from rewardtune.rundir import RunDir, checkpoint_name, read_state, reset_accelerate, write_checkpoint


def _fake_checkpoint(path, step):
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps({"step": step}))


def test_checkpoints_old_and_new_names_complete_only_oldest_first(tmp_path):
    run = RunDir(tmp_path)
    assert run.checkpoints() == [] and run.latest() is None
    _fake_checkpoint(tmp_path / "checkpoints" / "step-2", 2)  # train-reward's name before 0.1
    _fake_checkpoint(tmp_path / "checkpoints" / checkpoint_name(10), 10)
    (tmp_path / "checkpoints" / "step_000020").mkdir()  # no trainer_state.json: never completed
    _fake_checkpoint(tmp_path / "checkpoints" / ".step_000030.tmp", 30)  # a write in progress
    assert [(c.step, c.path.name) for c in run.checkpoints()] == [(2, "step-2"), (10, "step_000010")]
    assert run.latest().step == 10
    run.rotate(1)
    assert [c.step for c in run.checkpoints()] == [10]


def test_resume_rules(tmp_path):
    run = RunDir(tmp_path / "out", who="train-reward: ")
    assert run.resume_point(resume=False) is None
    with pytest.raises(UserError, match=r"^train-reward: --resume: no checkpoint in '.*checkpoints'; run without --resume"):
        run.resume_point(resume=True)
    _fake_checkpoint(run.checkpoint_dir(4), 4)
    with pytest.raises(UserError, match=r"already holds checkpoints \(latest step 4\); pass --resume"):
        run.resume_point(resume=False)
    assert run.resume_point(resume=True).step == 4
    assert run.resume_point(resume=True, steps=5).step == 4
    with pytest.raises(UserError, match="the checkpoint is at step 4, not before --steps 4"):
        run.resume_point(resume=True, steps=4)


def test_write_checkpoint_replaces_whole_and_rotates(tmp_path):
    from accelerate import Accelerator

    reset_accelerate()
    acc = Accelerator(cpu=True)
    run = RunDir(tmp_path)

    def save(files):
        return lambda tmp: [(tmp / name).write_text(name) for name in files]

    for step in (1, 2, 3):
        run.save_checkpoint(acc, step, {"note": step}, keep=2, save=save(["a.txt"]))
    assert [c.path.name for c in run.checkpoints()] == ["step_000002", "step_000003"]
    assert read_state(run.checkpoint_dir(3)) == {"step": 3, "note": 3}
    write_checkpoint(acc, run.checkpoint_dir(3), save(["b.txt"]), {"step": 3})  # same step again: replaced whole
    assert sorted(p.name for p in run.checkpoint_dir(3).iterdir()) == ["b.txt", "trainer_state.json"]

    def fail(tmp):
        (tmp / "half.txt").write_text("x")
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_checkpoint(acc, run.checkpoint_dir(4), fail, {"step": 4})
    assert run.latest().step == 3  # the half-written one never counts
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [".step_000004.tmp", "step_000002", "step_000003"]
    reset_accelerate()

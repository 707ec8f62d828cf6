"""The run directory all three commands share: checkpoint names old and new, completeness, rotation, the
all-or-nothing checkpoint write with its manifest, damage detection, the output-directory table row by row
(for train-reward's, finetune's and demo's layouts), the lock, and the settings comparison (on a real
one-process accelerator, real files)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import save_file

import rewardtune.config as config
from rewardtune.demo.runner import run_dir as demo_dir
from rewardtune.errors import UserError
from rewardtune.finetune.run import run_dir as finetune_dir
from rewardtune.reward_training.train import run_dir as reward_dir
from rewardtune.rundir import (
    Cadence,
    Checkpoint,
    RunDir,
    Start,
    checkpoint_name,
    read_state,
    reset_accelerate,
    verify_checkpoint,
    weights_identity,
    write_checkpoint,
)


def _fake_checkpoint(path, step):
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps({"step": step}))


@pytest.fixture(scope="module")
def acc():
    reset_accelerate()
    yield Accelerator(cpu=True)
    reset_accelerate()


def _begun(run: RunDir) -> RunDir:
    """``run``'s directory after a run of its command started there (its record in runs.jsonl), as a user's
    first run leaves it."""
    with run.lock():
        run.begin(run.plan(resume=False, overwrite=False, steps=1), _Cfg(), {"fixed": {}, "config": {}})
    return run


def _safe_checkpoint(acc, run: RunDir, step: int, files=("optimizer.safetensors", "random_states_0.safetensors")):
    def save(tmp):
        for name in files:
            (tmp / name).write_bytes(os.urandom(64))
        return "safe"

    return write_checkpoint(acc, run.checkpoint_dir(step), save, {"step": step})


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


def test_write_checkpoint_replaces_whole_rotates_and_writes_a_manifest(tmp_path, acc):
    run = RunDir(tmp_path)

    def save(files):
        return lambda tmp: [(tmp / name).write_text(name) for name in files] and None

    for step in (1, 2, 3):
        run.save_checkpoint(acc, step, {"note": step}, keep=2, save=save(["a.txt"]))
    assert [c.path.name for c in run.checkpoints()] == ["step_000002", "step_000003"]
    assert read_state(run.checkpoint_dir(3)) == {"step": 3, "note": 3}
    manifest = json.loads((run.checkpoint_dir(3) / "manifest.json").read_text())["files"]
    assert sorted(manifest) == ["a.txt", "trainer_state.json"] and manifest["a.txt"]["size"] == 5
    write_checkpoint(acc, run.checkpoint_dir(3), save(["b.txt"]), {"step": 3})  # same step again: replaced whole
    assert sorted(p.name for p in run.checkpoint_dir(3).iterdir()) == ["b.txt", "manifest.json", "trainer_state.json"]

    def fail(tmp):
        (tmp / "half.txt").write_text("x")
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_checkpoint(acc, run.checkpoint_dir(4), fail, {"step": 4})
    assert run.latest().step == 3  # the half-written one never counts
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step_000002",
        "step_000003",
    ]  # no half one


@pytest.mark.parametrize(
    "damage",
    ["truncated_optimizer", "bad_trainer_state", "truncated_rng", "missing_file", "flipped_byte", "no_manifest"],
)
def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(damage, tmp_path, acc, capsys):
    """Issue #11 case 6: damage of each kind is found by the manifest; the run resumes from the one before."""
    run = _begun(RunDir(tmp_path, command="finetune"))
    for step in (2, 4):
        _safe_checkpoint(acc, run, step)
    latest = run.checkpoint_dir(4)
    if damage == "truncated_optimizer":
        (latest / "optimizer.safetensors").write_bytes((latest / "optimizer.safetensors").read_bytes()[:10])
    elif damage == "bad_trainer_state":
        (latest / "trainer_state.json").write_text('{"step": 4,')
    elif damage == "truncated_rng":
        (latest / "random_states_0.safetensors").write_bytes(
            (latest / "random_states_0.safetensors").read_bytes()[:-1]
        )
    elif damage == "missing_file":
        (latest / "optimizer.safetensors").unlink()
    elif damage == "flipped_byte":
        data = bytearray((latest / "optimizer.safetensors").read_bytes())
        data[20] ^= 1
        (latest / "optimizer.safetensors").write_bytes(bytes(data))
    else:
        (latest / "manifest.json").unlink()
    assert verify_checkpoint(run.latest())[0] is not None
    start = run.plan(resume=True, overwrite=False, steps=6)
    assert (start.action, start.step) == ("resume", 2)
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and warning[0].startswith("finetune: warning: checkpoint") and "is damaged" in warning[0]
    run.begin(start, _Cfg(), {"fixed": {}, "config": {}})
    assert (tmp_path / "checkpoints" / "step_000004.damaged").is_dir() and run.latest().step == 2  # set aside, kept
    # none intact: one line naming each and what to do
    (run.checkpoint_dir(2) / "optimizer.safetensors").write_bytes(b"")
    with pytest.raises(
        UserError, match=r"^--resume: no intact checkpoint in .*\(step_000002: optimizer.safetensors has 0 bytes"
    ):
        run.plan(resume=True, overwrite=False, steps=6)


class _Cfg:
    """A config dataclass stand-in for ``begin``'s config.yaml."""


@pytest.fixture(autouse=True)
def _plain_config(monkeypatch):
    real = config.config_to_yaml
    monkeypatch.setattr(config, "config_to_yaml", lambda cfg: "{}\n" if isinstance(cfg, _Cfg) else real(cfg))


def _layouts():
    return {"train-reward": reward_dir, "finetune": finetune_dir, "demo": demo_dir}


STATES = ["empty", "in_progress", "finished", "locked"]
FLAGS = ["none", "resume", "overwrite"]
# The table of docs/reliability.md: what each command does with each state of its output directory.
TABLE = {
    ("empty", "none"): "fresh",
    ("empty", "resume"): "fresh, says: no checkpoint .* yet; starting from the beginning",
    ("empty", "overwrite"): "overwrite",
    (
        "in_progress",
        "none",
    ): "refused: holds a run in progress \\(latest checkpoint: step 4\\); pass --resume to continue it, "
    "--overwrite to start over",
    ("in_progress", "resume"): "resume from 4",
    ("in_progress", "overwrite"): "overwrite",
    (
        "finished",
        "none",
    ): "refused: holds a finished run \\(4 steps\\); pass --overwrite to replace it, --resume with a larger --steps",
    ("finished", "resume"): "continue from 4 (steps 6); done (steps 4)",
    ("finished", "overwrite"): "overwrite",
    ("locked", "none"): "refused: is in use by another run \\(pid \\d+ on",
    ("locked", "resume"): "refused: is in use by another run \\(pid \\d+ on",
    ("locked", "overwrite"): "refused: is in use by another run \\(pid \\d+ on",
}


def _make_state(run: RunDir, state: str, acc) -> None:
    run.root.mkdir(parents=True)
    if state != "empty":
        _begun(run)
    if state in ("in_progress", "finished", "locked"):
        for step in (2, 4):
            _safe_checkpoint(acc, run, step)
        (run.root / "config.yaml").write_text("steps: 4\n")
    if state == "finished":
        (run.root / run.outputs[0]).write_text("the finished output")
        (run.root / run.finished).write_text(json.dumps({run.done_key: 4}))


@pytest.mark.parametrize("command", ["train-reward", "finetune", "demo"])
@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("flag", FLAGS)
def test_output_directory_table(command, state, flag, tmp_path, acc, capsys):
    """Each row of the table, the same for the three commands' layouts: the lock, then ``plan`` (nothing
    written), then ``begin`` once the run is built (what the plan replaces is cleared, the start recorded)."""
    run = _layouts()[command](tmp_path / "out")
    _make_state(run, state, acc)
    expect = TABLE[(state, flag)]
    kw = {"resume": flag == "resume", "overwrite": flag == "overwrite"}
    other = _layouts()[command](tmp_path / "out").lock().__enter__() if state == "locked" else None  # another run

    def attempt():
        with run.lock():
            if expect.startswith("continue"):
                assert run.plan(steps=4, **kw).action == "done"
            start = run.plan(steps=6, **kw)
            assert start.action == expect.split(",")[0].split(" ")[0]
            if start.action in ("resume", "continue"):
                assert start.step == 4
            out = capsys.readouterr().out
            if "says" in expect:
                assert f"{command}: --resume: no checkpoint" in out and "yet; starting from the beginning" in out
            run.begin(start, _Cfg(), {"fixed": {}, "config": {}})
            left = sorted(p.name for p in run.root.iterdir())
            if start.action == "overwrite":  # the old run's checkpoints are gone; its outputs stay until replaced
                assert not run.checkpoints() and run.finished not in left
            if start.action == "continue":
                assert run.finished not in left and run.outputs[0] in left  # in progress again until it finishes
            assert "runs.jsonl" in left and ".rewardtune.lock" in left  # config.yaml comes with the outputs

    try:
        if expect.startswith("refused: "):
            before = sorted(str(p) for p in run.root.rglob("*"))
            with pytest.raises(UserError, match=expect[len("refused: ") :]) as err:
                attempt()
            assert "\n" not in str(err.value)
            assert sorted(str(p) for p in run.root.rglob("*")) == before  # a refusal changes nothing
        else:
            attempt()
            assert not (run.root / ".rewardtune.lock").exists()  # released
    finally:
        if other is not None:
            other.__exit__(None, None, None)


@pytest.mark.parametrize("command", ["train-reward", "finetune", "demo"])
def test_outputs_without_a_finished_record_are_not_replaced_and_flags_conflict(command, tmp_path):
    """A run's own output left without its finished record (killed while publishing) needs --overwrite; the
    same file where no run of the command ever started is someone else's: refused whatever the flags."""
    run = _layouts()[command](tmp_path / "out")
    run.root.mkdir()
    (run.root / run.outputs[0]).write_text("someone's file")
    for flags in ({}, {"resume": True}, {"overwrite": True}):
        with pytest.raises(
            UserError, match=f"holds files that no rewardtune {command} run wrote \\({run.outputs[0]}\\)"
        ):
            with run.lock():
                run.plan(**{"resume": False, "overwrite": False, **flags}, steps=3)
    assert sorted(p.name for p in run.root.iterdir()) == [run.outputs[0]]  # not even a lock file was left
    (run.root / run.outputs[0]).unlink()
    _begun(run)
    (run.root / run.outputs[0]).write_text("the killed run's output")
    with pytest.raises(
        UserError, match=f"holds {run.outputs[0]} but no finished run or checkpoint of '{command}'; pass --overwrite"
    ):
        run.plan(resume=False, overwrite=False, steps=3)
    assert run.plan(resume=False, overwrite=True, steps=3).action == "overwrite"
    with pytest.raises(UserError, match="pass one of them"):
        run.plan(resume=True, overwrite=True, steps=3)


def test_a_failed_start_leaves_no_directory_and_the_lock_is_released(tmp_path):
    run = RunDir(tmp_path / "a" / "b" / "out", command="finetune")
    with pytest.raises(RuntimeError):
        with run.lock():
            assert (run.root / ".rewardtune.lock").is_file()
            raise RuntimeError("the model did not load")
    assert not (tmp_path / "a").exists()  # every directory the lock made is gone again
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="--output '.*file' is a file; pass a directory"):
        RunDir(tmp_path / "file").lock().__enter__()


def test_settings_fixed_ones_refuse_others_are_recorded(tmp_path, acc, capsys):
    run = RunDir(tmp_path, command="finetune")
    saved = {
        "fixed": {
            "--lora-alpha": 4.0,
            "--lora-targets": ["to_q", "to_k"],
            "--model": {"files": {"unet/w.safetensors": "1:a"}},
        },
        "config": {"lr": 0.1, "steps": 2, "seed": 0, "resume": False},
    }
    start = Start("resume", _ck(tmp_path, 2), {"step": 2, "settings": saved})
    same = {
        "fixed": {
            "--lora-alpha": 4.0,
            "--lora-targets": ("to_q", "to_k"),
            "--model": {"files": {"unet/w.safetensors": "1:a"}},
        },
        "config": {"lr": 0.2, "steps": 5, "seed": 0, "resume": True},
    }
    assert run.check_settings(start, same) == {"--lr": [0.1, 0.2], "--steps": [2, 5]}
    assert "with changed settings: --lr 0.1 -> 0.2, --steps 2 -> 5 (recorded in runs.jsonl)" in capsys.readouterr().out
    other = {
        **same,
        "fixed": {
            "--lora-alpha": 8.0,
            "--lora-targets": ["to_q"],
            "--model": {"files": {"unet/w.safetensors": "1:b"}},
        },
    }
    with pytest.raises(UserError) as err:
        run.check_settings(start, other)
    msg = str(err.value)
    assert "\n" not in msg and "--lora-alpha 4.0 (checkpoint) vs 8.0 (now)" in msg and "--lora-targets" in msg
    assert "--model is another model (1 file(s) differ, e.g. unet/w.safetensors)" in msg


def _ck(tmp_path, step):
    return Checkpoint(step, tmp_path / "checkpoints" / checkpoint_name(step))


def test_weights_identity_tells_same_architecture_models_apart_but_not_moved_copies(tmp_path):
    a = tmp_path / "a"
    (a / "unet").mkdir(parents=True)
    save_file({"w": torch.zeros(300_000)}, str(a / "unet" / "diffusion_pytorch_model.safetensors"))  # > 1 MiB: sampled
    (a / "model_index.json").write_text("{}")
    shutil.copytree(a, tmp_path / "moved")
    assert weights_identity(a) == weights_identity(tmp_path / "moved")
    shutil.copytree(a, tmp_path / "tuned")
    save_file(
        {"w": torch.full((300_000,), 1e-3)}, str(tmp_path / "tuned" / "unet" / "diffusion_pytorch_model.safetensors")
    )
    assert weights_identity(tmp_path / "tuned") != weights_identity(a)  # same names, sizes and header, other weights
    snap = tmp_path / "hub" / "models--org--name" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    assert weights_identity(snap) == {"hub": "org/name", "revision": "abc123"}


def test_time_cadence(acc):
    cadence = Cadence(every=0, minutes=1e-9, accelerator=acc)
    assert cadence.enabled and cadence.due(1)
    assert Cadence(every=3, minutes=0).due(3) and not Cadence(every=3, minutes=0).due(4)
    assert not Cadence(every=0, minutes=0).enabled and not Cadence(every=0, minutes=60).due(1)


def test_a_fresh_start_clears_only_a_killed_runs_leftovers(tmp_path, acc):
    """What runs of the command wrote goes (scratch, half checkpoints); a user's file anywhere stays, and a start
    without flags is refused while one is there."""
    run = _begun(finetune_dir(tmp_path / "out"))
    root = run.root
    (root / "samples").mkdir()
    (root / "samples" / "step_000001.png").write_text("x")
    (root / "metrics.jsonl").write_text("{}\n")
    (root / "summary.json.tmp").write_text("{")  # an atomic write cut short
    (root / "checkpoints" / ".step_000002.tmp").mkdir(parents=True)
    (root / "checkpoints" / "mine.txt").write_text("the user's")
    (root / "notes.txt").write_text("the user's")
    with pytest.raises(UserError, match=r"holds files that no finetune run wrote \(notes.txt\); pass --overwrite"):
        run.plan(resume=False, overwrite=False, steps=2)
    start = run.plan(resume=False, overwrite=True, steps=2)
    run.begin(start, _Cfg(), {"fixed": {}, "config": {}})
    assert sorted(p.name for p in root.iterdir()) == ["checkpoints", "notes.txt", "runs.jsonl"]
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["mine.txt"]
    (root / "notes.txt").unlink()
    start = run.plan(resume=False, overwrite=False, steps=2)  # only the run's own leftovers now: a fresh start
    run.begin(start, _Cfg(), {"fixed": {}, "config": {}})
    assert sorted(p.name for p in root.iterdir()) == ["checkpoints", "runs.jsonl"]
    records = [json.loads(line) for line in (root / "runs.jsonl").read_text().splitlines()]
    assert [r["action"] for r in records] == ["fresh", "overwrite", "fresh"] and "samples" in records[-1]["owns"]

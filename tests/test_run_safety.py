"""Issue #21's three data-loss repros, with real processes and real files: a start into a directory of the user's
removes or replaces nothing (``--output .``, ``~``, ``/`` included); one run per directory even when its lock file
is deleted; SIGTERM and SIGINT stop a run cleanly (a checkpoint, the lock released, 143/130, one line) and
``--resume`` continues it. The ownership rules themselves, case by case, are in test_rundir.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rewardtune.cli import main
from rewardtune.data.synthetic import WORDS, make_pick_high
from rewardtune.testing import SMALL_IMAGE_CLIP, save_tiny_clip
from rewardtune.testing.cli import HANG_SECONDS, cli_command, offline_env

HANG = HANG_SECONDS  # only a hang takes this long (each run here takes seconds)
PIPES = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every file and folder under ``root`` with its bytes (None for a folder)."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def _refused(res: subprocess.CompletedProcess, command: str) -> str:
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith(f"rewardtune {command}: error: "), last
    return last


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("safety_world")
    save_tiny_clip(d / "clip", seed=0, words=WORDS, **SMALL_IMAGE_CLIP)
    make_pick_high(d / "data", {"train": 16}, size=32, formats=("parquet",))
    return {"clip": d / "clip", "data": d / "data"}


def _finetune(sd_model, world, out, *extra) -> list:
    return [
        "finetune", "--model", sd_model, "--reward", "clip", "--clip", world["clip"], "--output", out,
        "--resolution", 32, "--sample-steps", 2, "--k", 1, "--batch-size", 1, "--eval-size", 1,
        "--lora-rank", 2, "--mixed-precision", "no", "--log-every", 1, *extra,
    ]  # fmt: skip


def _train_reward(world, out, *extra) -> list:
    return [
        "train-reward", "--data", world["data"], "--backbone", world["clip"], "--output", out, "--batch-size", 4,
        "--num-workers", 0, "--no-progress", "--eval-split", "", *extra,
    ]  # fmt: skip


# ----- 1. a start never removes or replaces what it did not write -----------------------------------------
def _project(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_a_start_in_a_users_folder_removes_and_replaces_nothing(sd_model, world, tmp_path, monkeypatch, capsys):
    """The repro of #21: ``finetune --output .`` in a project folder removed checkpoints/ and samples/ and replaced
    config.yaml; train-reward did the same to logs/ and checkpoints/. Now every start there -- with --overwrite
    or --resume too, and into ``~`` and ``/`` -- is refused in one line naming the files, and nothing changes.
    The repro itself runs as real processes; its variants through the same CLI in this process."""
    ft = _project(
        tmp_path / "ft", {"checkpoints/e1/model.pt": "x", "samples/cat.png": "x", "config.yaml": "mine: 1\n"}
    )
    tr = _project(
        tmp_path / "tr",
        {"logs/experiment.log": "x", "checkpoints/best.ckpt": "x", "config.json": "{}", "vocab.json": "{}"},
    )
    home = _project(tmp_path / "home", {".bashrc": "x", "notes.txt": "x"})
    before = {p: _tree(p) for p in (ft, tr, home)}
    procs = {
        "finetune": subprocess.Popen(
            cli_command(*_finetune(sd_model, world, ".", "--steps", 1)), cwd=ft, env=offline_env(), **PIPES
        ),
        "train-reward": subprocess.Popen(
            cli_command(*_train_reward(world, ".", "--steps", 1)), cwd=tr, env=offline_env(), **PIPES
        ),
    }
    for command, proc in procs.items():
        out, err = proc.communicate(timeout=HANG)
        line = _refused(subprocess.CompletedProcess(proc.args, proc.returncode, out, err), command)
        names = (
            "(checkpoints/, config.json, logs/, vocab.json)"
            if command == "train-reward"
            else "(checkpoints/, config.yaml, samples/)"
        )
        assert f"--output '.' holds files that no rewardtune {command} run wrote {names}" in line, line
        assert "choose another --output" in line
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(ft)
    variants = {
        "overwrite": _finetune(sd_model, world, ".", "--steps", 1, "--overwrite"),
        "resume": _finetune(sd_model, world, ".", "--steps", 1, "--resume"),
        "home": _finetune(sd_model, world, "~", "--steps", 1, "--overwrite"),
        "root": _finetune(sd_model, world, "/", "--steps", 1, "--overwrite"),
        "train-reward": _train_reward(world, tr, "--steps", 1, "--overwrite"),
        "demo": ["demo", "--output", ".", "--steps", 1, "--overwrite"],
        "compare": ["demo", "--compare", "--output", ".", "--steps", 1, "--overwrite"],
    }
    for case, args in variants.items():
        capsys.readouterr()
        assert main([str(a) for a in args]) == 2, case
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "holds files that no rewardtune" in err[0], (case, err)
        where = {"home": f"'{home}' holds (.bashrc, notes.txt)", "root": "'/' holds"}.get(case, "")
        assert where.replace(" holds (", " holds files that no rewardtune finetune run wrote (") in err[0], err[0]
    assert {p: _tree(p) for p in (ft, tr, home)} == before  # not a byte changed, not even a lock file left


def test_overwrite_removes_only_what_the_runs_wrote(sd_model, world, tmp_path, capsys):
    """A finished run in a folder the user keeps other things in: a start without flags is refused, --overwrite
    replaces the run and leaves the user's files; without the run record, the run's old files are unknown and
    even --overwrite is refused."""
    out = tmp_path / "run"
    assert main([str(a) for a in _finetune(sd_model, world, out, "--steps", 1)]) == 0
    (out / "notes.txt").write_text("the user's")
    (out / "my_data").mkdir()
    (out / "my_data" / "a.txt").write_text("the user's")
    capsys.readouterr()
    assert main([str(a) for a in _finetune(sd_model, world, out, "--steps", 1)]) == 2
    assert "holds a finished run (1 steps)" in capsys.readouterr().err
    assert main([str(a) for a in _finetune(sd_model, world, out, "--steps", 1, "--overwrite")]) == 0
    assert (out / "notes.txt").read_text() == "the user's" and (out / "my_data" / "a.txt").read_text() == "the user's"
    records = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert [(r["command"], r["action"]) for r in records] == [("finetune", "fresh"), ("finetune", "overwrite")]
    os.rename(out / "runs.jsonl", tmp_path / "runs.jsonl")  # the record gone: the run's files are no longer known
    capsys.readouterr()
    assert main([str(a) for a in _finetune(sd_model, world, out, "--steps", 1, "--overwrite")]) == 2
    err = capsys.readouterr().err
    assert "holds files that no rewardtune finetune run wrote" in err and "config.yaml" in err


# ----- 2. one run per directory, whatever happens to the lock file -----------------------------------------
HOLD = (
    "import sys, time\nfrom rewardtune.rundir import RunDir\nRunDir(sys.argv[1], command='finetune').lock().__enter__()\n"
    "print('locked', flush=True)\ntime.sleep(600)\n"
)


def test_a_deleted_lock_file_lets_no_second_run_in_and_the_running_one_stops(sd_model, world, tmp_path, capsys):
    """The repro of #21: with run A going, ``rm DIR/.rewardtune.lock`` let ``--overwrite`` in, and B removed A's
    checkpoints while A kept writing. Now the directory itself stays locked, so B is refused; and A, finding its
    lock file gone, stops writing and says so."""
    out = tmp_path / "shared"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out)], env=offline_env(), stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        (out / ".rewardtune.lock").unlink()  # what a cleanup script, rm -rf out/.* or rsync --delete does
        assert main([str(a) for a in _finetune(sd_model, world, out, "--steps", 1, "--overwrite")]) == 2
        line = capsys.readouterr().err.strip()
        assert "is in use by another run (its lock file names no process yet, or was removed)" in line, line
    finally:
        holder.kill()
        holder.wait()

    run_a = tmp_path / "a"
    a = subprocess.Popen(
        cli_command(*_finetune(sd_model, world, run_a, "--steps", 400, "--checkpoint-every", 1)),
        env=offline_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + HANG
        while not list((run_a / "checkpoints").glob("step_*")) and a.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        (run_a / ".rewardtune.lock").unlink()
        _, err = a.communicate(timeout=HANG)
    finally:
        a.kill()
    last = _refused(subprocess.CompletedProcess(a.args, a.returncode, "", err), "finetune")
    assert f"its lock file '{run_a / '.rewardtune.lock'}' was removed or replaced while this run was writing" in last
    stopped_at = int(last.split("stopped after step ")[1].split()[0])
    assert stopped_at < 400 and not (run_a / "summary.json").exists()
    steps = [c.name for c in sorted((run_a / "checkpoints").glob("step_*"))]
    assert steps and int(steps[-1].split("_")[1]) <= stopped_at  # nothing written after it noticed
    assert not (run_a / ".rewardtune.lock").exists()


# ----- 3. clean stops on SIGTERM and SIGINT ------------------------------------------------------------------
def _signal_in_training(args: list, out: Path, sig: int) -> subprocess.CompletedProcess:
    """Start ``rewardtune ARGS``, send ``sig`` once its first checkpoint is written (it is in its training loop
    then), and wait for it to end."""
    proc = subprocess.Popen(cli_command(*args), env=offline_env(), **PIPES)
    try:
        deadline = time.time() + HANG
        while not list((out / "checkpoints").glob("step_*")) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=HANG)
    finally:
        proc.kill()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def _stopped_at(res: subprocess.CompletedProcess, command: str, name: str, code: int) -> int:
    assert res.returncode == code, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert "Traceback" not in res.stderr and last.startswith(f"rewardtune {command}: stopped by {name} after step "), (
        last
    )
    assert "--resume to continue" in last
    return int(last.split("after step ")[1].split()[0])


def test_sigterm_and_sigint_stop_cleanly_and_resume_continues(sd_model, world, tmp_path):
    """SIGTERM (what Slurm and Kubernetes send first) killed the run: exit 143, the lock left, no checkpoint.
    Now the step ends, a checkpoint of it is written, the lock is released, the exit is 143 (130 for SIGINT)
    with one line, and --resume continues from that step -- for finetune and train-reward alike."""
    ft, tr = tmp_path / "ft", tmp_path / "tr"
    res = _signal_in_training(
        _finetune(sd_model, world, ft, "--steps", 2000, "--checkpoint-every", 2), ft, signal.SIGTERM
    )
    step = _stopped_at(res, "finetune", "SIGTERM", 143)
    assert 2 <= step < 2000 and f"checkpoint '{ft / 'checkpoints' / f'step_{step:06d}'}' written" in res.stderr
    assert (ft / "checkpoints" / f"step_{step:06d}" / "manifest.json").is_file() and not (
        ft / ".rewardtune.lock"
    ).exists()
    assert main([str(a) for a in _finetune(sd_model, world, ft, "--steps", step + 1, "--resume")]) == 0
    assert json.loads((ft / "summary.json").read_text())["steps"] == step + 1
    assert json.loads((ft / "runs.jsonl").read_text().splitlines()[-1])["from_step"] == step

    res = _signal_in_training(_train_reward(world, tr, "--steps", 5000, "--checkpoint-every", 3), tr, signal.SIGINT)
    step = _stopped_at(res, "train-reward", "SIGINT (Ctrl-C)", 130)
    assert 3 <= step < 5000 and (tr / "checkpoints" / f"step_{step:06d}" / "trainer_state.json").is_file()
    assert not (tr / ".rewardtune.lock").exists()
    assert main([str(a) for a in _train_reward(world, tr, "--steps", step + 1, "--resume")]) == 0
    assert json.loads((tr / "metrics.json").read_text())["start_step"] == step

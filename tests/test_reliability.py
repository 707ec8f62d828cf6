"""Issue #11, the run-directory half, through the real commands on tiny real models (offline, CPU): planted
pickles never run, one run per output directory (real processes), the output-directory table's rows that
failed before, a resume that refuses changed settings, a damaged latest checkpoint, a failed start that
leaves nothing behind. The table itself, row by row for the three layouts, is in test_rundir.py."""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from rewardtune import runstate
from rewardtune.data.synthetic import WORDS, make_pick_high
from rewardtune.demo.build import MODELS_DIR
from rewardtune.errors import UserError
from rewardtune.finetune import run_finetune
from rewardtune.reward_training import TrainRewardConfig, train_reward
from rewardtune.rundir import RunDir
from rewardtune.testing import SMALL_IMAGE_CLIP, save_tiny_clip
from rewardtune.testing.cli import HANG_SECONDS, cli_command, offline_env, one_line_error, run_cli

ENV = offline_env()
QUIET = dict(num_workers=0, progress=False, eval_split="", batch_size=4, lr=1e-3)


def rewardtune(*args, wait: bool = True):
    if not wait:
        return subprocess.Popen(cli_command(*args), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return run_cli(*args)


class _Payload:
    """Unpickling this creates ``marker``: the code a planted checkpoint file would run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def payload(marker: Path) -> bytes:
    data = pickle.dumps(_Payload(marker))
    probe = marker.with_name("probe")
    pickle.loads(pickle.dumps(_Payload(probe))).close()  # the payload is live: unpickled, it makes its file
    assert probe.is_file()
    probe.unlink()
    return data


PICKLE_NAMES = ["optimizer.bin", "scheduler.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl", "evil.pkl"]


def plant(directory: Path, marker: Path, every_file: bool) -> None:
    """Put a payload in each of accelerate's pickle file names; with ``every_file``, in every file as well."""
    bad = payload(marker)
    for ckpt in sorted((directory / "checkpoints").glob("step_*")):
        if every_file:
            for f in ckpt.iterdir():
                f.write_bytes(bad)
        for name in PICKLE_NAMES:
            (ckpt / name).write_bytes(bad)


# ----- two tiny finished runs, each with checkpoints at steps 1 and 2 (the time cadence) ------------------
@pytest.fixture(scope="module")
def reward_world(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("reward_world")
    save_tiny_clip(
        d / "backbone",
        seed=0,
        words=WORDS,
        **SMALL_IMAGE_CLIP,
    )
    make_pick_high(d / "data", {"train": 16}, size=32, formats=("parquet",))
    cfg = dict(stage="ict", data=str(d / "data"), backbone=str(d / "backbone"), **QUIET)
    train_reward(TrainRewardConfig(output=str(d / "run"), steps=2, checkpoint_every=0, checkpoint_minutes=1e-9, **cfg))
    return {"cfg": cfg, "run": d / "run", "data": d / "data", "backbone": d / "backbone"}


@pytest.fixture(scope="module")
def ft_run(sd_model, tmp_path_factory, tiny_cfg, brightness) -> Path:
    out = tmp_path_factory.mktemp("ft") / "run"
    run_finetune(
        tiny_cfg(sd_model, out, steps=2, checkpoint_every=0, checkpoint_minutes=1e-9, eval_size=2), reward=brightness()
    )
    return out


def _copy(run: Path, tmp_path: Path, name: str) -> Path:
    return Path(shutil.copytree(run, tmp_path / name))


def test_time_cadence_checkpoints_and_no_pickle_in_any_checkpoint(reward_world, ft_run):
    for run in (reward_world["run"], ft_run):
        ckpts = RunDir(run).checkpoints()
        assert [c.step for c in ckpts] == [1, 2]  # --checkpoint-every 0 --checkpoint-minutes 1e-9: after each step
        for c in ckpts:
            names = sorted(p.name for p in c.path.iterdir())
            assert all(n.endswith((".safetensors", ".json")) for n in names), names
            assert "random_states_0.safetensors" in names and "manifest.json" in names


# ----- case 1: planted pickles --------------------------------------------------------------------
def test_train_reward_resume_never_runs_planted_pickles(reward_world, tmp_path, capsys):
    marker = tmp_path / "pwned"
    every = _copy(reward_world["run"], tmp_path, "every")
    plant(every, marker, every_file=True)
    res = rewardtune(
        "train-reward",
        "--data",
        reward_world["data"],
        "--backbone",
        reward_world["backbone"],
        "--output",
        every,
        "--resume",
        "--steps",
        3,
        "--num-workers",
        0,
        "--no-progress",
        "--batch-size",
        4,
        "--eval-split",
        "",
    )
    last = one_line_error(res, "train-reward")
    assert "no intact checkpoint" in last and "step_000002: " in last and "--overwrite" in last
    assert not marker.exists()
    # pickles beside an intact checkpoint are never read: the run resumes from the safe files
    extra = _copy(reward_world["run"], tmp_path, "extra")
    plant(extra, marker, every_file=False)
    m = train_reward(TrainRewardConfig(output=str(extra), steps=3, resume=True, **reward_world["cfg"]))
    assert (m["start_step"], m["step"]) == (2, 3) and not marker.exists()
    assert "never loaded" in capsys.readouterr().err


def test_finetune_resume_never_runs_planted_pickles_and_records_allowed_changes(
    ft_run, sd_model, tmp_path, tiny_cfg, brightness, capsys
):
    marker = tmp_path / "pwned"
    every = _copy(ft_run, tmp_path, "every")
    plant(every, marker, every_file=True)
    res = rewardtune(
        "finetune",
        "--model",
        sd_model,
        "--output",
        every,
        "--resume",
        "--steps",
        3,
        "--resolution",
        32,
        "--sample-steps",
        3,
        "--trust-pickle",
    )
    last = one_line_error(res, "finetune")
    assert "no intact checkpoint" in last and not marker.exists()
    extra = _copy(ft_run, tmp_path, "extra")
    plant(extra, marker, every_file=False)
    summary = run_finetune(
        tiny_cfg(sd_model, extra, steps=3, resume=True, eval_size=2, lr=1e-2, seed=5), reward=brightness()
    )
    assert summary["steps"] == 3 and not marker.exists()
    cap = capsys.readouterr()
    assert (
        "never loaded" in cap.err
        and "with changed settings: --steps 2 -> 3, --lr 0.03 -> 0.01, --seed 0 -> 5" in cap.out
    )
    history = [json.loads(x) for x in (extra / "runs.jsonl").read_text().splitlines()]
    assert [h["action"] for h in history] == ["fresh", "continue"]
    assert yaml.safe_load((extra / "config.yaml").read_text())["resume"] is False
    assert history[-1]["changed"] == {
        "--steps": [2, 3],
        "--lr": [0.03, 0.01],
        "--seed": [0, 5],
        "--checkpoint-minutes": [1e-9, 0.0],
    }


def test_pickled_checkpoints_resume_only_with_trust_pickle(ft_run, reward_world, sd_model, tmp_path, tiny_cfg):
    """A checkpoint keeping its state in pickles (accelerate's, as before 0.1 or under FSDP/DeepSpeed) is refused
    with the file named and the flag that allows it."""
    marker = tmp_path / "pwned"
    for name, run in (("ft", ft_run), ("reward", reward_world["run"])):
        legacy = _copy(run, tmp_path, name)
        for ckpt in RunDir(legacy).checkpoints():
            state = json.loads((ckpt.path / "trainer_state.json").read_text())
            state.pop("format")
            (ckpt.path / "trainer_state.json").write_text(json.dumps(state))
            (ckpt.path / "manifest.json").unlink()
            (ckpt.path / "optimizer.safetensors").unlink()
            (ckpt.path / "optimizer.bin").write_bytes(payload(marker))
        with pytest.raises(
            UserError,
            match=r"keeps its state in pickle files \(e.g. '.*step_000002/optimizer.bin'\), which "
            r"can run code .*pass --trust-pickle only if you wrote it yourself",
        ):
            if name == "ft":
                run_finetune(tiny_cfg(sd_model, legacy, steps=3, resume=True))
            else:
                train_reward(TrainRewardConfig(output=str(legacy), steps=3, resume=True, **reward_world["cfg"]))
    assert not marker.exists()


# ----- case 3: one run per output directory ------------------------------------------------------------
HOLD = (
    "import sys, time\nfrom rewardtune.rundir import RunDir\nlock = RunDir(sys.argv[1], command='finetune').lock()\n"
    f"lock.__enter__()\nprint('locked', flush=True)\ntime.sleep({HANG_SECONDS})\n"
)  # held until the test kills it


def test_a_second_run_is_refused_naming_the_holder_and_a_killed_holders_lock_is_taken_over(
    sd_model, reward_world, tmp_path
):
    out = tmp_path / "shared"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        runs = {
            "finetune": rewardtune("finetune", "--model", sd_model, "--output", out, "--steps", 1, wait=False),
            "train-reward": rewardtune(
                "train-reward",
                "--data",
                reward_world["data"],
                "--backbone",
                reward_world["backbone"],
                "--output",
                out,
                "--steps",
                1,
                wait=False,
            ),
            "demo": rewardtune("demo", "--output", out, "--steps", 1, wait=False),
        }
        for command, proc in runs.items():
            stdout, stderr = proc.communicate(timeout=HANG_SECONDS)
            last = one_line_error(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), command)
            assert f"is in use by another run (pid {holder.pid} on " in last and "finetune started" in last
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert json.loads((out / ".rewardtune.lock").read_text())["pid"] == holder.pid  # left behind by the killed run
    printed = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys\nfrom rewardtune.rundir import RunDir\n"
            "with RunDir(sys.argv[1], command='finetune').lock(): pass\n",
            str(out),
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=HANG_SECONDS,
    )
    assert printed.returncode == 0 and f"took over the lock of pid {holder.pid}" in printed.stdout
    assert not (out / ".rewardtune.lock").exists()


# ----- case 4 and the table through the commands ---------------------------------------------------------
def test_a_finished_reward_model_is_not_replaced_without_overwrite(reward_world, tmp_path, capsys):
    """Issue #11 case 4: a finished run with no checkpoint (--steps below --checkpoint-every) was replaced silently."""
    done = _copy(reward_world["run"], tmp_path, "done")
    shutil.rmtree(done / "checkpoints")
    model = (done / "model.safetensors").read_bytes()
    res = rewardtune(
        "train-reward",
        "--data",
        reward_world["data"],
        "--backbone",
        reward_world["backbone"],
        "--output",
        done,
        "--steps",
        1,
        "--num-workers",
        0,
        "--no-progress",
    )
    assert "holds a finished run (2 steps); pass --overwrite to replace it" in one_line_error(res, "train-reward")
    assert (done / "model.safetensors").read_bytes() == model
    with pytest.raises(UserError, match="kept no checkpoint to continue from; pass --overwrite"):
        train_reward(TrainRewardConfig(output=str(done), steps=3, resume=True, **reward_world["cfg"]))
    m = train_reward(
        TrainRewardConfig(output=str(done), steps=1, overwrite=True, checkpoint_every=0, **reward_world["cfg"])
    )
    assert m["step"] == 1 and (done / "model.safetensors").read_bytes() != model
    assert yaml.safe_load((done / "config.yaml").read_text())["overwrite"] is False  # re-run from it: no surprise
    # a job script that always passes --resume survives a kill before the first checkpoint
    fresh = train_reward(TrainRewardConfig(output=str(tmp_path / "new"), steps=1, resume=True, **reward_world["cfg"]))
    assert fresh["start_step"] == 0 and "no checkpoint in" in capsys.readouterr().out


def test_finetune_finished_resume_at_the_same_steps_has_nothing_to_do(
    ft_run, sd_model, tiny_cfg, tmp_path, brightness, capsys
):
    done = _copy(ft_run, tmp_path, "done")
    summary = run_finetune(tiny_cfg(sd_model, done, steps=2, resume=True))
    assert summary["nothing_to_do"] and summary["steps"] == 2
    assert "nothing to do: the run in" in capsys.readouterr().out
    # killed after its last checkpoint, before summary.json: --resume only redoes the end, evaluation logged once
    (done / "summary.json").unlink()
    again = run_finetune(tiny_cfg(sd_model, done, steps=2, resume=True, eval_size=2), reward=brightness())
    assert again["steps"] == 2 and again["after"] == summary["after"]
    rows = [json.loads(x) for x in (done / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in rows] == [("eval", 0), ("train", 1), ("train", 2), ("eval", 2)]


# ----- case 5: resume checks what it resumes ---------------------------------------------------------------
def test_resume_refuses_settings_that_change_what_the_weights_mean(
    ft_run, sd_model, reward_world, tmp_path, tiny_cfg, brightness
):
    run = _copy(ft_run, tmp_path, "run")
    other = Path(shutil.copytree(sd_model, tmp_path / "other_model"))  # same architecture, other weights
    weights = other / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-8:] = bytes(8)
    weights.write_bytes(bytes(data))
    with pytest.raises(UserError) as err:
        run_finetune(
            tiny_cfg(
                other, run, steps=3, resume=True, lora_alpha=8.0, method="refl", reward="ict", train_text_encoder=True
            ),
            reward=brightness(),
        )
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("--resume: --model is another model (1 file(s) differ, e.g. unet/")
    for part in (
        "--lora-alpha 4.0 (checkpoint) vs 8.0 (now)",
        "--train-text-encoder False (checkpoint) vs True (now)",
        "--reward icthp (Brightness passed in) (checkpoint) vs ict (Brightness passed in) (now)",
        "--method draft-k (checkpoint) vs refl (now)",
    ):
        assert part in msg
    # --train-text-encoder on resume was a traceback
    res = rewardtune(
        "finetune",
        "--model",
        sd_model,
        "--output",
        run,
        "--resume",
        "--steps",
        3,
        "--resolution",
        32,
        "--sample-steps",
        3,
        "--lora-rank",
        4,
        "--lora-alpha",
        4,
        "--k",
        2,
        "--train-text-encoder",
    )
    assert "--train-text-encoder False (checkpoint) vs True (now)" in one_line_error(res, "finetune")
    reward = _copy(reward_world["run"], tmp_path, "reward")
    with pytest.raises(
        UserError, match=r"--freeze-ratio 0.0 \(checkpoint\) vs 0.5 \(now\); --freeze-embeddings False"
    ):
        train_reward(
            TrainRewardConfig(
                output=str(reward),
                steps=3,
                resume=True,
                freeze_ratio=0.5,
                freeze_embeddings=True,
                **reward_world["cfg"],
            )
        )


# ----- case 6: a damaged latest checkpoint ----------------------------------------------------------------
def test_a_truncated_random_state_falls_back_to_the_checkpoint_before(
    ft_run, sd_model, tmp_path, tiny_cfg, brightness, capsys
):
    run = _copy(ft_run, tmp_path, "run")
    rng = run / "checkpoints" / "step_000002" / "random_states_0.safetensors"
    rng.write_bytes(rng.read_bytes()[:-100])
    summary = run_finetune(tiny_cfg(sd_model, run, steps=3, resume=True, eval_size=2), reward=brightness())
    assert summary["steps"] == 3
    err = capsys.readouterr().err
    assert "random_states_0.safetensors has" in err and "resumes from 'step_000001' (step 1)" in err
    assert (run / "checkpoints" / "step_000002.damaged").is_dir()
    assert [c.step for c in RunDir(run).checkpoints()] == [1, 3]  # steps 2 and 3 trained from step 1


# ----- issue #21: contents that fit their manifest but not the run ---------------------------------------------
def _remanifest(ckpt: Path) -> None:
    """Write the checkpoint's manifest anew over its (damaged) files, as a checkpoint whose bytes all arrived."""
    files = {
        str(f.relative_to(ckpt)): {"size": f.stat().st_size, "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
        for f in sorted(ckpt.rglob("*"))
        if f.is_file() and f.name != "manifest.json"
    }
    (ckpt / "manifest.json").write_text(json.dumps({"files": files}))


def _edit_tree(path: Path, edit) -> None:
    tree = runstate.read_tree(path, "test")
    runstate.write_tree(edit(tree) or tree, path, "test")


def _edit_state(ckpt: Path, text: str) -> None:
    (ckpt / "trainer_state.json").write_text(text)


def _first_state(tree: dict) -> dict:
    return next(iter(tree["state"].values()))


FT_DAMAGE = {  # step -> (what is done to it, what the warning line names)
    7: (lambda c: _edit_tree(c / "optimizer.safetensors", lambda t: _first_state(t).update(exp_avg=torch.zeros(3, 5))),
        "optimizer.safetensors: state[0].exp_avg has shape (3, 5)"),
    6: (lambda c: _edit_tree(c / "optimizer.safetensors", lambda t: _first_state(t).update(
        exp_avg_sq=_first_state(t)["exp_avg_sq"].long())), "state[0].exp_avg_sq has dtype torch.int64"),
    5: (lambda c: _edit_tree(c / "random_states_0.safetensors", lambda t: t.update(torch=t["torch"].float())),
        "random_states_0.safetensors: 'torch' is a torch.float32 tensor"),
    4: (lambda c: _edit_tree(c / "random_states_0.safetensors", lambda t: t.update(python="seed")),
        "'python' is not a (version, state, gauss) triple"),
    3: (lambda c: _edit_state(c, (c / "trainer_state.json").read_text().replace('"skipped_steps": 0', '"skipped_steps": "0"')),
        "field 'skipped_steps' is \"0\", not int"),
    2: (lambda c: _edit_state(c, re.sub(r'"reward": [-0-9.e]+', '"reward": NaN', (c / "trainer_state.json").read_text())),
        "trainer_state.json is unreadable"),
}  # fmt: skip


def test_checkpoint_contents_that_do_not_fit_are_set_aside_and_the_newest_that_fits_is_used(
    sd_model, tmp_path, tiny_cfg, brightness, capsys
):
    """Issue #21: a checkpoint whose manifest is valid but whose contents are wrong -- optimizer tensors of another
    shape or dtype, a random state of the wrong dtype or type, trainer_state.json fields of the wrong type or NaN --
    gave six tracebacks. Each is now damaged like a corrupt file: one warning line naming the file and the field,
    set aside, and the newest checkpoint that fits is resumed from."""
    run = tmp_path / "run"
    cfg = dict(checkpoint_every=1, checkpoints_keep=8, eval_size=2)
    run_finetune(tiny_cfg(sd_model, run, steps=7, **cfg), reward=brightness())
    (run / "summary.json").unlink()  # a run in progress again
    lora = run / "checkpoints" / "step_000001" / "pytorch_lora_weights.safetensors"
    for step, (damage, _) in FT_DAMAGE.items():
        ckpt = run / "checkpoints" / f"step_{step:06d}"
        damage(ckpt)
        _remanifest(ckpt)
    capsys.readouterr()
    summary = run_finetune(tiny_cfg(sd_model, run, steps=7, resume=True, **cfg), reward=brightness())
    assert summary["steps"] == 7 and "before" in summary
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning: checkpoint" in line]
    assert len(warnings) == len(FT_DAMAGE), warnings
    for step, (_, named) in FT_DAMAGE.items():
        (line,) = [w for w in warnings if f"step_{step:06d}'" in w]
        assert "is damaged (" in line and named in line, (named, line)
        assert (run / "checkpoints" / f"step_{step:06d}.damaged").is_dir()
    assert lora.is_file() and json.loads((run / "runs.jsonl").read_text().splitlines()[-1])["from_step"] == 1


def test_a_lora_of_another_shape_in_a_checkpoint_falls_back(ft_run, sd_model, tmp_path, tiny_cfg, brightness, capsys):
    run = _copy(ft_run, tmp_path, "run")
    (run / "summary.json").unlink()
    ckpt = run / "checkpoints" / "step_000002"
    lora = load_file(ckpt / "pytorch_lora_weights.safetensors")
    key = next(k for k, v in lora.items() if "lora" in k and v.dim() == 2)
    lora[key] = torch.zeros(lora[key].shape[0] + 1, lora[key].shape[1])
    save_file(lora, ckpt / "pytorch_lora_weights.safetensors")
    _remanifest(ckpt)
    assert run_finetune(tiny_cfg(sd_model, run, steps=2, resume=True, eval_size=2), reward=brightness())["steps"] == 2
    err = capsys.readouterr().err
    assert "checkpoint" in err and "step_000002' is damaged (" in err and "has shape" in err
    assert (run / "checkpoints" / "step_000002.damaged").is_dir()


def test_train_reward_checkpoint_contents_are_checked(reward_world, tmp_path, capsys):
    """The same for train-reward: its model weights, LR scheduler state and data fields."""
    run = _copy(reward_world["run"], tmp_path, "run")  # checkpoints at steps 1 and 2
    (run / "metrics.json").unlink()
    ckpt = run / "checkpoints" / "step_000002"
    model = load_file(ckpt / "model.safetensors")
    key = next(k for k, v in model.items() if v.dim() == 2)
    model[key] = model[key][:, :-1].contiguous()
    save_file(model, ckpt / "model.safetensors")
    _remanifest(ckpt)
    capsys.readouterr()
    m = train_reward(TrainRewardConfig(output=str(run), steps=2, resume=True, **reward_world["cfg"]))
    assert m["start_step"] == 1
    err = capsys.readouterr().err
    assert (
        f"model.safetensors tensor {key} has shape" in err and (run / "checkpoints" / "step_000002.damaged").is_dir()
    )
    for damage, named in (
        (lambda c: _edit_tree(c / "scheduler.json", lambda t: t.update(last_epoch="1")), "scheduler.json: 'last_epoch'"),
        (lambda c: _edit_state(c, (c / "trainer_state.json").read_text().replace('"sampler_seed": ', '"sampler_seed": "x", "was": ')),
         "field 'data.sampler_seed' is \"x\""),
    ):  # fmt: skip
        broken = _copy(reward_world["run"], tmp_path, f"b{len(named)}")
        (broken / "metrics.json").unlink()
        damage(broken / "checkpoints" / "step_000002")
        _remanifest(broken / "checkpoints" / "step_000002")
        capsys.readouterr()
        assert (
            train_reward(TrainRewardConfig(output=str(broken), steps=2, resume=True, **reward_world["cfg"]))[
                "start_step"
            ]
            == 1
        )
        assert named in capsys.readouterr().err


# ----- case 9: a failed start leaves nothing behind ---------------------------------------------------------
def test_a_failed_start_leaves_nothing_behind(sd_model, reward_world, tmp_path, tiny_cfg):
    if not (MODELS_DIR / "pipeline" / "model_index.json").is_file():
        pytest.skip("bundled demo models missing")
    out = tmp_path / "demo"
    res = rewardtune(
        "demo",
        "--output",
        out,
        "--steps",
        1,
        "--lora-targets",
        "no_such_module",
        "--eval-size",
        2,
        "--train-prompts",
        2,
    )
    assert "--lora-targets no_such_module" in one_line_error(res, "demo")
    assert not out.exists()  # no prompts_*.txt, no finetune/: the next run needs no --overwrite
    with pytest.raises(UserError, match="does not exist"):
        run_finetune(tiny_cfg(tmp_path / "no_model", tmp_path / "ft"))
    with pytest.raises(UserError):
        train_reward(
            TrainRewardConfig(output=str(tmp_path / "tr"), steps=1, **{**reward_world["cfg"], "data": str(tmp_path)})
        )
    assert not (tmp_path / "ft").exists() and not (tmp_path / "tr").exists()

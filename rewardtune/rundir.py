"""The output directory of a training run, shared by ``train-reward``, ``finetune`` and ``demo``: checkpoint
names and listing, rotation, the lock that keeps one run per directory, what a run does with what it finds
there (start, resume, continue, nothing to do, refuse), checkpoints written whole with a manifest and
verified before use, the comparison of a resumed run's settings with its checkpoint's, the checkpoint
cadence, and the reset of accelerate's process-wide state between runs in one process.

Layout: ``<output>/checkpoints/step_000123/`` (``step-123/`` of train-reward before 0.1 is still found),
each complete one holding ``trainer_state.json`` and ``manifest.json`` (size and sha256 of every file);
written into ``.step_000123.tmp/`` and renamed. ``<output>/.rewardtune.lock`` is held while a run lives;
``<output>/runs.jsonl`` records each start and resume. The table of what a run does with each state of the
directory is in docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import fnmatch
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

from . import jsonio, stops
from .config import config_to_yaml
from .errors import UserError
from .sources import atomic_write_text, writing

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"
LOCK = ".rewardtune.lock"
HISTORY = "runs.jsonl"
LOCK_LOST = 1000  # RunDir.interruption's answer when the lock was lost (signal numbers are below)
SAFE_FORMAT = "safe"  # runstate.SAFE, repeated so that this module imports without torch's state code
_STEP = re.compile(r"^step[_-](\d+)$")  # step_000123; step-123 is what train-reward wrote before
# what a run writes in its checkpoints directory: complete, being written (.tmp), replaced (.old), set aside
_CHECKPOINT_ENTRY = re.compile(r"^(\.?step[_-]\d+(\.tmp|\.old)?|step[_-]\d+\.damaged)$")
# Settings a resumed run may change; every other difference is recorded (the fixed ones refuse).
_NOT_COMPARED = ("resume", "overwrite", "output", "progress")


class Checkpoint(NamedTuple):
    step: int
    path: Path


class Start(NamedTuple):
    """What a run does with its output directory (``RunDir.plan``, then ``RunDir.select``). ``action``: ``fresh`` (from step 0),
    ``overwrite`` (from step 0, the old run's files removed as it starts), ``resume`` (a run in progress,
    from ``checkpoint``), ``continue`` (a finished run, further, from ``checkpoint``), ``done`` (a finished
    run already at ``--steps``: nothing to do; ``record`` is its finished record)."""

    action: str
    checkpoint: Checkpoint | None = None
    state: dict = {}
    record: dict | None = None
    damaged: tuple = ()
    older: tuple = ()  # the checkpoints before ``checkpoint``, newest first, not yet verified (``RunDir.select``)

    @property
    def path(self) -> Path | None:
        return self.checkpoint.path if self.checkpoint is not None else None

    @property
    def step(self) -> int:
        return self.checkpoint.step if self.checkpoint is not None else 0


def checkpoint_name(step: int) -> str:
    """The directory name of the checkpoint after ``step`` optimizer steps (sorts by name up to 999999)."""
    return f"step_{step:06d}"


def is_main_process() -> bool:
    """The process that owns the output directory: global rank 0 (``RANK`` is set by accelerate/torchrun)."""
    return int(os.environ.get("RANK", "0")) == 0


class RunDir:
    """One run's output directory. ``who`` starts the error messages (``"train-reward: "``, or ``""``);
    ``command`` names the run in printed lines and in the lock. What makes a run of this command:
    ``finished`` (the file written last, whose ``done_key`` is the steps done), ``outputs`` (files a run
    would replace: present without a finished record or checkpoint, they are not overwritten without
    --overwrite), ``scratch`` (the run's own bookkeeping, removed when a run starts from step 0) and
    ``clear`` (more of its files, removed by --overwrite); all glob patterns under the root.

    Every process may read; the main process writes (``write_checkpoint`` is the exception: every process
    takes part in it)."""

    def __init__(
        self,
        root: str | Path,
        who: str = "",
        *,
        command: str = "",
        finished: str = "summary.json",
        done_key: str = "steps",
        outputs: tuple = (),
        scratch: tuple = (),
        clear: tuple = (),
        checkpoints_dir: str | Path | None = None,
        state_types: dict | None = None,
    ):
        self.root = Path(root).expanduser()
        self.who, self.command = who, command or who.rstrip(": ") or "run"
        self.finished, self.done_key = finished, done_key
        self.outputs, self.scratch, self.clear = tuple(outputs), tuple(scratch), tuple(clear)
        self._checkpoints_dir = Path(checkpoints_dir) if checkpoints_dir is not None else None
        self.state_types = {**STATE_TYPES, **(state_types or {})}
        self.settings: dict | None = None  # set by ``begin``; stored in every checkpoint
        self.lock_held: RunLock | None = None  # while this process holds the directory's lock

    @property
    def checkpoints_dir(self) -> Path:
        return self._checkpoints_dir or self.root / CHECKPOINTS

    def checkpoint_dir(self, step: int) -> Path:
        return self.checkpoints_dir / checkpoint_name(step)

    def checkpoints(self) -> list[Checkpoint]:
        """Complete checkpoints (those holding ``trainer_state.json``), oldest first."""
        found = []
        if self.checkpoints_dir.is_dir():
            for d in self.checkpoints_dir.iterdir():
                m = _STEP.match(d.name)
                if m and (d / STATE_FILE).is_file():
                    found.append(Checkpoint(int(m.group(1)), d))
        return sorted(found)

    def latest(self) -> Checkpoint | None:
        found = self.checkpoints()
        return found[-1] if found else None

    # ----- messages ---------------------------------------------------------------------------
    def say(self, text: str) -> None:
        if is_main_process():
            print(f"{self.command}: {text}", flush=True)

    def warn(self, text: str) -> None:
        if is_main_process():
            print(f"{self.command}: warning: {text}", file=sys.stderr, flush=True)

    # ----- one run per directory --------------------------------------------------------------
    def lock(self) -> RunLock:
        """A context manager holding ``<root>/.rewardtune.lock`` for the run's life (main process only)."""
        return RunLock(self)

    # ----- what a run does with the directory it finds ----------------------------------------
    def finished_record(self) -> dict | None:
        """The finished run's record (``{}`` when unreadable), or None when no run finished here."""
        path = self.root / self.finished
        if not path.is_file():
            return None
        try:
            record = jsonio.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}

    # ----- what rewardtune wrote here (runs.jsonl is the record) -------------------------------
    def layout(self) -> tuple[str, ...]:
        """Top-level glob patterns of everything a run of this command writes in its directory (besides its
        record ``runs.jsonl`` and its lock)."""
        names = [self.finished, *self.outputs, *self.scratch, *self.clear, "config.yaml"]
        if self.checkpoints_dir.is_relative_to(self.root):
            names.append(self.checkpoints_dir.relative_to(self.root).parts[0])
        return tuple(dict.fromkeys(names))

    def records(self) -> list[dict]:
        """The run records of this command in ``runs.jsonl`` (one line per start; a line of an older version
        names no command and counts as this one's). A file that is not a run record gives none."""
        path = self.root / HISTORY
        try:
            lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
            records = [json.loads(line) for line in lines if line.strip()]
        except (OSError, ValueError):
            return []
        if not all(isinstance(r, dict) and "time" in r and "action" in r for r in records):
            return []
        return [r for r in records if r.get("command", self.command) == self.command]

    def survey(self) -> tuple[list[str], list[str]]:
        """(what runs of this command wrote, what they did not) among the directory's top-level entries, each
        sorted. Written by a run: a name matching the layout one of its records claims (or that name plus
        ``.tmp``, an atomic write cut short), and ``runs.jsonl`` itself when it holds such a record. Anything
        else -- a user's files, another command's run -- is not this command's to replace or remove."""
        if not self.root.is_dir():
            return [], []
        records = self.records()
        claims = {p for r in records for p in (r["owns"] if isinstance(r.get("owns"), list) else self.layout())}
        owned, foreign = [], []
        for entry in sorted(self.root.iterdir(), key=lambda e: e.name):
            name = entry.name
            if name == LOCK:
                continue
            mine = bool(records) if name == HISTORY else _matches(name, claims)
            (owned if mine else foreign).append(name)
        return owned, foreign

    def _colliding(self, names: list[str]) -> list[str]:
        """Those of ``names`` that a run of this command would write over."""
        return [n for n in names if _matches(n, self.layout())]

    def _shown(self, names: list[str]) -> str:
        shown = [n + ("/" if (self.root / n).is_dir() else "") for n in names[:4]]
        return ", ".join(shown) + (f" and {len(names) - 4} more" if len(names) > 4 else "")

    def refuse_foreign(self) -> None:
        """Refuse a directory that holds files and no record of a run of this command: whatever the flags, a
        run never writes into it (``--output .`` in a project folder, ``~``, ``/``). Checked before the lock
        file is written, so such a directory is left exactly as it was."""
        if self.records() or not self.root.is_dir():
            return
        _, foreign = self.survey()
        if foreign:
            raise UserError(
                f"{self.who}--output '{self.root}' holds files that no rewardtune {self.command} run wrote "
                f"({self._shown(foreign)}); a run writes only into a new or empty directory or one of its own "
                f"runs: choose another --output"
            )

    def refuse_colliding(self) -> tuple[list[str], list[str]]:
        """Refuse a directory with files that a run of this command writes but did not write here (whatever
        the flags: nothing is ever written over them); returns ``survey()``."""
        self.refuse_foreign()
        owned, foreign = self.survey()
        colliding = self._colliding(foreign)
        if colliding:
            raise UserError(
                f"{self.who}--output '{self.root}' holds {self._shown(colliding)}, which a {self.command} run "
                f"writes but no {self.command} run wrote here; move them away or choose another --output "
                f"(nothing was changed)"
            )
        return owned, foreign

    def plan(self, resume: bool, overwrite: bool, steps: int, trust_pickle: bool = False) -> Start:
        """Decide from what the directory holds and the flags; the table in docs/reliability.md. Only what runs
        of this command wrote counts, and only that is ever replaced or removed. Refusals are one-line
        ``UserError``s; nothing is written here (``begin`` does, once the run is built)."""
        where = f"--output '{self.root}'"
        if resume and overwrite:
            raise UserError(
                f"{self.who}--resume continues the run in '{self.root}' and --overwrite starts it over; pass one of them"
            )
        owned, foreign = self.refuse_colliding()
        if overwrite:
            return Start("overwrite")
        record = self.finished_record() if self.finished in owned else None
        found = self.checkpoints() if self._checkpoints_owned(owned) else []
        if record is not None:
            done = _count(record.get(self.done_key))
            if record.get("stopped_early") and _count(record.get("steps_planned")) is not None and done is not None:
                done = max(done, record["steps_planned"])  # an early stop finished the run it planned
            shown = f"{done} steps" if done is not None else f"its {self.finished} is unreadable"
            if not resume:
                raise UserError(
                    f"{self.who}{where} holds a finished run ({shown}); pass --overwrite to replace it, "
                    f"--resume with a larger --steps to train it further, or choose a new --output"
                )
            if done is not None and steps <= done:
                return Start("done", record=record)
            if not found:
                raise UserError(
                    f"{self.who}--resume: the finished run in '{self.root}' kept no checkpoint to continue from; "
                    f"pass --overwrite to start over, or choose a new --output"
                )
            return self._pick(found, steps, trust_pickle)._replace(action="continue")
        if found:
            if not resume:
                raise UserError(
                    f"{self.who}{where} holds a run in progress (latest checkpoint: step {found[-1].step}); "
                    f"pass --resume to continue it, --overwrite to start over, or choose a new --output"
                )
            return self._pick(found, steps, trust_pickle)
        taken = [n for n in owned if _matches(n, self.outputs)]
        if taken:
            raise UserError(
                f"{self.who}{where} holds {', '.join(taken)} but no finished run or checkpoint of "
                f"'{self.command}'; pass --overwrite to replace them, or choose a new --output"
            )
        if foreign:  # besides a killed run's leftovers, files of someone else's: a start from 0 is not asked for
            raise UserError(
                f"{self.who}{where} holds files that no {self.command} run wrote ({self._shown(foreign)}); "
                f"pass --overwrite to start over (it removes only what runs of {self.command} wrote here), "
                f"or choose another --output"
            )
        if resume:
            self.say(f"--resume: no checkpoint in '{self.checkpoints_dir}' yet; starting from the beginning")
        return Start("fresh")

    def _checkpoints_owned(self, owned: list[str]) -> bool:
        if not self.checkpoints_dir.is_relative_to(self.root):
            return True  # a directory of its own, given by the caller
        return self.checkpoints_dir.relative_to(self.root).parts[0] in owned

    def _pick(self, found: list[Checkpoint], steps: int, trust_pickle: bool) -> Start:
        """The newest intact checkpoint (damaged newer ones are reported and set aside by ``begin``)."""
        damaged = []
        for ckpt in reversed(found):
            problem, state, extra = verify_checkpoint(ckpt, self.state_types)
            if problem is not None:
                damaged.append((ckpt, problem))
                continue
            if state.get("format") != SAFE_FORMAT and not trust_pickle:
                raise UserError(
                    f"{self.who}--resume: checkpoint '{ckpt.path}' keeps its state in pickle files "
                    f"(e.g. '{_pickled_file(ckpt.path)}'), which can run code when loaded ("
                    f"{_pickle_origin(state)}); pass --trust-pickle only if you wrote it yourself, "
                    f"or --overwrite to start over"
                )
            if ckpt.step > steps:
                raise UserError(
                    f"{self.who}--resume: the checkpoint is at step {ckpt.step}, past --steps {steps}; "
                    f"raise --steps to train further"
                )
            for bad, problem in damaged:
                self.warn(
                    f"checkpoint '{bad.path}' is damaged ({problem}); it is set aside as '{bad.path.name}.damaged' "
                    f"and the run resumes from '{ckpt.path.name}' (step {ckpt.step})"
                )
            if extra:
                self.warn(
                    f"ignoring {', '.join(extra)} in '{ckpt.path}': not written with the checkpoint (never loaded)"
                )
            if state.get("format") != SAFE_FORMAT and MANIFEST not in os.listdir(ckpt.path):
                self.warn(
                    f"checkpoint '{ckpt.path}' was written before manifests (not verified); loading its pickles "
                    f"as --trust-pickle allows"
                )
            older = tuple(c for c in reversed(found) if c.step < ckpt.step)
            return Start("resume", ckpt, state, damaged=tuple(bad for bad, _ in damaged), older=older)
        listed = "; ".join(f"{c.path.name}: {p}" for c, p in damaged)
        raise UserError(
            f"{self.who}--resume: no intact checkpoint in '{self.checkpoints_dir}' ({listed}); "
            f"pass --overwrite to start over, or choose a new --output"
        )

    def select(self, start: Start, check: Callable[[Path], str | None]) -> Start:
        """``start`` with the newest of its checkpoints whose contents fit the run built to load it: ``check(path)``
        says what does not (a tensor's shape or dtype, a field's type) or None. A checkpoint that does not fit is
        damaged like one that fails its manifest: one warning line naming the file and the field, set aside by
        ``begin``, and the one before it is tried. None fitting: a one-line error."""
        if start.checkpoint is None:
            return start
        damaged, candidates = list(start.damaged), [start.checkpoint, *start.older]
        for i, ckpt in enumerate(candidates):
            state = start.state
            if i:  # the older ones are verified only now, when they are needed
                problem, state, _ = verify_checkpoint(ckpt, self.state_types)
                if problem is not None:
                    self.warn(f"checkpoint '{ckpt.path}' is damaged ({problem}); it is set aside")
                    damaged.append(ckpt)
                    continue
                if state.get("format") != start.state.get("format"):
                    damaged.append(ckpt)
                    continue
            problem = check(ckpt.path)
            if problem is None:
                if i:
                    self.say(f"resuming from '{ckpt.path.name}' (step {ckpt.step}) instead")
                return start._replace(checkpoint=ckpt, state=state, damaged=tuple(damaged), older=())
            self.warn(
                f"checkpoint '{ckpt.path}' is damaged ({problem}); it is set aside as '{ckpt.path.name}.damaged'"
            )
            damaged.append(ckpt)
        raise UserError(
            f"{self.who}--resume: no checkpoint in '{self.checkpoints_dir}' fits this run (see the warnings above); "
            f"pass --overwrite to start over, or choose a new --output"
        )

    def check_settings(self, start: Start, settings: dict) -> dict:
        """Compare a resumed run's settings with its checkpoint's. ``settings``: ``fixed`` (flag -> value, the
        settings that change what the weights mean: any difference refuses, listed in one line) and ``config``
        (every option: differences are allowed, printed, and recorded by ``begin``). Returns the allowed
        changes as {flag: [checkpoint's, now]}."""
        if start.checkpoint is None:
            return {}
        saved = start.state.get("settings")
        if not isinstance(saved, dict):
            self.warn(f"checkpoint '{start.path}' records no settings (written before 0.1); they are not compared")
            return {}
        now = _plain(settings)
        before_fixed, before_cfg = saved.get("fixed") or {}, saved.get("config") or {}
        diffs = [
            _describe(flag, before_fixed.get(flag), value)
            for flag, value in now["fixed"].items()
            if before_fixed.get(flag) != value
        ]
        if diffs:
            raise UserError(
                f"{self.who}--resume: {'; '.join(diffs)}: these change what the checkpoint's weights mean; "
                f"resume with the checkpoint's values (in '{start.path / STATE_FILE}'), or start over with "
                f"--overwrite or a new --output"
            )
        changed = {
            _flag(k): [before_cfg.get(k), v]
            for k, v in now["config"].items()
            if k not in _NOT_COMPARED and k in before_cfg and before_cfg.get(k) != v
        }
        if changed:
            shown = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())
            self.say(f"resuming from step {start.step} with changed settings: {shown} (recorded in {HISTORY})")
        return changed

    def begin(self, start: Start, cfg, settings: dict, changed: dict | None = None) -> None:
        """The run is built and starts: clear what the plan replaces (only what runs of this command wrote), set
        damaged checkpoints aside, record the start in ``runs.jsonl`` (main process), with the layout it claims."""
        self.settings = _plain(settings)
        if not is_main_process():
            return
        owned, _ = self.survey()
        if start.action == "overwrite":  # the finished outputs and their config.yaml stay until the new run
            # replaces them (each written atomically): a new run that fails leaves them as they were
            self._remove_checkpoints()
            self._remove(owned, [self.finished, *[p for p in self.scratch if p != "config.yaml"]])
        elif start.action == "fresh":  # what is there is a killed run's: the plan refused anything else
            self._remove_checkpoints()
            keep = (*self.outputs, self.checkpoints_dir.name)  # (checkpoints: what they hold is sorted out above)
            self._remove(owned, [p for p in self.layout() if p not in keep])
        elif start.action == "continue":
            self._remove(owned, [self.finished])  # until it finishes again, the directory holds a run in progress
        for bad in start.damaged:
            aside = bad.path.with_name(bad.path.name + ".damaged")
            shutil.rmtree(aside, ignore_errors=True)
            bad.path.rename(aside)
        entry = {
            "time": _now(),
            "command": self.command,
            "action": start.action,
            "from_step": start.step,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "argv": sys.argv[1:],
            "changed": changed or {},
            "owns": list(self.layout()),
        }
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / HISTORY).open("a") as f:
            f.write(jsonio.dumps(entry) + "\n")
        # config.yaml is written with the run's outputs (its first checkpoint, the final model), so a run that
        # fails before any of them leaves the config.yaml of what the directory holds as it was

    def abandon(self) -> None:
        """Undo ``begin`` of a run from step 0 that failed before it trained (a failed start leaves nothing):
        its scratch files and config.yaml, and its line of runs.jsonl."""
        if not is_main_process():
            return
        owned, _ = self.survey()
        self._remove(owned, [*self.scratch, "config.yaml"])
        history = self.root / HISTORY
        if history.is_file():
            lines = history.read_text().splitlines(keepends=True)[:-1]
            atomic_write_text(history, "".join(lines)) if lines else history.unlink()

    def _remove(self, owned: list[str], patterns) -> None:
        """Remove the top-level entries matching ``patterns`` (or their ``.tmp``) among ``owned``, and nothing else."""
        for name in owned:
            if name != HISTORY and _matches(name, patterns):
                p = self.root / name
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)

    def _remove_checkpoints(self) -> None:
        """The checkpoints runs of this command wrote (complete, half-written, set aside), when their directory
        is theirs; anything else in it stays, and so does the directory then."""
        d = self.checkpoints_dir
        if not d.is_dir() or not self._checkpoints_owned(self.survey()[0]):
            return
        for entry in d.iterdir():
            if _CHECKPOINT_ENTRY.match(entry.name):
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        with contextlib.suppress(OSError):
            d.rmdir()  # only when empty

    # ----- stopping in the middle: a signal, or the lock lost ----------------------------------
    def interruption(self, accelerator=None) -> int:
        """Whether the run must stop after this step, the same answer on every process: 0 (go on), the number
        of a signal received (SIGTERM, SIGINT: see ``stops``), or ``LOCK_LOST`` (the main process found its
        lock file or directory removed or replaced)."""
        lock = self.lock_held
        code = LOCK_LOST if lock is not None and lock.problem() else (stops.requested() or 0)
        if accelerator is not None and getattr(accelerator, "num_processes", 1) > 1:
            flag = torch.tensor([float(code)], device=accelerator.device)
            code = int(accelerator.reduce(flag, "max").item())
        return code

    def stop(self, code: int, step: int, steps: int, checkpoint: Callable[[], None] | None) -> None:
        """Act on ``interruption``'s answer: on a signal, ``checkpoint()`` (None: checkpoints are off) and raise
        ``stops.Stopped`` with the line that says how to go on; with the lock lost, stop writing at once."""
        if code == LOCK_LOST:
            lock = self.lock_held
            problem = (lock.problem() if lock is not None else None) or "the main process lost the directory's lock"
            raise UserError(
                f"{self.who}{problem}; stopped after step {step} without writing more, so that two runs cannot mix "
                f"their files; make sure no other run uses it, then continue with --resume"
            )
        stops.clear()
        if checkpoint is not None:
            checkpoint()
            after = f"checkpoint '{self.checkpoint_dir(step)}' written: run the same command with --resume to continue"
        else:
            after = "no checkpoint written (--checkpoint-every and --checkpoint-minutes are 0): a new run starts from step 0"
        raise stops.Stopped(f"stopped by {stops.signal_name(code)} after step {step} of {steps}; {after}", code)

    # ----- checkpoints ------------------------------------------------------------------------
    def save_checkpoint(
        self, accelerator, step: int, state: dict, keep: int, save: Callable[[Path], str | None] | None = None
    ) -> Path:
        """``write_checkpoint`` into ``checkpoints/step_N`` (with the run's settings), then keep only the newest
        ``keep``. ``save(tmp)`` writes the state files on every process and returns their format. Every process calls it."""
        save = save or (lambda tmp: accelerator.save_state(str(tmp)))
        full = {"step": step, **state, **({"settings": self.settings} if self.settings is not None else {})}
        path = write_checkpoint(accelerator, self.checkpoint_dir(step), save, full)
        if accelerator.is_main_process:
            self.rotate(keep)
        accelerator.wait_for_everyone()
        return path

    def rotate(self, keep: int) -> None:
        """Delete all but the newest ``keep`` complete checkpoints."""
        for old in self.checkpoints()[:-keep]:
            shutil.rmtree(old.path, ignore_errors=True)

    # ----- files ------------------------------------------------------------------------------
    def write_text(self, name: str, text: str) -> Path:
        """Write ``<root>/<name>`` atomically (temp file, then rename; directories made as needed): a reader
        sees the old file or the new one, never half of one."""
        path = self.root / name
        atomic_write_text(path, text)
        return path

    def write_json(self, name: str, data) -> Path:
        return self.write_text(name, jsonio.dumps(data, indent=2))

    def write_config(self, cfg) -> Path:
        """The resolved config as ``config.yaml``, re-runnable with ``--config``; without ``resume`` and
        ``overwrite``, which act on a directory (a re-run from it never overwrites by surprise)."""

        if dataclasses.is_dataclass(cfg):
            names = {f.name for f in dataclasses.fields(cfg)}
            cfg = dataclasses.replace(cfg, **{k: False for k in ("resume", "overwrite") if k in names})
        return self.write_text("config.yaml", config_to_yaml(cfg))


class RunLock:
    """One run per directory. The main process holds an exclusive ``flock`` on the directory itself (no file
    in it can be deleted out from under the lock: ``rm out/.rewardtune.lock``, ``rm -rf out/.*`` and
    ``rsync --delete`` leave it in force) and on ``<root>/.rewardtune.lock``, which names the holder (pid,
    host, command, start time) and is the lock where a filesystem cannot lock directories. The kernel drops
    both when the process dies, so a killed run's lock is taken over; a live holder is named in a one-line
    refusal. ``problem()`` says, while the run goes on, whether the lock file or the directory was removed or
    replaced (the run then stops writing). On release the lock file is removed if it is still this run's, and
    so are the directories the lock made, when the run left nothing in them (a failed start)."""

    def __init__(self, rundir: RunDir):
        self.rundir = rundir
        self.path = rundir.root / LOCK
        self.fd: int | None = None
        self.dir_fd: int | None = None
        self.created: list[Path] = []
        self.previous: dict | None = None  # what a dead holder left in the file

    def __enter__(self) -> RunLock:
        if not is_main_process():
            return self
        run, root = self.rundir, self.rundir.root
        if root.exists() and not root.is_dir():
            raise UserError(f"{run.who}--output '{root}' is a file; pass a directory")
        missing = root
        while not missing.exists():
            self.created.append(missing)
            missing = missing.parent
        try:
            root.mkdir(parents=True, exist_ok=True)
            self._lock_directory()
            run.refuse_foreign()  # before the lock file: a directory that is not a run's is left as it was
            self._acquire()
        except OSError as exc:
            self._release()
            raise UserError(
                f"{run.who}cannot write in --output '{root}' ({exc.strerror or exc}); choose a writable directory"
            ) from None
        except BaseException:
            self._release()
            raise
        run.lock_held = self
        if self.previous and self.previous.get("pid") != os.getpid():
            p = self.previous
            run.say(
                f"took over the lock of pid {p.get('pid')} on {p.get('host')} in '{root}' (that run ended without releasing it)"
            )
        return self

    def _busy(self, holder: dict | None) -> UserError:
        return UserError(
            f"{self.rundir.who}--output '{self.rundir.root}' is in use by another run ({_show_holder(holder)}); "
            f"wait for it to end, or choose another --output"
        )

    def _lock_directory(self) -> None:
        """The directory's own flock, on the directory the path names when locked (retried if it was replaced)."""
        root = self.rundir.root
        for _ in range(10):
            fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._busy(_read_holder_file(self.path)) from None
            except OSError:  # a filesystem that cannot lock directories: the lock file alone decides
                os.close(fd)
                return
            if _same_file(fd, root):
                self.dir_fd = fd
                return
            os.close(fd)
        raise UserError(f"{self.rundir.who}could not lock '{root}' (it keeps being replaced); try again")

    def _acquire(self) -> None:
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise self._busy(holder) from None
            if not _same_file(fd, self.path):  # removed or replaced between our open and our lock: again
                os.close(fd)
                continue
            self.fd, self.previous = fd, _read_holder(fd)
            info = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "command": self.rundir.command,
                "started": _now(),
            }
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
            return
        raise UserError(f"{self.rundir.who}could not take the lock '{self.path}' (it keeps being replaced); try again")

    def problem(self) -> str | None:
        """What happened to the lock since it was taken, or None: the lock file removed or replaced, or the
        directory itself (another run could then be writing here)."""
        if self.fd is None:
            return None
        if self.dir_fd is not None and not _same_file(self.dir_fd, self.rundir.root):
            return f"--output '{self.rundir.root}' was removed or replaced while this run was writing to it"
        if not _same_file(self.fd, self.path):
            return f"its lock file '{self.path}' was removed or replaced while this run was writing to '{self.rundir.root}'"
        return None

    def __exit__(self, *exc) -> None:
        self._release()

    def _release(self) -> None:
        if self.fd is not None:
            if _same_file(self.fd, self.path):  # a lock file that another run wrote since is not ours to remove
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
            os.close(self.fd)
            self.fd = None
        if self.dir_fd is not None:
            os.close(self.dir_fd)
            self.dir_fd = None
        if self.rundir.lock_held is self:
            self.rundir.lock_held = None
        self._cleanup()

    def _cleanup(self) -> None:
        """Remove the directories this lock made, deepest first, where nothing was written in them."""
        for d in self.created:
            with contextlib.suppress(OSError):
                d.rmdir()
        self.created = []


def _same_file(fd: int, path: Path) -> bool:
    """``path`` still names the file or directory open as ``fd``."""
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _read_holder_file(path: Path) -> dict | None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        return _read_holder(fd)
    finally:
        os.close(fd)


def _read_holder(fd: int) -> dict | None:
    try:
        data = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        holder = json.loads(data) if data else None
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _show_holder(holder: dict | None) -> str:
    if not holder:
        return "its lock file names no process yet, or was removed"
    return (
        f"pid {holder.get('pid')} on {holder.get('host')}, {holder.get('command', 'a run')} started "
        f"{holder.get('started', 'at an unknown time')}"
    )


def _matches(name: str, patterns) -> bool:
    """``name`` is one of ``patterns`` (globs), or one of them plus ``.tmp`` (an atomic write cut short)."""
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, p + ".tmp") for p in patterns)


def _count(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


# ----- checkpoints: written whole, with a manifest, and verified ----------------------------------
def write_checkpoint(accelerator, directory: str | Path, save: Callable[[Path], str | None], state: dict) -> Path:
    """Write a checkpoint as a whole or not at all: every process runs ``save(tmp)`` into a temporary
    sibling directory (returning the format written, recorded as ``format``); the main process adds
    ``trainer_state.json`` (which marks it complete) and ``manifest.json`` (size and sha256 of every file) and
    renames it to ``directory``, replacing an older one of that name only once the new one is complete."""
    with stops.deferred():  # a signal waits for the checkpoint to be whole
        return _write_checkpoint(accelerator, Path(directory), save, state)


def _write_checkpoint(accelerator, directory: Path, save: Callable[[Path], str | None], state: dict) -> Path:
    tmp, old = directory.with_name(f".{directory.name}.tmp"), directory.with_name(f".{directory.name}.old")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    with writing(directory, "the checkpoint", cleanup=tmp):  # a full disk: one line, no half checkpoint left
        fmt = save(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with writing(directory, "the checkpoint", cleanup=tmp):
            (tmp / STATE_FILE).write_text(jsonio.dumps({**state, **({"format": fmt} if fmt else {})}, indent=2))
            files = {
                str(p.relative_to(tmp)): {"size": p.stat().st_size, "sha256": _sha256(p)}
                for p in sorted(tmp.rglob("*"))
                if p.is_file()
            }
            (tmp / MANIFEST).write_text(json.dumps({"files": files}, indent=1))
        shutil.rmtree(old, ignore_errors=True)
        if directory.exists():
            directory.rename(old)
        tmp.rename(directory)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return directory


def verify_checkpoint(ckpt: Checkpoint, types: dict | None = None) -> tuple[str | None, dict, list[str]]:
    """(what is wrong or None, its trainer_state.json, files it holds that its manifest does not list).
    A checkpoint of the safe format must match its manifest file by file (size, then sha256); one written
    before manifests (accelerate's pickles) passes unverified, to be refused without --trust-pickle. Every
    field of trainer_state.json named in ``types`` (default ``STATE_TYPES``) must be of its type."""
    d = ckpt.path
    try:
        state = read_state(d)
    except (OSError, ValueError, UnicodeDecodeError):
        return f"{STATE_FILE} is unreadable", {}, []
    if not isinstance(state, dict) or state.get("step") != ckpt.step:
        return f"{STATE_FILE} does not describe step {ckpt.step}", {}, []
    problem = fields_problem(state, types or STATE_TYPES)
    if problem:
        return f"{STATE_FILE}: {problem}", {}, []
    if not (d / MANIFEST).is_file():
        return (f"{MANIFEST} is missing", {}, []) if state.get("format") == SAFE_FORMAT else (None, state, [])
    try:
        files = json.loads((d / MANIFEST).read_text())["files"]
        entries = [(str(rel), int(meta["size"]), str(meta["sha256"])) for rel, meta in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        return f"{MANIFEST} is unreadable", {}, []
    for rel, size, digest in entries:
        p = d / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            return f"{MANIFEST} names a file outside the checkpoint ({rel})", {}, []
        if not p.is_file():
            return f"{rel} is missing", {}, []
        if p.stat().st_size != size:
            return f"{rel} has {p.stat().st_size} bytes, {size} were written", {}, []
        if _sha256(p) != digest:
            return f"{rel} does not match its checksum", {}, []
    listed = {rel for rel, _, _ in entries}
    if STATE_FILE not in listed:
        return f"{MANIFEST} does not cover {STATE_FILE}", {}, []
    extra = sorted(
        str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() and str(p.relative_to(d)) not in listed | {MANIFEST}
    )
    return None, state, extra


def read_state(directory: str | Path) -> dict:
    """The ``trainer_state.json`` of a checkpoint directory (``step`` and what the trainer added); strict JSON
    (NaN or Infinity, which no checkpoint of ours holds, is a ``ValueError``)."""
    return jsonio.loads((Path(directory) / STATE_FILE).read_text())


# ----- the types of trainer_state.json's fields -----------------------------------------------------
NUMBER, INT = (int, float), (int,)
# a field: a tuple of types; or {"dict": spec of each value} / {"fields": {name: spec}} for a dict; None allowed
# where the tuple holds type(None)
STATE_TYPES = {"step": INT, "format": (str,), "settings": (dict,)}
FINETUNE_STATE = {
    "skipped_steps": INT,
    "before": {"dict": NUMBER + (type(None),)},
    "best_eval": NUMBER + (type(None),),
}
TRAIN_REWARD_STATE = {
    "metrics": {"dict": NUMBER},
    "data": {"fields": {"micro_batches": INT, "sampler_seed": INT + (type(None),)}},
    "best": {
        "fields": {"step": INT, "metric": (str,), "mode": (str,), "value": NUMBER},
        "none": True,
    },
}


def fields_problem(data: dict, types: dict, where: str = "") -> str | None:
    """The first field of ``data`` named in ``types`` whose value is not of its type (booleans are not numbers),
    as 'field X is a str, not ...'; None when all are."""
    for name, spec in types.items():
        if name not in data:
            continue
        value, path = data[name], f"{where}{name}"
        if isinstance(spec, tuple):
            if isinstance(value, bool) or not isinstance(value, spec):
                wanted = " or ".join("null" if t is type(None) else t.__name__ for t in spec)
                return f"field '{path}' is {json.dumps(value)[:40]}, not {wanted}"
            continue
        if value is None and spec.get("none"):
            continue
        if not isinstance(value, dict):
            return f"field '{path}' is {json.dumps(value)[:40]}, not an object"
        inner = spec["fields"] if "fields" in spec else dict.fromkeys(value, spec["dict"])
        problem = fields_problem(value, inner, f"{path}.")
        if problem:
            return problem
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _pickled_file(directory: Path) -> Path:
    """A file of an accelerate-format checkpoint that only pickle reads (to name in the refusal)."""
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.suffix not in (".json", ".safetensors"):
            return p
    return directory


def _pickle_origin(state: dict) -> str:
    if state.get("format") == "accelerate":
        return "FSDP and DeepSpeed keep sharded state only that way"
    return "a checkpoint written before 0.1"


# ----- settings a resumed run must share with its checkpoint ---------------------------------------
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
_SAMPLES, _SAMPLE_BYTES = 16, 1 << 16


def weights_identity(path: str | Path) -> dict:
    """What a model is, cheaply: a hub snapshot by its revision; a local directory (or file) by each weight
    and config file's name, size, safetensors header and 16 samples of 64 KiB spread over it (a different
    model of the same architecture differs in those; a full hash of gigabytes is not needed)."""
    path = Path(path).expanduser().resolve()
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return {"hub": path.parent.parent.name[len("models--") :].replace("--", "/"), "revision": path.name}
    if path.is_file():
        return {"files": {path.name: _fingerprint(path)}}
    files = {}
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path)
        if p.is_file() and p.suffix in WEIGHT_SUFFIXES + (".json",) and not any(s.startswith(".") for s in rel.parts):
            files[str(rel)] = _fingerprint(p)
    return {"files": files}


def _fingerprint(path: Path) -> str:
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= _SAMPLES * _SAMPLE_BYTES:
            h.update(f.read())
        else:
            if path.suffix == ".safetensors":  # the header: every tensor's name, dtype, shape and offsets
                n = int.from_bytes(f.read(8), "little")
                h.update(f.read(min(n, 100 << 20)))
            for i in range(_SAMPLES):
                f.seek((size - _SAMPLE_BYTES) * i // (_SAMPLES - 1))
                h.update(f.read(_SAMPLE_BYTES))
    return f"{size}:{h.hexdigest()[:16]}"


def _describe(flag: str, before, now) -> str:
    if isinstance(before, dict) and isinstance(now, dict) and ("files" in before or "files" in now):
        a, b = before.get("files") or {}, now.get("files") or {}
        differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        return f"{flag} is another model ({len(differ)} file(s) differ, e.g. {differ[0] if differ else '?'})"
    if isinstance(before, dict) or isinstance(now, dict):
        return f"{flag} is another model (checkpoint: {_short(before)}, now: {_short(now)})"
    return f"{flag} {_short(before)} (checkpoint) vs {_short(now)} (now)"


def _short(value) -> str:
    if isinstance(value, dict) and "revision" in value:
        return f"{value.get('hub')}@{str(value.get('revision'))[:12]}"
    if isinstance(value, dict):
        return "a local model"
    return "unset" if value is None else str(value)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _plain(value):
    """``value`` as JSON gives it back (tuples become lists), so a saved and a fresh value compare equal."""
    return json.loads(json.dumps(value, default=str))


def config_settings(cfg, fixed: dict) -> dict:
    """The ``settings`` of ``check_settings``/``begin``: ``fixed`` and every option of the config dataclass."""
    return {"fixed": fixed, "config": dataclasses.asdict(cfg)}


# ----- when to checkpoint ---------------------------------------------------------------------------
class Cadence:
    """Checkpoint every ``every`` steps and/or every ``minutes`` of wall time since the last one (so a killed
    run loses at most that much). Under several processes the main process's clock decides for all."""

    def __init__(self, every: int, minutes: float, accelerator=None):
        self.every, self.seconds, self.accelerator = every, minutes * 60.0, accelerator
        self.last = time.monotonic()

    @property
    def enabled(self) -> bool:
        return self.every > 0 or self.seconds > 0

    def due(self, step: int) -> bool:
        if self.every and step % self.every == 0:
            return True
        if self.seconds <= 0:
            return False
        late = time.monotonic() - self.last >= self.seconds
        acc = self.accelerator
        if acc is not None and acc.num_processes > 1:
            from accelerate.utils import broadcast

            late = bool(broadcast(torch.tensor([float(late)], device=acc.device), from_process=0).item() > 0)
        return late

    def saved(self) -> None:
        self.last = time.monotonic()


def reset_accelerate(mixed_precision: str | None = None) -> None:
    """Clear accelerate's process-wide Accelerator and gradient state (the distributed setup stays), so the
    next run in this process builds its own accelerator: ICT then HP in one script, a notebook, a sweep.
    With ``mixed_precision``: only when a single-process state with another precision is in the way (the
    next Accelerator would refuse it); a matching state, or a multi-process one, is kept."""
    from accelerate.state import AcceleratorState, GradientState

    if mixed_precision is not None:
        state = AcceleratorState._shared_state
        if not state or state.get("_mixed_precision") == mixed_precision or state.get("num_processes", 1) != 1:
            return
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()

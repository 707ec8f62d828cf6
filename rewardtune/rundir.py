"""The output directory of a training run, for both ``train-reward`` and ``finetune``: checkpoint names,
which checkpoints exist, rotation, the rules for starting over or resuming, atomic writes, and the reset
of accelerate's process-wide state between runs in one process.

Layout: ``<output>/checkpoints/step_000123/`` (``step-123/`` of train-reward before 0.1 is still found),
each complete one holding ``trainer_state.json``; written into ``.step_000123.tmp/`` and renamed.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Callable, NamedTuple

from .errors import UserError
from .sources import atomic_write_text

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
_STEP = re.compile(r"^step[_-](\d+)$")  # step_000123; step-123 is what train-reward wrote before


class Checkpoint(NamedTuple):
    step: int
    path: Path


def checkpoint_name(step: int) -> str:
    """The directory name of the checkpoint after ``step`` optimizer steps (sorts by name up to 999999)."""
    return f"step_{step:06d}"


class RunDir:
    """One run's output directory. ``who`` starts the error messages (``"train-reward: "``, or ``""``).

    Every process may read; the main process writes (``write_checkpoint`` is the exception: every process
    takes part in it, as in accelerate's ``save_state``)."""

    def __init__(self, root: str | Path, who: str = ""):
        self.root = Path(root).expanduser()
        self.who = who

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / CHECKPOINTS

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

    def resume_point(self, resume: bool, steps: int | None = None) -> Checkpoint | None:
        """The checkpoint to continue from, or None to start afresh. A directory that holds checkpoints is
        never started over silently (``--resume`` or another ``--output``); ``--resume`` with none is an
        error; with ``steps`` (train-reward), so is a checkpoint already at or past it."""
        latest = self.latest()
        if not resume:
            if latest is not None:
                raise UserError(f"{self.who}--output '{self.root}' already holds checkpoints (latest step {latest.step}); "
                                f"pass --resume to continue that run, or choose a new --output")
            return None
        if latest is None:
            raise UserError(f"{self.who}--resume: no checkpoint in '{self.checkpoints_dir}'; run without --resume to start fresh")
        if steps is not None and latest.step >= steps:
            raise UserError(f"{self.who}the checkpoint is at step {latest.step}, not before --steps {steps}; "
                            f"raise --steps to train further")
        return latest

    def save_checkpoint(self, accelerator, step: int, state: dict, keep: int,
                        save: Callable[[Path], None] | None = None) -> Path:
        """``write_checkpoint`` into ``checkpoints/step_N`` (``save``: accelerate's ``save_state`` unless
        given), then keep only the newest ``keep``. Every process calls it."""
        save = save or (lambda tmp: accelerator.save_state(str(tmp)))
        path = write_checkpoint(accelerator, self.checkpoint_dir(step), save, {"step": step, **state})
        if accelerator.is_main_process:
            self.rotate(keep)
        accelerator.wait_for_everyone()
        return path

    def rotate(self, keep: int) -> None:
        """Delete all but the newest ``keep`` complete checkpoints."""
        for old in self.checkpoints()[:-keep]:
            shutil.rmtree(old.path, ignore_errors=True)

    def write_text(self, name: str, text: str) -> Path:
        """Write ``<root>/<name>`` atomically (temp file, then rename; directories made as needed): a reader
        sees the old file or the new one, never half of one."""
        path = self.root / name
        atomic_write_text(path, text)
        return path

    def write_json(self, name: str, data) -> Path:
        return self.write_text(name, json.dumps(data, indent=2))

    def write_config(self, cfg) -> Path:
        """The resolved config as ``config.yaml``, re-runnable with ``--config``."""
        from .config import config_to_yaml

        return self.write_text("config.yaml", config_to_yaml(cfg))


def write_checkpoint(accelerator, directory: str | Path, save: Callable[[Path], None], state: dict) -> Path:
    """Write a checkpoint as a whole or not at all: every process runs ``save(tmp)`` into a temporary
    sibling directory; the main process adds ``trainer_state.json`` (which marks it complete) and renames it
    to ``directory``, replacing an older one of that name only once the new one is complete."""
    directory = Path(directory)
    tmp, old = directory.with_name(f".{directory.name}.tmp"), directory.with_name(f".{directory.name}.old")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    save(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
        shutil.rmtree(old, ignore_errors=True)
        if directory.exists():
            directory.rename(old)
        tmp.rename(directory)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return directory


def load_checkpoint(accelerator, directory: str | Path) -> dict:
    """Restore accelerate's state (models, optimizer, scheduler, random states) from a checkpoint directory;
    return its ``trainer_state.json``."""
    accelerator.load_state(str(directory))
    return read_state(directory)


def read_state(directory: str | Path) -> dict:
    """The ``trainer_state.json`` of a checkpoint directory (``step`` and what the trainer added)."""
    return json.loads((Path(directory) / STATE_FILE).read_text())


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

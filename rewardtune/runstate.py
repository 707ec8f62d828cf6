"""What a checkpoint holds besides the trained weights (optimizer, LR scheduler, gradient scaler, random
generators), written in files that cannot run code when read: safetensors for tensors, JSON for the rest.
Nothing here unpickles.

A state object (an optimizer's ``state_dict()``, the random generators' states) is a tree of dicts, lists,
tuples, numbers, strings and tensors. ``write_tree`` stores its tensors in a safetensors file and the tree
around them, as JSON, in that file's metadata; ``read_tree`` rebuilds it. Dict keys keep their type (an
optimizer's state is keyed by int), tuples stay tuples.

Sharded training state (FSDP, DeepSpeed) is accelerate's to write and read, and it needs pickle: such a
checkpoint is marked ``format: accelerate`` and resumes only with ``--trust-pickle`` (see ``rundir``).
"""

from __future__ import annotations

import json
import math
import numbers
import random
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_file, save_model

from .errors import UserError

SAFE = "safe"  # trainer_state.json "format" of a checkpoint written by this module
ACCELERATE = "accelerate"  # ... of one written by accelerate's save_state (pickles)
MODEL = "model.safetensors"
OPTIMIZER = "optimizer.safetensors"
SCHEDULER = "scheduler.json"
SCALER = "scaler.json"
_TREE_KEY = "rewardtune_tree"


def rng_name(process_index: int) -> str:
    return f"random_states_{process_index}.safetensors"


# ----- trees of plain values and tensors ---------------------------------------------------------
def _encode(obj, tensors: dict, key: str):
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"tensor": key}
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        obj = float(obj)
        return obj if math.isfinite(obj) else {"float": repr(obj)}  # strict JSON has no nan/inf
    if isinstance(obj, dict):
        if not all(isinstance(k, (str, int)) and not isinstance(k, bool) for k in obj):
            raise TypeError(f"dict keys other than str/int at '{key}'")
        return {"dict": [[k, _encode(v, tensors, f"{key}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        items = [_encode(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]
        return {"tuple": items} if isinstance(obj, tuple) else items
    raise TypeError(f"a {type(obj).__name__} at '{key}'")


def _decode(node, tensors: dict):
    if isinstance(node, list):
        return [_decode(v, tensors) for v in node]
    if not isinstance(node, dict):
        return node
    ((tag, value),) = node.items()
    if tag == "tensor":
        return tensors[value]
    if tag == "float":
        return float(value)
    if tag == "tuple":
        return tuple(_decode(v, tensors) for v in value)
    if tag == "dict":
        return {k: _decode(v, tensors) for k, v in value}
    raise ValueError(f"unknown node '{tag}'")


def write_tree(obj, path: str | Path, what: str) -> None:
    """``obj`` as ``path``: safetensors (tensors, the tree in its metadata), or JSON for a ``.json`` path
    (no tensors allowed). ``what`` names the object if it holds something neither format can."""

    tensors: dict = {}
    try:
        tree = _encode(obj, tensors, "t")
    except TypeError as exc:
        raise UserError(f"cannot write the {what} without pickle: it holds {exc}") from None
    path = Path(path)
    if path.suffix == ".json":
        if tensors:
            raise ValueError(f"{what}: tensors cannot go into {path.name}")
        path.write_text(json.dumps(tree, allow_nan=False))
    else:
        save_file(tensors, str(path), metadata={_TREE_KEY: json.dumps(tree, allow_nan=False)})


def read_tree(path: str | Path, what: str):
    """The object ``write_tree`` wrote; a one-line ``UserError`` naming the file when it is not one."""

    path = Path(path)
    try:
        if path.suffix == ".json":
            return _decode(json.loads(path.read_text()), {})
        with safe_open(str(path), "pt") as f:
            tree = json.loads((f.metadata() or {})[_TREE_KEY])
            return _decode(tree, {k: f.get_tensor(k) for k in f.keys()})
    except Exception as exc:  # any damage: truncation, a foreign file, a missing key
        raise UserError(f"{what}: '{path}' is not readable ({type(exc).__name__}: {str(exc)[:120]})") from None


# ----- random generators -------------------------------------------------------------------------
def rng_state() -> dict:
    """Python's, numpy's and torch's (CPU and every CUDA device's) generator states."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----- a whole training state --------------------------------------------------------------------
def is_sharded(accelerator) -> bool:
    """FSDP / DeepSpeed / Megatron: optimizer and model state live in shards that accelerate writes with pickle."""
    return str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type)) in (
        "FSDP",
        "DEEPSPEED",
        "MEGATRON_LM",
    )


def save_training_state(accelerator, directory: str | Path, optimizer, model=None, scheduler=None) -> str:
    """Every process calls it. Writes ``model`` (unwrapped, safetensors), ``optimizer``, ``scheduler`` and the
    gradient scaler (main process) and this process's random generators; returns the format written.
    Sharded setups go through accelerate's ``save_state`` instead (pickles: resuming needs --trust-pickle)."""
    directory = Path(directory)
    if is_sharded(accelerator):
        accelerator.save_state(str(directory))
        return ACCELERATE
    if accelerator.is_main_process:
        if model is not None:
            save_model(accelerator.unwrap_model(model), str(directory / MODEL))
        write_tree(optimizer.state_dict(), directory / OPTIMIZER, "optimizer state")
        if scheduler is not None:
            write_tree(scheduler.state_dict(), directory / SCHEDULER, "LR scheduler state")
        if accelerator.scaler is not None:
            write_tree(accelerator.scaler.state_dict(), directory / SCALER, "gradient scaler state")
    write_tree(rng_state(), directory / rng_name(accelerator.process_index), "random generator state")
    return SAFE


def load_training_state(accelerator, directory: str | Path, fmt: str, optimizer, model=None, scheduler=None) -> None:
    """Restore what ``save_training_state`` wrote (every process). ``fmt`` is the checkpoint's format, already
    cleared by ``rundir`` (an accelerate-format one only with --trust-pickle)."""
    directory = Path(directory)
    if fmt != SAFE:
        accelerator.load_state(str(directory))
        return
    where = f"checkpoint '{directory}'"
    if model is not None:
        try:
            load_model(accelerator.unwrap_model(model), str(directory / MODEL))
        except Exception as exc:
            raise UserError(
                f"{where}: '{MODEL}' does not fit this model ({type(exc).__name__}: {str(exc)[:160]})"
            ) from None
    try:
        optimizer.load_state_dict(read_tree(directory / OPTIMIZER, where))
    except (ValueError, KeyError, RuntimeError) as exc:
        raise UserError(f"{where}: '{OPTIMIZER}' does not fit this run's trained weights ({str(exc)[:160]})") from None
    if scheduler is not None:
        scheduler.load_state_dict(read_tree(directory / SCHEDULER, where))
    if accelerator.scaler is not None and (directory / SCALER).is_file():
        accelerator.scaler.load_state_dict(read_tree(directory / SCALER, where))
    rng = directory / rng_name(accelerator.process_index)
    if rng.is_file():
        set_rng_state(read_tree(rng, where))
    elif accelerator.is_main_process:
        print(
            f"warning: {where} has no random generator state for process {accelerator.process_index} "
            f"(written with another number of processes); continuing with fresh ones",
            flush=True,
        )

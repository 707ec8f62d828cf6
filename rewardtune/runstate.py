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


# ----- what a checkpoint's state files must look like to fit the run they are loaded into -----------------
# Optimizer state tensors shaped like their parameter: torch's optimizers' and bitsandbytes' (state1/state2).
PARAM_SHAPED = {"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "square_avg", "acc_delta", "sum",
                "exp_inf", "ax", "mu", "eta", "state1", "state2"}  # fmt: skip


def _kind(value) -> str:
    return type(value).__name__


def optimizer_problem(saved, optimizer) -> str | None:
    """What in a saved optimizer ``state_dict()`` does not fit ``optimizer`` (its groups, each parameter's state
    tensors' shapes and dtypes, the step counters), or None. ``load_state_dict`` checks the groups only; a wrong
    shape surfaces as a traceback in the next step."""
    if not isinstance(saved, dict) or not isinstance(saved.get("state"), dict):
        return "it is not an optimizer state (no 'state' dict)"
    groups = saved.get("param_groups")
    if not isinstance(groups, list) or len(groups) != len(optimizer.param_groups):
        return f"'param_groups' holds {len(groups) if isinstance(groups, list) else _kind(groups)}, the optimizer {len(optimizer.param_groups)} groups"
    params = {}
    for i, (group, live) in enumerate(zip(groups, optimizer.param_groups)):
        ids = group.get("params") if isinstance(group, dict) else None
        if not isinstance(ids, list) or len(ids) != len(live["params"]):
            return f"param_groups[{i}] does not list the optimizer's {len(live['params'])} parameters"
        params.update(zip(ids, live["params"]))
    for pid, entry in saved["state"].items():
        if pid not in params or not isinstance(entry, dict):
            return f"state[{pid!r}] belongs to no parameter of this optimizer"
        param = params[pid]
        for key, value in entry.items():
            where = f"state[{pid}].{key}"
            if key == "step":
                if not (isinstance(value, (int, float)) and not isinstance(value, bool)) and not (
                    isinstance(value, torch.Tensor) and value.numel() == 1
                ):
                    return f"{where} is a {_kind(value)}, not a step count"
            elif key in PARAM_SHAPED:
                if not isinstance(value, torch.Tensor):
                    return f"{where} is a {_kind(value)}, not a tensor"
                if tuple(value.shape) != tuple(param.shape):
                    return f"{where} has shape {tuple(value.shape)}, its parameter {tuple(param.shape)}"
                if not (value.is_floating_point() or (key.startswith("state") and value.dtype == torch.uint8)):
                    return f"{where} has dtype {value.dtype}, not a floating-point one"
    return None


def rng_problem(state) -> str | None:
    """What in a saved random-generator state is not of the kinds ``set_rng_state`` restores, or None."""
    if not isinstance(state, dict):
        return "it is not a random-generator state"
    py = state.get("python")
    if not (isinstance(py, (list, tuple)) and len(py) == 3 and isinstance(py[0], int)):
        return "'python' is not a (version, state, gauss) triple"
    if not (isinstance(py[1], (list, tuple)) and len(py[1]) == 625 and all(isinstance(x, int) for x in py[1])):
        return "'python' state is not 625 integers"
    if py[2] is not None and not isinstance(py[2], float):
        return "'python' gauss is not a number"
    npy = state.get("numpy")
    if not (isinstance(npy, (list, tuple)) and len(npy) == 5 and isinstance(npy[0], str)):
        return "'numpy' is not a 5-part state"
    keys = npy[1]
    if not (isinstance(keys, torch.Tensor) and keys.dtype == torch.int64 and tuple(keys.shape) == (624,)):
        return f"'numpy' keys are {_show(keys)}, not 624 int64"
    if not (isinstance(npy[2], int) and isinstance(npy[3], int) and isinstance(npy[4], float)):
        return "'numpy' position, has_gauss or cached gauss is of the wrong type"
    for name in ("torch", "cuda"):
        value = state.get(name)
        tensors = value if name == "cuda" and isinstance(value, (list, tuple)) else [value]
        if name == "cuda" and value is None:
            continue
        bad = [t for t in tensors if not (isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.dim() == 1)]
        if bad:
            return f"'{name}' is {_show(bad[0])}, not a uint8 generator state"
    return None


def _show(value) -> str:
    return (
        f"a {value.dtype} tensor of shape {tuple(value.shape)}"
        if isinstance(value, torch.Tensor)
        else f"a {_kind(value)}"
    )


def model_file_problem(path: Path, model) -> str | None:
    """What in a safetensors weights file does not fit ``model`` (names, shapes, dtypes), read from its header."""
    own = model.state_dict()
    try:
        with safe_open(str(path), "pt") as f:
            saved = {k: f.get_slice(k) for k in f.keys()}
            shapes = {k: (tuple(v.get_shape()), v.get_dtype()) for k, v in saved.items()}
    except Exception as exc:
        return f"{path.name} is not readable ({type(exc).__name__})"
    stored = {t.untyped_storage().data_ptr() for k, t in own.items() if k in shapes}
    missing = [k for k, t in own.items() if k not in shapes and t.untyped_storage().data_ptr() not in stored]
    if missing:  # (a tied weight is saved under one of its names)
        return f"{path.name} lacks {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
    extra = [k for k in shapes if k not in own]
    if extra:
        return f"{path.name} holds {extra[0]}, which the model lacks"
    for k, t in own.items():
        if k not in shapes:
            continue
        shape, dtype = shapes[k]
        if shape != tuple(t.shape):
            return f"{path.name} tensor {k} has shape {shape}, the model {tuple(t.shape)}"
        if dtype != _SAFETENSORS_DTYPES.get(t.dtype):
            return f"{path.name} tensor {k} has dtype {dtype}, the model {t.dtype}"
    return None


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                       torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}  # fmt: skip


def state_problem(accelerator, directory: str | Path, fmt: str, optimizer, model=None, scheduler=None) -> str | None:
    """What in a checkpoint's state files (this process's) does not fit the run they would be loaded into --
    weights, optimizer, scheduler, random generators -- read and checked without changing anything; None when
    they fit. An accelerate-format checkpoint (pickles, allowed by --trust-pickle) is accelerate's to check."""
    directory = Path(directory)
    if fmt != SAFE:
        return None
    try:
        if model is not None and accelerator.is_main_process:
            problem = model_file_problem(directory / MODEL, accelerator.unwrap_model(model))
            if problem:
                return problem
        problem = optimizer_problem(read_tree(directory / OPTIMIZER, OPTIMIZER), optimizer)
        if problem:
            return f"{OPTIMIZER}: {problem}"
        if scheduler is not None:
            saved = read_tree(directory / SCHEDULER, SCHEDULER)
            if not isinstance(saved, dict) or not isinstance(saved.get("last_epoch"), int):
                return f"{SCHEDULER}: 'last_epoch' is not a step count"
        rng = directory / rng_name(accelerator.process_index)
        if rng.is_file():
            problem = rng_problem(read_tree(rng, rng.name))
            if problem:
                return f"{rng.name}: {problem}"
    except UserError as exc:
        return str(exc)
    return None


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

"""Non-finite values in training, one rule for both trainers: a step whose loss or gradient is NaN or
infinite is skipped (no update), counted and logged; ``--max-nonfinite`` of them in a row stop the run with
a one-line error. And the check before anything is saved: NaN or infinite weights are never written.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

from .config import option
from .errors import UserError

if TYPE_CHECKING:
    import torch

# torch is imported inside the functions that use it: both configs import this module (--max-nonfinite), and
# --help must not import torch.


def max_nonfinite_option():
    """The ``--max-nonfinite`` field of both trainers' configs, declared once."""
    return option(
        5,
        "stop after this many optimizer steps in a row whose loss or gradient is NaN or infinite "
        "(each such step is skipped: no update)",
        min=1,
    )


class NonFiniteRule:
    """``--max-nonfinite``: count skipped updates; stop after ``limit`` in a row. ``who`` starts the logged
    lines (``"finetune: "``), ``prefix`` the error; ``say`` prints a line (None on all but the main process)."""

    def __init__(self, limit: int, who: str = "", say: Callable[[str], None] | None = print, prefix: str = ""):
        self.limit, self.who, self.say, self.prefix = limit, who, say, prefix
        self.in_row = 0
        self.skipped = 0

    def count(self, applied: bool, step: int, hint: str = "try a lower --lr") -> None:
        """Record optimizer step ``step`` (1-based): ``applied`` or skipped for a non-finite loss or gradient."""
        if applied:
            self.in_row = 0
            return
        self.skipped += 1
        self.in_row += 1
        if self.say is not None:
            self.say(f"{self.who}step {step}: non-finite loss or gradient; update skipped ({self.in_row} in a row)")
        if self.in_row >= self.limit:
            raise UserError(
                f"{self.prefix}stopped: {self.in_row} non-finite losses in a row at step {step} "
                f"(--max-nonfinite {self.limit}); the training diverged: {hint}"
            )


def all_agree(accelerator, ok: bool) -> bool:
    """True when ``ok`` holds on every process (every process must call it)."""
    import torch  # noqa: PLC0415

    if accelerator.num_processes == 1:
        return ok
    flag = torch.tensor([float(ok)], device=accelerator.device)
    return bool(accelerator.gather(flag).min() > 0)


def backward(accelerator, loss: torch.Tensor, params: list, agree: bool = False, finite: bool | None = None) -> bool:
    """Backpropagate ``loss``, or, when it is NaN or infinite, a zero loss over ``params`` (so every process
    still takes part in the gradient all-reduce, and no NaN reaches a gradient). ``agree``: decide together
    (a loss computed by every process over the gathered global batch, whose backward is itself collective).
    ``finite``: already known (the planner's fake tensors have no values). Returns whether ``loss`` was used."""
    import torch  # noqa: PLC0415

    if finite is None:
        finite = bool(torch.isfinite(loss.detach()).all())
    if agree:
        finite = all_agree(accelerator, finite)
    if not finite:
        loss = torch.stack([p.sum() for p in params]).sum() * 0.0
    accelerator.backward(loss)
    return finite


def grad_norm(accelerator, params: list, max_norm: float) -> float | None:
    """The gradient norm before clipping (clipping to ``max_norm`` when it is above 0); NaN or infinite when a
    gradient is; None where it is not known yet (DeepSpeed clips and reports inside its own step)."""
    import torch  # noqa: PLC0415

    if max_norm > 0:
        norm = accelerator.clip_grad_norm_(params, max_norm)
        return None if norm is None else float(norm)
    if accelerator.distributed_type == "DEEPSPEED":
        return None
    accelerator.unscale_gradients()  # fp16: the norm of the true gradients, and the scaler sees an overflow
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(grads))) if grads else 0.0


def optimizer_step(accelerator, optimizer, params: list, max_norm: float, loss_finite: bool) -> tuple[float, bool]:
    """Clip (``max_norm`` > 0), step and zero the gradients, unless the loss (``loss_finite``, agreed by all
    processes) or the gradient is NaN or infinite. Returns (the gradient norm before clipping, NaN when not
    known; whether the update was applied)."""
    acc = accelerator
    norm = grad_norm(acc, params, max_norm) if loss_finite else None
    grads_finite = all_agree(acc, finite_number(norm))  # a local norm of sharded gradients may differ
    # fp16's GradScaler skips a non-finite update itself and must see it to lower its scale; DeepSpeed's step
    # runs inside backward. Otherwise a non-finite gradient is simply not stepped on.
    if acc.distributed_type == "DEEPSPEED" or (loss_finite and (grads_finite or acc.scaler is not None)):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    applied = loss_finite and grads_finite and not acc.optimizer_step_was_skipped
    return (float("nan") if norm is None else norm), applied


def finite_number(x: float | None) -> bool:
    """``x`` is finite; None (not known) counts as finite."""
    return x is None or math.isfinite(x)


def nonfinite_names(tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the floating-point tensors that hold a NaN or an infinity."""
    import torch  # noqa: PLC0415

    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    return [
        name
        for name, t in items
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all())
    ]


def check_finite_weights(tensors: Mapping[str, torch.Tensor], what: str, hint: str = "lower --lr") -> None:
    """Refuse to save ``tensors`` when any holds a NaN or an infinity: a one-line ``UserError`` naming how many
    and the first; nothing is written."""
    bad = nonfinite_names(tensors)
    if bad:
        raise UserError(
            f"{what}: {len(bad)} of {len(tensors)} tensors hold NaN or infinite values (first: '{bad[0]}'); "
            f"not saved: the training diverged, {hint}"
        )


def check_finite_params(accelerator, module_or_params, what: str, hint: str = "lower --lr") -> None:
    """``check_finite_weights`` on the local parameters (or shards) of a model, agreed by every process, so
    all of them stop together instead of some waiting for a save that never comes. Every process calls it."""
    import torch  # noqa: PLC0415

    if isinstance(module_or_params, torch.nn.Module):
        named = list(module_or_params.named_parameters())
    else:
        named = [(f"parameter {i}", p) for i, p in enumerate(module_or_params)]
    bad = nonfinite_names((n, p.detach()) for n, p in named)
    n_bad = len(bad)
    if accelerator.num_processes > 1:  # shards may differ between processes; all of them must stop together
        n_bad = int(accelerator.gather(torch.tensor([n_bad], device=accelerator.device)).max())
    if not n_bad:
        return
    first = f" (first: '{bad[0]}')" if bad else ""
    raise UserError(
        f"{what}: {n_bad} weight tensors hold NaN or infinite values{first}; not saved: the training diverged, {hint}"
    )

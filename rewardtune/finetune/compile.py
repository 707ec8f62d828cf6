"""``--compile``: the denoiser compiled by ``torch.compile`` (inductor) for the sampling and gradient steps.

Inductor generates C++ kernels on the CPU (it needs a C++ compiler: ``g++``, or the one ``CXX`` names) and Triton
kernels on a GPU (it needs the ``triton`` package); ``check_compile`` says which is missing before any model loads.
The module is compiled in place (``nn.Module.compile``), so its parameter names, LoRA adapters and saved files stay
what they are without it; whole-call checkpointing recomputes the compiled call in the backward pass.
"""

from __future__ import annotations

import sys

import torch

from ..errors import UserError

BACKEND = "inductor"  # torch.compile's own default; the tests also run a backend that generates no code


def check_compile(cuda: bool) -> None:
    """Raise ``UserError`` (one line, naming --compile) where ``torch.compile`` cannot compile for this device."""
    # torch.compile's machinery takes seconds to import: only --compile loads it
    import torch._dynamo  # noqa: PLC0415
    from torch._inductor import config as inductor_config  # noqa: PLC0415
    from torch._inductor.cpp_builder import get_cpp_compiler  # noqa: PLC0415
    from torch.utils._triton import has_triton  # noqa: PLC0415

    if not torch._dynamo.is_dynamo_supported():
        raise UserError(
            f"--compile: torch.compile does not support this Python ({sys.version.split()[0]}) or platform; "
            f"leave --compile off"
        )
    if cuda:
        if not has_triton():
            raise UserError("--compile on a GPU needs Triton (pip install triton); or leave --compile off")
        return
    try:
        get_cpp_compiler()
    except Exception:  # inductor's InvalidCxxCompiler, or a compiler that does not run
        tried = ", ".join(str(c) for c in inductor_config.cpp.cxx if c)
        raise UserError(
            f"--compile on the CPU needs a C++ compiler for torch.compile's inductor backend and none runs "
            f"(tried: {tried}); install g++ or set CXX to one, or leave --compile off"
        ) from None


def compile_denoiser(model: torch.nn.Module) -> None:
    """Compile ``model`` in place (its calls go through ``torch.compile`` from now on; a wrapper the accelerator
    made calls it the same way)."""
    model.compile(backend=BACKEND)

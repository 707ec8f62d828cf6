"""Giving the freed part of the CPU heap back to the system between checkpointed denoising calls.

On a CPU, tensors live in the C heap. glibc's malloc serves blocks under its mmap threshold (128 KiB at
first, raised up to 32 MiB as large blocks are freed) from the heap, and a heap page holding a few live
bytes — a checkpointed call's saved latent, an autograd node — stays resident with the freed blocks
around it. Each recomputed call then lands in fresh pages: on the tiny 64 px benchmark (issue #13) peak
RSS grew 1.39x from K=1 to K=20 while live tensors grew 1.06x. ``malloc_trim(0)`` before each checkpointed
call hands every free page back (1.05x); the price is refaulting those pages, about 15-25 % of a K=20 step
on that benchmark (``benchmarks/results/checkpoint_calls.md``). K=1 checkpoints no call and pays nothing.
GPUs are untouched: their memory is the caching allocator's.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

import torch


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library has none (macOS, musl, Windows)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError, TypeError):
        return None


def release_freed_heap(device: torch.device | str) -> bool:
    """Return the heap's free pages to the system when ``device`` is the CPU and glibc can; True if it did."""
    if torch.device(device).type != "cpu":
        return False
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True

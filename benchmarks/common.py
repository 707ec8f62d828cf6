"""Shared by the benchmark scripts: environment facts, timing, peak memory, result files."""

from __future__ import annotations

import datetime
import importlib.metadata as md
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere, without `pip install -e`
    sys.path.insert(0, str(ROOT))


def environment() -> dict:
    """Device, library versions and date: what every result file records."""

    versions = {}
    for name in ("torch", "diffusers", "transformers", "peft", "accelerate", "open_clip_torch"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            try:
                versions[name] = __import__(name).__version__
            except Exception:
                versions[name] = None
    dev = "cpu"
    if torch.cuda.is_available():
        dev = torch.cuda.get_device_name(0)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "device": dev,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "versions": versions,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    """(result, wall seconds, process CPU seconds) of ``fn()``, synchronising the GPU around it. On a shared
    CPU the CPU seconds are the contention-free measure of the work (all torch threads summed)."""
    sync(device)
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t, time.process_time() - c


def median(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return float(statistics.median(xs)) if xs else None


def reset_peak(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_mib(device) -> tuple[float, str]:
    """(peak, kind): CUDA peak allocated since the last reset, or the process's peak RSS on the CPU."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_peak_rss"


def append_record(path: str | Path, record: dict) -> None:
    """Append one JSON line (and flush it: a later timeout must not lose it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_records(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
    return out


def write_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_results(out: str, data: dict, report) -> None:
    """``out``.json (``data``) and ``out``.md (``report(data)``), each written whole."""
    write_atomic(out + ".json", json.dumps(data, indent=2))
    write_atomic(out + ".md", report(data))

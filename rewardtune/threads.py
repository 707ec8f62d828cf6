"""How many CPU threads torch uses, and how they wait: chosen once per command, before torch starts.

On cores that other work shares, torch's default (one thread per core, OpenMP threads that spin while they wait
for each other) is many times slower than one thread: a spinning thread burns the time slice its partner, still
computing, needs. So the command line (1) asks OpenMP to let waiting threads sleep after a short spin
(``WAIT_SETTINGS``; GNU libgomp, which torch's Linux wheels use, and LLVM's libomp read them when they load, that is
when torch is imported), and (2) takes no more threads than the cores this process may use leave free of the current load.
An explicit ``--threads N`` wins, then ``OMP_NUM_THREADS``; nothing here imports torch.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

THREADS_HELP = (
    "torch CPU threads (default: OMP_NUM_THREADS if set, else the cores this process may use less their current load, "
    "at most one per core; on cores other work shares, one thread is often as fast as two)"
)
# Variables a user sets to choose how OpenMP threads wait; when any is set, theirs stands.
WAIT_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
# Otherwise a waiting thread spins briefly, then sleeps. GNU libgomp (torch's Linux wheels) spins 300,000 times by
# default, which on a core other work shares burns the time slice its partner needs (5.6x slower on the busy
# 2-core machine, benchmarks/results/threads.md); not spinning at all (OMP_WAIT_POLICY=PASSIVE) cost 1.2x on the idle
# one (threads_runnable.md, at 7820fe0); 3,000 spins measured as fast as the default there. LLVM's libomp sleeps at
# once (KMP_BLOCKTIME=0), as it did under PASSIVE.
WAIT_SETTINGS = {"GOMP_SPINCOUNT": "3000", "KMP_BLOCKTIME": "0"}


@dataclass(frozen=True)
class Cores:
    """What the machine offers this process: ``online`` CPUs, the ``allowed`` ones (affinity), a cgroup CPU
    ``quota`` in cores (None: none set) and the whole machine's ``load`` (``machine_load``)."""

    online: int
    allowed: int
    quota: float | None
    load: float

    def free(self) -> float:
        """Cores left for this process: its allowed CPUs less their share of the machine's load (the load
        spread evenly over the online CPUs), and no more than its quota."""
        share = self.load * self.allowed / max(self.online, self.allowed, 1)
        free = self.allowed - share
        if self.quota is not None:
            free = min(free, max(1.0, math.floor(self.quota)))
        return free

    def describe(self) -> str:
        quota = f", quota {self.quota:g}" if self.quota is not None else ""
        of = f" of {self.online}" if self.allowed != self.online else ""
        return f"{self.allowed}{of} cores{quota}, load {self.load:.1f}"


def choose_threads(cores: Cores, most: int | None = None) -> int:
    """Threads for ``cores``: the free cores rounded to the nearest whole one, at least 1 and at most ``most``
    (torch's own default, one per physical core) and the allowed CPUs."""
    n = math.floor(cores.free() + 0.5)
    upper = cores.allowed if most is None else min(most, cores.allowed)
    return max(1, min(n, upper))


def cgroup_quota(root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """The CPU quota of this process's cgroup in cores (cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` /
    ``cpu.cfs_period_us``), or None when there is none or it cannot be read."""
    v2, v1 = "", ""
    try:
        for line in proc_cgroup.read_text().splitlines():
            hier, controllers, path = line.split(":", 2)
            if hier == "0" and not controllers:
                v2 = path
            elif "cpu" in controllers.split(","):
                v1 = path
    except (OSError, ValueError):
        pass
    for d in dict.fromkeys((root / v2.lstrip("/"), root)):
        try:
            quota, period = (d / "cpu.max").read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        except (OSError, ValueError):
            continue
    for d in dict.fromkeys((root / "cpu" / v1.lstrip("/"), root / "cpu", root / "cpu,cpuacct")):
        try:
            quota = int((d / "cpu.cfs_quota_us").read_text())
            period = int((d / "cpu.cfs_period_us").read_text())
            return None if quota <= 0 or period <= 0 else quota / period
        except (OSError, ValueError):
            continue
    return None


def runnable_now(loadavg: Path = Path("/proc/loadavg"), samples: int = 5, interval: float = 0.01) -> int | None:
    """Tasks runnable on the machine now besides this process (``/proc/loadavg``'s fourth field counts them, this
    one included): the median of ``samples`` reads ``interval`` seconds apart, so that neither a moment's dip in the
    other work nor a kernel thread's blip decides; None where it cannot be read (not Linux)."""
    counts = []
    for i in range(samples):
        try:
            counts.append(int(loadavg.read_text().split()[3].split("/")[0]))
        except (OSError, ValueError, IndexError):
            return None
        if i + 1 < samples:
            time.sleep(interval)
    return max(0, sorted(counts)[len(counts) // 2] - 1)


def machine_load(average: float, runnable: int | None) -> float:
    """The load to leave cores for: the 1-minute average, or the tasks runnable now where fewer. The average lags by
    a minute: right after a command ends (a user's previous run, a benchmark's last round) it still counts about
    one busy core on an idle machine, which would halve the threads of the next command."""
    return average if runnable is None else min(average, float(runnable))


def machine_cores() -> Cores:
    """This process's ``Cores`` as the operating system reports them now."""
    online = os.cpu_count() or 1
    try:
        allowed = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        allowed = online
    try:
        average = os.getloadavg()[0]
    except (AttributeError, OSError):
        average = 0.0
    return Cores(online=online, allowed=allowed, quota=cgroup_quota(), load=machine_load(average, runnable_now()))


def physical_cores() -> int | None:
    """torch's default thread count, one per physical core, from /proc/cpuinfo (None where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    cores, phys, core = set(), None, None
    for line in text.splitlines() + [""]:
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            phys = value.strip()
        elif key == "core id":
            core = value.strip()
        elif not key and core is not None:
            cores.add((phys, core))
            phys = core = None
    return len(cores) or None


@dataclass
class ThreadChoice:
    """The setting a command runs with: ``threads`` (None: left to ``OMP_NUM_THREADS``) and ``why``."""

    threads: int | None
    why: str


_chosen: ThreadChoice | None = None  # this process's choice, made by configure()


def configure(requested: int | None = None, environ=os.environ) -> ThreadChoice:
    """Set this process's torch threads: ``requested`` (``--threads``), else the user's ``OMP_NUM_THREADS``,
    else ``choose_threads`` of the machine now; and, unless the user chose a wait policy, threads that spin only
    briefly before they sleep while they wait (``WAIT_SETTINGS``). Before torch is imported both go through the environment (torch, MKL and OpenMP read it
    when they load; child processes inherit it); after, the count goes to ``torch.set_num_threads`` and the wait
    policy can no longer change. Once torch is imported without an explicit ``requested`` (a Python program
    that imported rewardtune), its settings are the program's and stay as they are."""
    global _chosen
    if requested is not None and requested < 1:
        raise UserError(f"--threads must be at least 1, got {requested}")
    started = "torch" in sys.modules
    if not started and not any(environ.get(v) for v in WAIT_VARS):
        environ.update(WAIT_SETTINGS)
    if requested is not None:
        _chosen = ThreadChoice(requested, "--threads")
    elif _chosen is not None:
        return _chosen
    elif environ.get("OMP_NUM_THREADS"):
        _chosen = ThreadChoice(None, f"OMP_NUM_THREADS={environ['OMP_NUM_THREADS']}")
        return _chosen
    elif started:
        return ThreadChoice(None, "the running program's")
    else:
        cores = machine_cores()
        _chosen = ThreadChoice(choose_threads(cores, physical_cores()), f"chosen for {cores.describe()}")
    if started:
        import torch  # noqa: PLC0415

        torch.set_num_threads(_chosen.threads)
    else:
        environ["OMP_NUM_THREADS"] = str(_chosen.threads)
    return _chosen


def describe(choice: ThreadChoice) -> str:
    """``2 torch threads (chosen for 2 cores, load 0.3)``: how the demo's first line says it."""
    if choice.threads is None:
        import torch  # noqa: PLC0415

        n = torch.get_num_threads()
    else:
        n = choice.threads
    return f"{n} torch thread{'s' if n != 1 else ''} ({choice.why})"

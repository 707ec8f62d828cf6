"""The torch thread setting a command runs with (``rewardtune.threads``): chosen from the cores the process may
use and their load, the user's ``--threads`` / ``OMP_NUM_THREADS`` respected, set before torch starts."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from rewardtune.testing.cli import HANG_SECONDS, offline_env
from rewardtune.threads import Cores, cgroup_quota, choose_threads, machine_load, runnable_now


@pytest.mark.parametrize(
    "cores, most, want",
    [
        (Cores(online=2, allowed=2, quota=None, load=0.1), 2, 2),  # this repository's machine, idle: as before
        (Cores(online=2, allowed=2, quota=None, load=0.6), 2, 1),  # one core's worth of other work rounds down
        (Cores(online=2, allowed=2, quota=None, load=0.4), 2, 2),
        (Cores(online=2, allowed=2, quota=None, load=9.0), 2, 1),  # the load 4-13: one thread
        (Cores(online=1, allowed=1, quota=None, load=0.0), 1, 1),
        (Cores(online=64, allowed=64, quota=None, load=10.0), 32, 32),  # at most torch's own default
        (Cores(online=64, allowed=64, quota=None, load=40.0), None, 24),
        (Cores(online=64, allowed=4, quota=None, load=32.0), None, 2),  # 4 of 64 CPUs carry 4/64 of the load
        (Cores(online=16, allowed=16, quota=2.5, load=0.0), None, 2),  # a cgroup quota of 2.5 cores: 2 threads
        (Cores(online=16, allowed=16, quota=0.5, load=0.0), None, 1),
        (Cores(online=16, allowed=16, quota=8.0, load=12.0), None, 4),  # the load leaves less than the quota
    ],
)
def test_threads_are_the_free_cores(cores, most, want):
    assert choose_threads(cores, most) == want


def test_cgroup_quota_is_read_from_v2_and_v1_files(tmp_path):
    proc = tmp_path / "cgroup"
    proc.write_text("0::/job\n")
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "cpu.max").write_text("150000 100000\n")
    assert cgroup_quota(tmp_path, proc) == 1.5
    (tmp_path / "job" / "cpu.max").write_text("max 100000\n")
    assert cgroup_quota(tmp_path, proc) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    proc.write_text("4:cpu,cpuacct:/\n0::/\n")
    assert cgroup_quota(v1, proc) == 3.0
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_quota(v1, proc) is None
    assert cgroup_quota(tmp_path / "none", tmp_path / "no-such-file") is None


def test_the_load_is_the_average_or_the_tasks_runnable_now_where_fewer(tmp_path):
    """The 1-minute average lags a job that just ended (an idle machine right after a run reads about 1); the
    tasks runnable now (``/proc/loadavg``'s fourth field, less this process; the median of a few reads) say so.
    Busy: both high, the average kept. Unreadable: the average alone."""
    loadavg = tmp_path / "loadavg"
    loadavg.write_text("1.13 1.32 1.79 1/109 2493\n")  # idle now, a run ended 20 s ago
    assert runnable_now(loadavg, interval=0) == 0
    assert choose_threads(Cores(2, 2, None, machine_load(1.13, runnable_now(loadavg, interval=0)))) == 2
    assert choose_threads(Cores(2, 2, None, 1.13)) == 1  # the average alone: what the default chose before
    loadavg.write_text("2.10 2.05 1.90 3/120 4000\n")  # two burners and this process
    assert choose_threads(Cores(2, 2, None, machine_load(2.10, runnable_now(loadavg, interval=0)))) == 1
    assert machine_load(0.4, 3) == 0.4 and machine_load(2.5, None) == 2.5
    loadavg.write_text("garbled\n")
    assert runnable_now(loadavg, interval=0) is None and runnable_now(tmp_path / "missing", interval=0) is None


# What a fresh process (as the CLI starts) ends up with: its torch thread count and the wait policy it set.
PROBE = """
import os, sys
from rewardtune import threads
choice = threads.configure(int(sys.argv[2]) if len(sys.argv) > 2 else None)
n = __import__("torch").get_num_threads() if sys.argv[1] == "torch" else "-"
print(n, os.environ.get("GOMP_SPINCOUNT"), os.environ.get("OMP_NUM_THREADS"), choice.why)
"""


def probe(*args, **env) -> list[str]:
    """``args``: ``torch`` (start torch and report its thread count) or ``env``, then ``--threads``' value."""
    drop = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
    base = {k: v for k, v in offline_env().items() if k not in drop}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, *args], env={**base, **env}, capture_output=True, text=True, timeout=HANG_SECONDS
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split(maxsplit=3)


def test_a_fresh_process_takes_the_chosen_threads_and_short_spins():
    threads, spin, env_threads, why = probe("torch")
    assert spin == "3000" and env_threads == threads  # set before torch read them
    assert 1 <= int(threads) <= len(os.sched_getaffinity(0)) and why.startswith("chosen for")


def test_the_users_threads_and_wait_policy_stand():
    assert probe("torch", OMP_NUM_THREADS="1")[:3] == ["1", "3000", "1"]  # their OMP_NUM_THREADS, untouched
    assert probe("env", OMP_WAIT_POLICY="ACTIVE")[1] == "None"  # their policy: no spin count added
    assert probe("env", GOMP_SPINCOUNT="300000")[1] == "300000"  # libgomp's own spin setting stands
    assert probe("torch", "1", OMP_NUM_THREADS="2")[0] == "1"  # --threads over OMP_NUM_THREADS

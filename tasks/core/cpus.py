"""How many CPUs this process may really use, and how many threads each of a run's processes gets.

`os.cpu_count()` counts the machine's cores; a process pinned by `taskset`/a container's cpuset sees
fewer through `sched_getaffinity`, and a cgroup CPU quota (`docker --cpus 1.5`, a Kubernetes limit)
caps it further. Torch's default intra-op thread count ignores both, so N processes on N cores each
start N threads and spend their time preempting one another (a debug step took 1.2 s instead of
0.14 s on the loaded 2-core box). Every stage that computes sizes its pool and threads from here,
so the threads of one run never outnumber the cores it has. Imports only the standard library.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_quota(root: Path = CGROUP_ROOT) -> float | None:
    """CPUs granted by a cgroup quota (v2 `cpu.max`, v1 `cpu.cfs_quota_us`/`cpu.cfs_period_us`);
    None without one."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup quota (rounded up)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        n = os.cpu_count() or 1
    quota = cgroup_quota()
    if quota is not None:
        n = min(n, math.ceil(quota))
    return max(1, n)


def threads_per_process(processes: int = 1, cpus: int | None = None) -> int:
    """Intra-op threads for each of `processes` processes sharing this process's CPUs (at least 1)."""
    return max(1, (cpus or available_cpus()) // max(1, processes))


def set_torch_threads(requested: int | None = None, processes: int = 1) -> int:
    """Set torch's intra-op threads: `requested` when given, else this process's share of the CPUs
    it may use; returns the number set."""
    import torch

    n = requested or threads_per_process(processes)
    torch.set_num_threads(n)
    return n

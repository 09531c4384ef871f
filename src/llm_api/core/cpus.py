"""How many CPUs this process may really use: its affinity mask, capped by a cgroup CPU quota.

`os.cpu_count()` is the host's core count. In a container with `cpus: 2` on a 64-core host, or
under `taskset`, it overstates what we get, and llama.cpp started with that many threads spends
its time waiting for threads that are not running. Written by hand: the standard library gains
this only in Python 3.13 (`os.process_cpu_count`, affinity only, no quota), and loky/joblib's
`cpu_count` (which does both) would be a dependency for twenty lines.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _affinity() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def _cgroup_quota(root: Path) -> float | None:
    """CPUs granted by the cgroup's quota (v2 `cpu.max`, else v1 CFS files), None if unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def available_cpus(cgroup_root: Path = CGROUP_ROOT) -> int:
    """The CPUs this process can run on at once (at least 1)."""
    cpus = _affinity()
    quota = _cgroup_quota(cgroup_root)
    if quota is not None:
        # rounded down, as Go's automaxprocs does: a thread that the quota throttles
        # mid-step stalls the others at the step's barrier
        cpus = min(cpus, max(1, math.floor(quota)))
    return max(1, cpus)

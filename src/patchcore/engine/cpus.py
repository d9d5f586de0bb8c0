"""How many CPU cores this process may use: what thread counts default to."""

from __future__ import annotations

import os


def available_cpus() -> int:
    """Cores this process may run on (its CPU affinity: taskset, cgroup cpusets, container
    limits), not every core of the machine: more threads than cores only make them wait."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)

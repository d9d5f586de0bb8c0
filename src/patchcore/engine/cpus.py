"""How many CPU cores this process may use, and how many of them are free right now: what
thread counts default to."""

from __future__ import annotations

import os
import time


def available_cpus() -> int:
    """Cores this process may run on (its CPU affinity: taskset, cgroup cpusets, container
    limits), not every core of the machine: more threads than cores only make them wait."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


def _cpu_times() -> tuple[float, float] | None:
    """(idle, total) jiffies of all cores since boot, from /proc/stat; None where there is none."""
    try:
        with open("/proc/stat") as stat:
            fields = [float(x) for x in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    if len(fields) < 4:
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    return idle, sum(fields[:8])


def free_cpus(window: float = 0.1) -> int:
    """Of :func:`available_cpus`, how many are idle now (the machine's idle share over ``window``
    seconds, in cores), at least one. Many small multi-threaded steps are fast on idle cores and
    very slow beside busy processes (each step waits for a thread that is not scheduled), so such
    work sizes its threads with this. Where the idle share cannot be read: every available core."""
    cores = available_cpus()
    before = _cpu_times()
    if before is None:
        return cores
    time.sleep(window)
    after = _cpu_times()
    if after is None or after[1] <= before[1]:
        return cores
    idle_share = (after[0] - before[0]) / (after[1] - before[1])
    idle_cores = idle_share * (os.cpu_count() or cores)
    return max(1, min(cores, int(idle_cores + 0.25)))

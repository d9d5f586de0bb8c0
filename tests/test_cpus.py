import os

from patchcore.engine.cpus import available_cpus
from patchcore.serving.inference import default_slots


def test_thread_counts_follow_the_cores_this_process_may_use_not_the_machine(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {5}, raising=False)  # e.g. taskset -c 5
    assert available_cpus() == 1
    assert default_slots() == 1 and default_slots(threads=4) == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert available_cpus() == 4
    assert default_slots() == 1 and default_slots(threads=1) == 4 and default_slots(threads=2) == 2

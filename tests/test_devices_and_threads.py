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


def test_free_cpus_counts_the_cores_idle_now_at_least_one(monkeypatch):
    import patchcore.engine.cpus as cpus

    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)

    def samples(*pairs):
        values = iter(pairs)
        monkeypatch.setattr(cpus, "_cpu_times", lambda: next(values))

    samples((100.0, 1000.0), (150.0, 1200.0))  # a quarter of the machine idle: 2 of 8 cores
    assert cpus.free_cpus(window=0) == 2
    samples((100.0, 1000.0), (100.0, 1200.0))  # every core busy
    assert cpus.free_cpus(window=0) == 1
    samples((100.0, 1000.0), (300.0, 1200.0))  # idle machine, but this process may use only 3 cores
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert cpus.free_cpus(window=0) == 3
    samples(None)  # no /proc/stat: every available core
    assert cpus.free_cpus(window=0) == 3


def test_the_coreset_is_the_same_on_one_thread_or_two():
    import numpy as np

    from patchcore.engine.coreset import farthest_point_order

    points = np.random.default_rng(0).standard_normal((3000, 32)).astype(np.float32)
    assert np.array_equal(farthest_point_order(points, 50, threads=1), farthest_point_order(points, 50, threads=2))


def test_device_auto_uses_the_cpu_without_a_gpu_and_cuda_is_refused_clearly(product_images):
    import pytest
    import torch

    from patchcore import PatchCore
    from patchcore.cli.options import use_device
    from conftest import small_model_settings

    if torch.cuda.is_available():
        pytest.skip("this check is for machines without a GPU")
    model = PatchCore(**small_model_settings(), device="auto").fit(product_images["train"][:3])
    assert model.device_ == "onnxruntime"  # the CPU, with ONNX Runtime
    assert PatchCore(**small_model_settings(), device="cpu", runtime="torch").fit(product_images["train"][:3]).device_ == "torch"
    with pytest.raises(ValueError, match="torch sees no GPU"):
        PatchCore(**small_model_settings(), device="cuda").fit(product_images["train"][:3])
    with pytest.raises(ValueError, match="torch sees no GPU"):
        use_device(model, "cuda")


def test_the_nvidia_driver_is_looked_for_before_torch_is_asked(tmp_path, monkeypatch):
    """``device="auto"`` asks torch about CUDA only where an NVIDIA driver is installed (the
    driver's files stand in for one here); ``cpu`` never asks."""
    import sys

    import pytest
    import torch

    from patchcore.engine import devices

    if not sys.platform.startswith("linux"):
        pytest.skip("the driver's files checked here are Linux's")
    monkeypatch.setattr(devices, "_LINUX_DRIVER_FILES", (str(tmp_path / "absent"),))
    assert not devices.nvidia_driver_present() and not devices.cuda_usable() and not devices.wants_cuda("auto")
    (tmp_path / "version").write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module\n")
    monkeypatch.setattr(devices, "_LINUX_DRIVER_FILES", (str(tmp_path / "version"),))
    assert devices.nvidia_driver_present()
    assert devices.wants_cuda("auto") == torch.cuda.is_available()  # with a driver, torch decides
    assert not devices.wants_cuda("cpu")

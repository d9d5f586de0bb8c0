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


def _resident_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_the_network_keeps_its_memory_between_runs_and_hands_it_back_after_a_long_call(fitted_model, monkeypatch):
    """ONNX Runtime's arena stays between runs (fresh memory each run cost 15 ms per photo) and is
    handed back once a call has run several batches; the features do not change."""
    import numpy as np
    import pytest

    from patchcore.engine import detector
    from patchcore.engine.tiling import TiledEmbedding

    if not os.path.exists("/proc/self/statm"):
        pytest.skip("resident memory is read from /proc")
    embedding = fitted_model.embedding_
    pixels = np.random.default_rng(0).normal(size=(16, 3, 320, 320)).astype(np.float32)
    embedding.release_memory()  # whatever earlier tests left in the session's model
    before = _resident_mib()
    first = embedding(pixels)
    embedding(pixels)  # ONNX Runtime settles its memory plan on the second run
    grown = _resident_mib() - before
    assert grown > 20  # the arena of sixteen 320 px inputs
    assert np.array_equal(embedding(pixels), first)  # later runs reuse it: no growth
    assert _resident_mib() - before < grown + 10
    embedding.release_memory()
    assert _resident_mib() - before < grown / 2
    assert np.array_equal(embedding(pixels[:2]), first[:2])  # the network still runs, the same features

    released = []
    monkeypatch.setattr(TiledEmbedding, "release_memory", lambda self: released.append(True))
    images = [np.zeros((40, 40, 3), np.uint8)] * 3
    batches = list(detector.embed_batches(images, fitted_model.transform_, embedding, batch_size=1))
    assert len(batches) == 3 and released == [True]  # once, after the call's last batch
    list(detector.embed_batches(images[:1], fitted_model.transform_, embedding, batch_size=1))
    assert released == [True]  # one batch (a served photo): the arena stays for the next request

"""The on-disk training patch store: contents, origins, and nothing left behind however a fit ends."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from patchcore.engine.patch_store import PatchStore


def test_store_round_trip_rows_and_origins(tmp_path):
    rng = np.random.default_rng(0)
    grids = [rng.standard_normal((2, 3, 5)).astype(np.float32), rng.standard_normal((4, 2, 5)).astype(np.float32)]
    with PatchStore(5, directory=tmp_path) as store:
        store.append_image("a.png", grids[0])
        store.append_image("b.png", grids[1])
        assert len(store) == 14 and store.nbytes == 14 * 5 * 2
        every = np.concatenate([g.reshape(-1, 5) for g in grids])
        np.testing.assert_allclose(store.read(0, 14), every, rtol=1e-3, atol=1e-3)  # float16 on disk
        rows = np.array([13, 0, 7, 6])
        np.testing.assert_allclose(store.take(rows), every[rows], rtol=1e-3, atol=1e-3)
        # row 7 is image 1 ("b.png", 2 columns), local row 1 -> (1, 0, 1); row 6 -> (1, 0, 0)
        assert store.origins(rows).tolist() == [[1, 3, 1], [0, 0, 0], [1, 0, 1], [1, 0, 0]]
        assert store.image_names == ["a.png", "b.png"]
        assert os.listdir(tmp_path) == []  # the file has no name: nothing to clean up, ever


_LONG_FIT = """
import numpy as np
from patchcore import PatchCore
rng = np.random.default_rng(0)
images = [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(20000)]  # minutes of work
print("fitting", flush=True)
PatchCore(backbone="efficientnet_lite0", resize=64).fit(images)
"""


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_an_interrupted_fit_leaves_no_temporary_files(tmp_path, stop):
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    process = subprocess.Popen([sys.executable, "-c", _LONG_FIT], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "fitting"
        deadline = time.monotonic() + 120
        # Wait until the store is open and being written: a nameless file in TMPDIR among the process's files.
        def open_store() -> bool:
            targets = []
            for fd in os.listdir(f"/proc/{process.pid}/fd"):
                try:
                    targets.append(os.readlink(f"/proc/{process.pid}/fd/{fd}"))
                except OSError:
                    pass
            return any(t.startswith(str(tmp_path)) and t.endswith("(deleted)") for t in targets)

        while not open_store():
            assert time.monotonic() < deadline and process.poll() is None, "the fit never opened its store"
            time.sleep(0.2)
        time.sleep(1.0)
        process.send_signal(stop)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    # Nothing of the store is left (torch's own caches, which it may put in TMPDIR, are not ours).
    left = [os.path.join(folder, name) for folder, _, names in os.walk(tmp_path) for name in names]
    assert not [path for path in left if "patchcore" in path]
    assert sum(os.path.getsize(path) for path in left) < 2**20  # the store held megabytes

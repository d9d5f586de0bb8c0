"""The on-disk training patch store: contents, origins, and nothing left behind however a fit ends."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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
import signal
import numpy as np
from patchcore import PatchCore
# A process that starts with SIGINT ignored (a background job of a script, some CI runners) keeps
# it ignored, and the fit would then run to its end: the test must not depend on how it was started.
signal.signal(signal.SIGINT, signal.default_int_handler)
image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
print("fitting", flush=True)
PatchCore(backbone="efficientnet_lite0", resize=64).fit([image] * 20000)  # a minute of work
print("fitted", flush=True)
"""
#: A limit only a broken or hung run reaches: the test waits for events, not for this.
SAFETY_SECONDS = 300


def _store_bytes(pid: int, folder: Path) -> int:
    """Bytes written to the process's patch store (a nameless file in ``folder``); 0 while it has none."""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        link = f"/proc/{pid}/fd/{fd}"
        try:
            target = os.readlink(link)
            if target.startswith(str(folder)) and target.endswith("(deleted)"):
                return os.stat(link).st_size
        except OSError:  # the file was closed meanwhile
            pass
    return 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the store among the process's files in /proc")
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["SIGINT", "SIGTERM", "SIGKILL"])
def test_an_interrupted_fit_leaves_no_temporary_files(tmp_path, stop):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch)}
    with open(tmp_path / "stderr.txt", "w") as stderr:
        process = subprocess.Popen([sys.executable, "-c", _LONG_FIT], env=env, stdout=subprocess.PIPE, stderr=stderr,
                                   text=True)
    try:
        assert process.stdout.readline().strip() == "fitting"
        deadline = time.monotonic() + SAFETY_SECONDS
        while not _store_bytes(process.pid, scratch):  # the store is open and being written
            assert process.poll() is None, (tmp_path / "stderr.txt").read_text()
            assert time.monotonic() < deadline, "the fit never wrote to its store"
            time.sleep(0.05)
        process.send_signal(stop)
        process.wait(timeout=SAFETY_SECONDS)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -stop  # the signal ended it (SIGINT: KeyboardInterrupt, then Python's exit by SIGINT)
    assert "fitted" not in process.stdout.read()
    # Nothing of the store is left (torch's own caches, which it may put in TMPDIR, are not ours).
    left = [os.path.join(folder, name) for folder, _, names in os.walk(scratch) for name in names]
    assert not [path for path in left if "patchcore" in path]
    assert sum(os.path.getsize(path) for path in left) < 2**20  # the store held megabytes


def _rows_as_stored(grids: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([g.reshape(-1, g.shape[-1]) for g in grids]).astype(np.float16).astype(np.float32)


def test_without_pread_the_store_reads_by_seek_and_read(tmp_path, monkeypatch):
    """Windows has no os.pread: the store then seeks and reads under its lock, with the same results."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(1)
    grids = [rng.standard_normal((3, 4, 6)).astype(np.float32) for _ in range(5)]
    monkeypatch.delattr(os, "pread")
    with PatchStore(6, directory=tmp_path) as store:
        for i, grid in enumerate(grids):
            store.append_image(f"{i}.png", grid)
        every = _rows_as_stored(grids)
        np.testing.assert_array_equal(store.read(0, len(store)), every)
        np.testing.assert_array_equal(store.read(7, 30), every[7:30])
        orders = [rng.permutation(len(store)) for _ in range(16)]
        with ThreadPoolExecutor(4) as pool:  # readers at once share one file position: the lock keeps them apart
            for rows, got in zip(orders, pool.map(store.take, orders)):
                np.testing.assert_array_equal(got, every[rows])


def _ram_backed_directory() -> str | None:
    from patchcore.engine.scratch import is_ram_backed

    for candidate in ("/dev/shm", f"/run/user/{os.getuid()}", "/tmp"):
        if os.path.isdir(candidate) and os.access(candidate, os.W_OK) and is_ram_backed(candidate):
            return candidate
    return None


def test_a_store_on_a_ram_backed_directory_warns_once(tmp_path):
    import tempfile
    import warnings

    from patchcore.engine.scratch import RamBackedScratchWarning

    ram = _ram_backed_directory()
    if ram is None:
        pytest.skip("this machine has no writable tmpfs")
    folder = tempfile.mkdtemp(dir=ram, prefix="patchcore-test-")  # new to this process: not warned about yet
    try:
        with pytest.warns(RamBackedScratchWarning) as caught:
            PatchStore(4, directory=folder).close()
        message = str(caught[0].message)
        assert folder in message and "GiB of RAM" in message
        assert "--scratch-dir" in message and "scratch_dir=" in message
        with warnings.catch_warnings():
            warnings.simplefilter("error", RamBackedScratchWarning)
            PatchStore(4, directory=folder).close()  # once is enough
    finally:
        os.rmdir(folder)


def test_a_store_on_disk_does_not_warn(tmp_path):
    import warnings

    from patchcore.engine.scratch import RamBackedScratchWarning, file_system_type, is_ram_backed

    if is_ram_backed(tmp_path):
        pytest.skip(f"the test's temporary directory is on {file_system_type(tmp_path)} here")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RamBackedScratchWarning)
        PatchStore(4, directory=tmp_path).close()


def test_the_mount_table_decides_by_the_longest_mount_point(tmp_path, monkeypatch):
    from patchcore.engine import scratch

    if not sys.platform.startswith("linux"):
        pytest.skip("mount tables are read on Linux only")
    table = tmp_path / "mountinfo"
    table.write_text(
        "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n"
        "30 27 0:27 / /scratch\\040space rw,relatime shared:5 - tmpfs tmpfs rw,size=1024k\n"
        "31 30 254:1 / /scratch\\040space/disk rw,relatime - xfs /dev/vdb rw\n"
        "32 27 0:28 / /mnt rw - tmpfs tmpfs rw\n"
        "33 27 254:2 / /mnt rw - ext4 /dev/vdc rw\n"  # mounted over the tmpfs: hides it
    )
    monkeypatch.setattr(scratch, "MOUNTINFO", table)
    assert scratch.file_system_type("/scratch space/a") == "tmpfs" and scratch.is_ram_backed("/scratch space")
    assert scratch.file_system_type("/scratch space/disk/a") == "xfs"
    assert scratch.file_system_type("/scratch spaced") == "ext4"  # a longer name is not inside
    assert not scratch.is_ram_backed("/mnt/a")

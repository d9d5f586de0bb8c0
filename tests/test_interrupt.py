"""SIGINT and SIGTERM stop ``patchcore fit`` and ``patchcore predict`` cleanly: one line on stderr,
status 130 or 143, no temporary file left; a command stuck after the signal is ended by the watchdog.

Each run is a real child process. Tests wait for what the child prints (its progress bars), never
for fixed times; the timeouts are safety nets that only a hung run reaches.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

#: A limit only a broken or hung run reaches.
SAFETY_SECONDS = 300
STOPS = [(signal.SIGINT, 130), (signal.SIGTERM, 143)]
#: Each training or test folder is given this many times: runs long enough that the signal finds them busy.
REPEATS = 200

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


class Child:
    """A command-line run whose stderr a thread collects, so that a test can wait for a line of it."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        # Started as a script's background job starts: with SIGINT ignored (the shell's `trap`
        # survives its `exec`), which Python alone would keep.
        self.process = subprocess.Popen(["sh", "-c", 'trap "" INT; exec "$@"', "sh", *argv], env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.stderr = b""
        self._grew = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while chunk := os.read(self.process.stderr.fileno(), 65536):
            with self._grew:
                self.stderr += chunk
                self._grew.notify_all()
        with self._grew:
            self._grew.notify_all()

    def wait_for(self, text: str) -> None:
        """Return once stderr holds ``text``; fail if the run ends first."""
        with self._grew:
            done = self._grew.wait_for(lambda: text.encode() in self.stderr or not self._reader.is_alive(),
                                       timeout=SAFETY_SECONDS)
        assert done and text.encode() in self.stderr, f"never printed {text!r}: {self.stderr.decode()[-2000:]}"

    def stop(self, signum: int) -> tuple[int, str]:
        """Send ``signum``; the exit status and the whole of stderr once the process has ended."""
        self.process.send_signal(signum)
        try:
            status = self.process.wait(timeout=SAFETY_SECONDS)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
        self._reader.join(SAFETY_SECONDS)
        self.process.stdout.close()
        self.process.stderr.close()
        return status, self.stderr.decode()


def _patchcore(*args: str) -> list[str]:
    return [sys.executable, "-m", "patchcore.cli", *args]


def _environment(scratch: Path) -> dict[str, str]:
    scratch.mkdir()
    return {**os.environ, "TMPDIR": str(scratch), "PYTHONFAULTHANDLER": ""}


def _last_line(stderr: str) -> str:
    return stderr.replace("\r", "\n").rstrip("\n").rsplit("\n", 1)[-1]


def _temporary_files(*folders: Path) -> list[str]:
    """Files that only a cut-off write leaves: hidden ``.tmp`` files (saves, scores.csv rewrites),
    ``*.tmp`` and anything of ours named ``patchcore-*`` (torch's caches in TMPDIR are not ours)."""
    found = []
    for folder in folders:
        for parent, _, names in os.walk(folder):
            found += [os.path.join(parent, name) for name in names if name.endswith(".tmp") or name.startswith("patchcore-")]
    return found


def _check_stopped(status: int, stderr: str, expected_status: int, signum: int, command: str) -> None:
    assert status == expected_status, stderr[-2000:]
    assert "Traceback" not in stderr
    assert _last_line(stderr) == f"interrupted ({signal.Signals(signum).name}): patchcore {command} stopped"


@pytest.mark.parametrize("signum, expected_status", STOPS, ids=["SIGINT", "SIGTERM"])
def test_a_signal_while_fit_extracts_features_stops_it(tmp_path, product_images, signum, expected_status):
    output = tmp_path / "model"
    train = [str(product_images["root"][0] / "train")] * REPEATS
    child = Child(_patchcore("fit", *train, "-o", str(output), "--backbone", "efficientnet_lite0", "--resize", "64"),
                  _environment(tmp_path / "tmp"))
    child.wait_for("features:")
    status, stderr = child.stop(signum)
    _check_stopped(status, stderr, expected_status, signum, "fit")
    assert "fitted on" not in stderr and not (output / "patchcore.json").exists()
    assert _temporary_files(tmp_path) == []


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, fitted_model) -> Path:
    folder = tmp_path_factory.mktemp("interrupt") / "model"
    fitted_model.save(folder)
    return folder


@pytest.mark.parametrize("signum, expected_status", STOPS, ids=["SIGINT", "SIGTERM"])
def test_a_signal_while_predict_scores_stops_it(tmp_path, product_images, saved_model, signum, expected_status):
    output = tmp_path / "out"
    images = [str(product_images["root"][0] / "test_good")] * REPEATS
    child = Child(_patchcore("predict", str(saved_model), *images, "-o", str(output)), _environment(tmp_path / "tmp"))
    child.wait_for("predict:")
    status, stderr = child.stop(signum)
    _check_stopped(status, stderr, expected_status, signum, "predict")
    assert _temporary_files(tmp_path, saved_model) == []
    # What was written is whole: every row of scores.csv (the next run starts it afresh) has its five fields.
    rows = (output / "scores.csv").read_text().splitlines()
    assert rows[0] == "path,score,is_anomalous,error,model_sha256"
    assert all(row.count(",") == 4 for row in rows) and len(rows) - 1 < len(images) * 4


_STUCK = """
import sys, tempfile, time
from pathlib import Path
from patchcore.cli.interrupts import Interrupted, StopOnSignals
from patchcore.engine import persistence

# A save in progress: its temporary file exists and is listed as pending.
temporary = Path(tempfile.mkstemp(dir=sys.argv[1], prefix=".memory_bank-", suffix=".tmp")[1])
persistence.PENDING_TEMPORARY.add(temporary)
with StopOnSignals("patchcore fit", grace=0.5) as stop:
    try:
        print("ready", file=sys.stderr, flush=True)
        time.sleep(300)
    except Interrupted:
        print("unwinding", file=sys.stderr, flush=True)
        time.sleep(120)  # never unwinds: as if stuck in C code
        stop.finish()
"""


@pytest.mark.parametrize("signum, expected_status", STOPS, ids=["SIGINT", "SIGTERM"])
def test_the_watchdog_ends_a_command_that_does_not_unwind(tmp_path, signum, expected_status):
    model = tmp_path / "model"
    model.mkdir()
    script = tmp_path / "stuck.py"
    script.write_text(_STUCK)
    child = Child([sys.executable, str(script), str(model)], _environment(tmp_path / "tmp"))
    child.wait_for("ready")
    status, stderr = child.stop(signum)
    assert status == expected_status, stderr
    assert "unwinding" in stderr and "Traceback" not in stderr
    assert _last_line(stderr) == f"interrupted ({signal.Signals(signum).name}): patchcore fit stopped (forced)"
    assert list(model.iterdir()) == []  # the pending temporary file was removed


_SWALLOWED = """
import sys, time
from patchcore.cli.interrupts import Interrupted, StopOnSignals

class Finalised:
    def __del__(self):  # Python reports an exception raised here and carries on
        print("finalising", file=sys.stderr, flush=True)
        time.sleep(120)

with StopOnSignals("patchcore evaluate") as stop:
    try:
        Finalised()  # freed at once: the signal arrives during its __del__
        time.sleep(120)
    except Interrupted:
        stop.finish()
"""


@pytest.mark.parametrize("signum, expected_status", STOPS, ids=["SIGINT", "SIGTERM"])
def test_a_signal_that_lands_in_a_finaliser_still_stops_cleanly(tmp_path, signum, expected_status):
    """A signal during a finaliser (``__del__``, a generator freed mid-run) raises where Python only
    reports the exception and goes on; the stop is raised again, and ends without a traceback."""
    script = tmp_path / "swallowed.py"
    script.write_text(_SWALLOWED)
    child = Child([sys.executable, str(script)], _environment(tmp_path / "tmp"))
    child.wait_for("finalising")
    status, stderr = child.stop(signum)
    assert status == expected_status, stderr
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    assert _last_line(stderr) == f"interrupted ({signal.Signals(signum).name}): patchcore evaluate stopped"

"""``patchcore watch``: photos landing in a folder are scored once each, when complete, recorded in
the history database, sorted after their record is committed, and a signal stops it cleanly.

Stations run in a thread of the test (or, for signals, as a real child process). Tests wait for
what the station reports (a file noticed, a verdict committed, a line printed), never for fixed
times; the timeouts are safety nets that only a hung run reaches.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import FAST, product_image
from patchcore.cli.main import main
from patchcore.engine.digest import file_sha256
from patchcore.engine.persistence import model_sha256
from patchcore.station.history import History
from patchcore.station.schema import Inspection
from patchcore.station.watch import Result, Station

#: A limit only a broken or hung run reaches.
SAFETY_SECONDS = 120


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A small model with a threshold (``rated``) and the same without one (``unrated``)."""
    from patchcore import PatchCore

    rng = np.random.default_rng(0)
    model = PatchCore(**FAST, coreset_ratio=0.25, resize=64, crop=64, batch_size=2, calibration="none")
    model.fit([product_image(rng) for _ in range(8)])
    root = tmp_path_factory.mktemp("watch-models")
    model.save(root / "unrated")
    model.calibrate_threshold([product_image(rng) for _ in range(4)], max_false_positive_rate=0.0)
    model.save(root / "rated")
    return {"rated": root / "rated", "unrated": root / "unrated"}


def _png(seed: int, defect: bool = False) -> bytes:
    buffer = io.BytesIO()
    image = product_image(np.random.default_rng(seed), defect=(20, 24, 14) if defect else None)
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _drop(inbox: Path, name: str, data: bytes) -> Path:
    """As a camera does: write under a name the inbox ignores, then rename into place."""
    partial = inbox / f"{name}.part"
    partial.write_bytes(data)
    os.rename(partial, inbox / name)
    return inbox / name


class Running:
    """A :class:`Station` running in a thread, whose verdicts and noticed files a test can wait for."""

    def __init__(self, model: Path, inbox: Path, output: Path, stop_after: int | None = None, **options) -> None:
        self.stop_after = stop_after
        self.results: list[Result] = []
        self.noticed: list[tuple[Path, str]] = []
        self.problems: list[str] = []  # the station's warnings: none expected
        self._changed = threading.Condition()
        self.station = Station(model, inbox, output, on_result=self._on_result, on_notice=self._on_notice,
                               on_problem=self._on_problem, **{"settle": 0.2, **options})
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        # Files dropped from now on raise events (before, they are found as a backlog).
        while not self.station.watching.wait(0.05):
            assert self._thread.is_alive(), f"the station did not start: {self.error!r}"

    def _run(self) -> None:
        try:
            self.station.run(self.stop_event)
        except BaseException as error:  # shown by wait_for
            self.error = error
        finally:
            with self._changed:
                self._changed.notify_all()

    def _on_result(self, result: Result) -> None:
        with self._changed:
            self.results.append(result)
            if self.stop_after is not None and len(self.results) >= self.stop_after:
                self.stop_event.set()
            self._changed.notify_all()

    def _on_problem(self, message: str) -> None:
        with self._changed:
            self.problems.append(message)
            self._changed.notify_all()

    def _on_notice(self, path: Path, state: str) -> None:
        with self._changed:
            self.noticed.append((path, state))
            self._changed.notify_all()

    def wait_for(self, condition, what: str) -> None:
        with self._changed:
            done = self._changed.wait_for(lambda: condition(self) or self.problems or not self._thread.is_alive(),
                                          SAFETY_SECONDS)
            assert done and condition(self), f"never saw {what}; error: {self.error!r}; problems: {self.problems}"

    def wait_for_results(self, count: int) -> list[Result]:
        self.wait_for(lambda run: len(run.results) >= count, f"{count} verdicts")
        return list(self.results)

    def stop(self):
        self.stop_event.set()
        self._thread.join(SAFETY_SECONDS)
        assert not self._thread.is_alive() and self.error is None, self.error
        assert self.problems == []
        return self.station.summary

    def __enter__(self) -> Running:
        return self

    def __exit__(self, *exc) -> None:
        if self._thread.is_alive():
            self.stop_event.set()
            self._thread.join(SAFETY_SECONDS)


@pytest.fixture
def inbox(tmp_path) -> Path:
    folder = tmp_path / "inbox"
    folder.mkdir()
    return folder


def _rows(output: Path, **filters) -> list[Inspection]:
    with History(output / "history.db") as history:
        return history.inspections(limit=None, newest_first=False, **filters)

def _restart_scores_the_rest(model, inbox: Path, out: Path, count: int, recorded: list) -> list:
    """After a stop: the ``recorded`` rows are whole (score, verdict, overlay written); a restart
    scores the rest of the ``count`` photos, each once, and sorts every photo out of the inbox
    (those whose move the stop cut off included). The rows after the restart."""
    assert recorded
    for row in recorded:
        assert row.score is not None and row.verdict in ("ok", "ng") and Path(row.overlay_path).is_file()
    with Running(model, inbox, out, sort=("ok", "ng")) as run:
        run.wait_for_results(count - len(recorded))
        summary = run.stop()
    rows = _rows(out)
    assert sorted(Path(r.photo_path).name for r in rows) == [f"photo_{i:02d}.png" for i in range(count)]
    assert summary.scored == count - len(recorded)
    assert list(inbox.iterdir()) == []
    return rows



def test_photos_landing_are_scored_once_recorded_and_drawn(models, inbox, tmp_path):
    out = tmp_path / "out"
    with Running(models["rated"], inbox, out, evidence=2) as run:
        photos = {"good.png": _png(1), "bad.png": _png(2, defect=True)}
        for name, data in photos.items():
            _drop(inbox, name, data)
        (inbox / "notes.txt").write_text("not a photo")  # ignored: not an image
        (inbox / "plain.png").write_bytes(_png(3))  # written in place: taken once it settled
        run.wait_for_results(3)
        # The same bytes written again are not scored again; changed bytes are.
        (inbox / "good.png").write_bytes(photos["good.png"])
        (inbox / "bad.png").write_bytes(_png(4))
        run.wait_for_results(4)
        summary = run.stop()
    rows = _rows(out)
    assert sorted((Path(r.photo_path).name, r.photo_sha256) for r in rows) == sorted(
        [("good.png", file_sha256(inbox / "good.png")), ("plain.png", file_sha256(inbox / "plain.png")),
         ("bad.png", _sha(photos["bad.png"])), ("bad.png", file_sha256(inbox / "bad.png"))])
    assert (summary.scored, summary.skipped, summary.unreadable) == (4, 1, 0)  # good.png written again: skipped
    from patchcore import load_model

    model = load_model(models["rated"])
    expected = {p.name: p.score for p in model.predict([inbox / "good.png", inbox / "plain.png"], maps=False)}
    for row in rows:
        assert (row.source, row.model_name, row.model_version, row.model_sha256) == \
            ("watch", "rated", 1, model_sha256(models["rated"]))
        assert row.threshold == model.threshold_ and row.error is None and row.stored_path is None
        assert row.verdict == ("ng" if row.score >= row.threshold else "ok")
        assert set(row.timings) == {"backbone", "search", "map"}
        assert Image.open(row.overlay_path).size == (64 + 8 + 64, 64)  # photo beside heat map, as predict draws
        assert Path(row.mask_path).is_file()
        assert [crop.rank for crop in row.evidence] == [1, 2] and all(Path(c.picture_path).is_file() for c in row.evidence)
        if row.photo_path in expected:
            assert row.score == pytest.approx(expected[row.photo_path], rel=1e-5)
    defective = next(r for r in rows if r.photo_sha256 == _sha(photos["bad.png"]))
    assert defective.verdict == "ng"
    assert len({r.overlay_path for r in rows}) == 4  # bad.png twice: two overlays, neither overwritten
    assert not list(out.rglob("*.tmp"))


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def test_a_slow_partial_write_is_taken_only_once_whole(models, inbox, tmp_path):
    """Half a PNG, left open and unchanged for longer than ``settle``, is not taken: it does not
    end as a PNG ends. Once the rest is written it is scored, whole."""
    out = tmp_path / "out"
    data = _png(5, defect=True)
    target = inbox / "slow.png"
    with Running(models["rated"], inbox, out, settle=0.05) as run:
        with open(target, "wb") as handle:
            handle.write(data[: len(data) // 2])
            handle.flush()
            # The station has looked at the half photo after it stopped changing, and waits for it
            # (or, were it wrong, scored it: then the assertion below says so).
            run.wait_for(lambda r: (target, "unfinished") in r.noticed or r.results, "the half photo waited for")
            assert not run.results, "scored half a photo"
            # A photo dropped after it, whole, is scored while the half photo waits.
            _drop(inbox, "quick.png", _png(6))
            run.wait_for_results(1)
            handle.write(data[len(data) // 2:])
        results = run.wait_for_results(2)
        run.stop()
    assert [Path(r.inspection.photo_path).name for r in results] == ["quick.png", "slow.png"]
    rows = {Path(row.photo_path).name: row for row in _rows(out)}
    assert sorted(rows) == ["quick.png", "slow.png"]
    assert rows["slow.png"].photo_sha256 == _sha(data) and rows["slow.png"].error is None
    assert rows["slow.png"].verdict == "ng"


def test_a_restart_mid_backlog_scores_each_photo_once(models, inbox, tmp_path):
    out = tmp_path / "out"
    for i in range(12):
        (inbox / f"photo_{i:02d}.png").write_bytes(_png(100 + i))
    with Running(models["unrated"], inbox, out, batch_size=1, stop_after=3) as first:
        first.wait_for_results(3)
        first.stop()
    done_first = len(_rows(out))
    # More photos land while the station is down.
    for i in range(12, 16):
        (inbox / f"photo_{i:02d}.png").write_bytes(_png(100 + i))
    with Running(models["unrated"], inbox, out) as second:
        second.wait_for_results(16 - done_first)
        summary = second.stop()
    rows = _rows(out)
    assert summary.skipped == done_first  # recorded by the first run: not scored again
    assert summary.scored == 16 - done_first
    assert sorted(Path(r.photo_path).name for r in rows) == [f"photo_{i:02d}.png" for i in range(16)]
    assert {r.verdict for r in rows} == {"unrated"} and all(r.threshold is None for r in rows)


def test_unreadable_photos_are_recorded_with_their_error_and_moved_aside(models, inbox, tmp_path):
    out = tmp_path / "out"
    with Running(models["rated"], inbox, out, stale=0.3) as run:
        _drop(inbox, "garbage.png", b"this is no PNG at all")
        run.wait_for_results(1)
        # A PNG whose writer died half-way: it never ends as a PNG does, and is taken once stale.
        (inbox / "cut.png").write_bytes(_png(7)[:300])
        results = run.wait_for_results(2)
        summary = run.stop()
    assert summary.unreadable == 2 and summary.scored == 0
    rows = {Path(r.photo_path).name: r for r in _rows(out)}
    for name, result in zip(("garbage.png", "cut.png"), results):
        row = rows[name]
        assert row.verdict == "error" and row.score is None and row.overlay_path is None
        assert name in result.inspection.photo_path and row.error
        assert row.stored_path == str(out / "rejected" / name)
        assert (out / "rejected" / name).is_file() and not (inbox / name).exists()
    assert "cannot identify" in rows["garbage.png"].error or "not" in rows["garbage.png"].error.lower()


def test_sort_moves_each_photo_only_after_its_verdict_is_committed(models, inbox, tmp_path):
    from watchdog.events import FileSystemEventHandler
    from watchdog.observers import Observer

    out = tmp_path / "out"
    for folder in ("ok", "ng"):
        (out / folder).mkdir(parents=True)
    checked: list[tuple[str, bool]] = []
    arrived = threading.Condition()
    History(out / "history.db").close()
    reader = History(out / "history.db")

    class Arrivals(FileSystemEventHandler):
        """Sees each photo arrive in ok/ or ng/, and looks for its committed record at that moment."""

        def on_any_event(self, event) -> None:
            path = getattr(event, "dest_path", "") if event.event_type == "moved" else event.src_path
            if event.event_type in ("moved", "created") and path.endswith(".png"):
                with reader.sessions() as session:
                    from sqlalchemy import select

                    found = session.scalars(select(Inspection).where(Inspection.stored_path == path)).first()
                with arrived:
                    checked.append((path, found is not None))
                    arrived.notify_all()

    observer = Observer()
    for folder in ("ok", "ng"):
        observer.schedule(Arrivals(), str(out / folder))
    observer.start()
    try:
        with Running(models["rated"], inbox, out, sort=("ok", "ng")) as run:
            for i in range(3):
                _drop(inbox, f"good_{i}.png", _png(200 + i))
            _drop(inbox, "bad.png", _png(210, defect=True))
            run.wait_for_results(4)
            run.stop()
        with arrived:
            assert arrived.wait_for(lambda: len(checked) >= 4, SAFETY_SECONDS)
    finally:
        observer.stop()
        observer.join()
        reader.close()
    assert all(committed for _, committed in checked), checked
    rows = _rows(out)
    assert {r.verdict for r in rows} <= {"ok", "ng"} and any(r.verdict == "ng" for r in rows)
    for row in rows:
        assert Path(row.stored_path) == out / row.verdict / Path(row.photo_path).name
        assert file_sha256(row.stored_path) == row.photo_sha256
    assert list(inbox.iterdir()) == []


def test_a_restart_finishes_a_move_that_a_crash_cut_off(models, inbox, tmp_path):
    """Committed, then stopped before the move: the next run moves the photo, and scores nothing."""
    out = tmp_path / "out"
    out.mkdir()
    photo = _drop(inbox, "left.png", _png(300))
    with History(out / "history.db") as history:
        history.record([Inspection(source="watch", station="line-3", photo_path=str(photo), photo_sha256=file_sha256(photo),
                                   stored_path=str(out / "ok" / "left.png"), model_name="rated", model_version=1,
                                   model_sha256="0" * 64, score=1.0, verdict="ok", timings={})])
    with Running(models["rated"], inbox, out, sort=("ok", "ng"), station="line-3") as run:
        _drop(inbox, "next.png", _png(301))
        run.wait_for_results(1)
        summary = run.stop()
    assert summary.skipped == 1 and summary.scored == 1
    assert (out / "ok" / "left.png").is_file() and not photo.exists()
    assert len(_rows(out)) == 2


def test_sort_needs_a_threshold_and_two_folders(models, inbox, tmp_path, capsys):
    assert main(["watch", str(models["unrated"]), str(inbox), "-o", str(tmp_path / "out"), "--sort", "ok,ng"]) == 2
    error = capsys.readouterr().err
    assert "unrated: the model has no threshold, so --sort cannot tell ok from ng" in error
    assert main(["watch", str(models["rated"]), str(inbox), "--sort", "ok"]) == 2
    assert "--sort takes two different folders" in capsys.readouterr().err
    assert main(["watch", str(models["rated"]), str(tmp_path / "absent")]) == 2
    assert "absent: the inbox folder does not exist" in capsys.readouterr().err


def test_polling_finds_photos_without_file_system_events(models, inbox, tmp_path):
    out = tmp_path / "out"
    with Running(models["rated"], inbox, out, poll=True) as run:
        (inbox / "polled.png").write_bytes(_png(400))
        (result,) = run.wait_for_results(1)
        run.stop()
    assert result.inspection.photo_path == str(inbox / "polled.png") and len(_rows(out)) == 1


# -- signals --------------------------------------------------------------------------------------


class Child:
    """``patchcore watch`` as a child process; threads collect its stdout and stderr."""

    def __init__(self, argv: list[str]) -> None:
        env = {**os.environ, "PYTHONFAULTHANDLER": ""}
        self.process = subprocess.Popen([sys.executable, "-m", "patchcore.cli", *argv], env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.output = {"stdout": b"", "stderr": b""}
        self._grew = threading.Condition()
        self._readers = [threading.Thread(target=self._read, args=(name,), daemon=True) for name in self.output]
        for reader in self._readers:
            reader.start()

    def _read(self, name: str) -> None:
        stream = getattr(self.process, name)
        while chunk := os.read(stream.fileno(), 65536):
            with self._grew:
                self.output[name] += chunk
                self._grew.notify_all()
        with self._grew:
            self._grew.notify_all()

    def wait_for(self, name: str, text: str) -> None:
        with self._grew:
            done = self._grew.wait_for(lambda: text.encode() in self.output[name] or self.process.poll() is not None,
                                       timeout=SAFETY_SECONDS)
        assert done and text.encode() in self.output[name], f"never printed {text!r}: {self.output}"

    def stop(self, signum: int) -> tuple[int, str, str]:
        self.process.send_signal(signum)
        try:
            status = self.process.wait(timeout=SAFETY_SECONDS)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
        for reader in self._readers:
            reader.join(SAFETY_SECONDS)
        return status, self.output["stdout"].decode(), self.output["stderr"].decode()


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("signum, expected_status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_watch_cleanly_and_a_restart_takes_up_the_rest(models, inbox, tmp_path, signum, expected_status):
    out = tmp_path / "out"
    count = 60
    for i in range(count):
        (inbox / f"photo_{i:02d}.png").write_bytes(_png(600 + i))
    child = Child(["watch", str(models["rated"]), str(inbox), "-o", str(out), "--sort", "ok,ng", "--settle", "0.1",
                   "--batch-size", "1"])
    child.wait_for("stdout", "photo_")  # scoring the backlog
    status, stdout, stderr = child.stop(signum)
    assert status == expected_status, stderr
    assert "Traceback" not in stderr
    last = stderr.rstrip("\n").rsplit("\n", 1)[-1]
    assert last == f"interrupted ({signal.Signals(signum).name}): patchcore watch stopped"  # not "(forced)"
    assert "watched" in stdout and "latency from complete to recorded" in stdout  # the run's figures
    assert not list(tmp_path.rglob("*.tmp"))
    # Every record is whole, its overlay written, and its photo moved (or left for the restart to move).
    _restart_scores_the_rest(models["rated"], inbox, out, count, _rows(out))


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_crash_loses_no_verdict_and_a_restart_scores_each_photo_once(models, inbox, tmp_path):
    """Killed outright (SIGKILL: no unwinding), the station leaves a sound database whose every
    record is whole; the restart finishes the moves the crash cut off and scores the rest, each once."""
    out = tmp_path / "out"
    count = 40
    for i in range(count):
        (inbox / f"photo_{i:02d}.png").write_bytes(_png(700 + i))
    child = Child(["watch", str(models["rated"]), str(inbox), "-o", str(out), "--sort", "ok,ng", "--settle", "0.1",
                   "--batch-size", "1"])
    child.wait_for("stdout", "photo_")
    assert child.stop(signal.SIGKILL)[0] == -signal.SIGKILL
    with History(out / "history.db") as history:
        with history.engine.connect() as connection:
            from sqlalchemy import text

            assert connection.execute(text("PRAGMA integrity_check")).scalar_one() == "ok"
        recorded = history.inspections(limit=None)
    rows = _restart_scores_the_rest(models["rated"], inbox, out, count, recorded)
    for row in rows:
        assert file_sha256(row.stored_path) == row.photo_sha256

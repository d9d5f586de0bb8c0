"""The history database: its migration, its query API and its guarantees, on SQLite and on a real
PostgreSQL server (started here with the ``pgserver`` wheel; those tests skip where none starts);
and the service recording every scored request with ``history_url``."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import itertools
import shutil
import tempfile
import threading
from pathlib import Path

import numpy as np

import patchcore.station
import pytest
from PIL import Image
from sqlalchemy import create_engine, text

from patchcore.station.history import History, HistoryError, database_url
from patchcore.station.schema import VERSION_TABLE, Base, EvidenceCrop, Inspection

UTC = dt.timezone.utc
_databases = itertools.count()


@pytest.fixture(scope="session")
def postgresql_server():
    """A PostgreSQL server of this test run (skips the tests that need one where none can start).

    Its data lie in a folder of their own under the system's temporary folder, not under
    pytest's: run as root, the server runs as another user, and every pytest session that
    starts takes the others' rights off pytest's folder."""
    pgserver = pytest.importorskip("pgserver")
    pytest.importorskip("psycopg")
    folder = Path(tempfile.mkdtemp(prefix="pgserver-test-"))
    try:
        server = pgserver.get_server(folder, cleanup_mode="delete")
        server.psql("SELECT 1;")
    except Exception as error:  # no server binary for this platform, no permission, ...
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"no PostgreSQL server could be started here: {error}")
    yield server
    try:  # a throw-away server: stopped at once, without the shutdown checkpoint
        pgserver.pg_ctl(["-w", "-m", "immediate", "stop"], pgdata=server.pgdata, user=server.system_user)
    finally:
        server.cleanup()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def postgresql_url(postgresql_server) -> str:
    """A fresh, empty database on the test server."""
    name = f"history_{next(_databases)}"
    postgresql_server.psql(f"CREATE DATABASE {name};")
    return postgresql_server.get_uri(name)


@pytest.fixture(params=["sqlite", "postgresql"])
def location(request, tmp_path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "history.db")
    return request.getfixturevalue("postgresql_url")


def _inspection(path: str = "/inbox/a.png", sha: str = "a" * 64, source: str = "watch", score: float | None = 1.5,
                verdict: str = "ok", at: dt.datetime | None = None, **fields) -> Inspection:
    fields.setdefault("station", "line-1")
    return Inspection(source=source, photo_path=path, photo_sha256=sha, model_name="bottle",
                      model_version=3, model_sha256="m" * 64, score=score, verdict=verdict, threshold=2.0,
                      pixel_threshold=None, timings={"backbone": 12.5, "search": 1.0},
                      at=at or dt.datetime.now(UTC), **fields)


MIGRATIONS = Path(patchcore.station.__file__).parent / "migrations" / "versions"


def test_opening_creates_the_schema_of_the_models(location):
    """The initial migration makes exactly the tables of :mod:`patchcore.station.schema`."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    with History(location) as history:
        with history.engine.connect() as connection:
            differences = compare_metadata(MigrationContext.configure(connection, opts={"compare_type": True}),
                                           Base.metadata)
            revision = connection.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar_one()
    # Alembic's own table is the only one the models do not declare.
    assert [d[0] for d in differences] == ["remove_table"] and differences[0][1].name == VERSION_TABLE
    newest = sorted(path.stem.split("_")[0] for path in MIGRATIONS.glob("[0-9]*.py"))[-1]
    assert revision == newest  # the newest migration is applied
    History(location).close()  # opening again: already at the newest revision


def test_inspections_round_trip_with_evidence_and_reviews(location):
    with History(location) as history:
        first = _inspection("/inbox/a.png", "a" * 64, score=1.0, verdict="ok",
                            at=dt.datetime(2026, 1, 1, 8, tzinfo=UTC), overlay_path="/out/overlays/a.png.png")
        second = _inspection("/inbox/b.png", "b" * 64, score=3.0, verdict="ng",
                             at=dt.datetime(2026, 1, 1, 9, tzinfo=UTC))
        second.evidence = [EvidenceCrop(rank=1, picture_path="/out/evidence/b.png-1.png", distance=3.0,
                                        box=[0, 0, 8, 8], training_image="train/000.png", training_box=[8, 8, 16, 16]),
                           EvidenceCrop(rank=2, picture_path=None, distance=2.5, box=[8, 0, 16, 8],
                                        training_image="train/001.png")]
        broken = _inspection("/inbox/c.png", "c" * 64, score=None, verdict="error", error="not an image",
                             at=dt.datetime(2026, 1, 1, 10, tzinfo=UTC), stored_path="/out/rejected/c.png")
        served = _inspection("<upload>", "d" * 64, source="service", score=2.5, verdict="ng",
                             at=dt.datetime(2026, 1, 2, 8, tzinfo=UTC))
        history.record([first, second, broken])
        history.record([served])

        newest = history.inspections()
        assert [row.photo_path for row in newest] == ["<upload>", "/inbox/c.png", "/inbox/b.png", "/inbox/a.png"]
        row = history.inspection(second.id)
        assert (row.score, row.verdict, row.threshold, row.model_version, row.timings) == \
            (3.0, "ng", 2.0, 3, {"backbone": 12.5, "search": 1.0})
        assert row.at == dt.datetime(2026, 1, 1, 9, tzinfo=UTC)  # an aware UTC time, on SQLite too
        assert [(crop.rank, crop.picture_path, crop.box, crop.training_box) for crop in row.evidence] == \
            [(1, "/out/evidence/b.png-1.png", [0, 0, 8, 8], [8, 8, 16, 16]), (2, None, [8, 0, 16, 8], None)]
        assert history.inspection(broken.id).error == "not an image"
        assert history.inspection(999) is None

        # Filters.
        assert [r.photo_path for r in history.inspections(verdict="ng")] == ["<upload>", "/inbox/b.png"]
        assert [r.photo_path for r in history.inspections(source="watch", verdict=["ok", "error"], newest_first=False)] \
            == ["/inbox/a.png", "/inbox/c.png"]
        assert [r.photo_path for r in history.inspections(since=dt.datetime(2026, 1, 1, 9, tzinfo=UTC),
                                                          until=dt.datetime(2026, 1, 2, tzinfo=UTC))] \
            == ["/inbox/c.png", "/inbox/b.png"]
        assert [r.photo_path for r in history.inspections(limit=1, offset=1)] == ["/inbox/c.png"]
        assert history.verdict_counts() == {"ok": 1, "ng": 2, "error": 1}
        assert history.verdict_counts(source="watch") == {"ok": 1, "ng": 1, "error": 1}
        assert history.scores("bottle", source="watch") == [
            (dt.datetime(2026, 1, 1, 8, tzinfo=UTC), 1.0, 3), (dt.datetime(2026, 1, 1, 9, tzinfo=UTC), 3.0, 3)]

        # Reviews.
        review = history.add_review(second.id, "false_alarm", who=" anna ", note="a reflection")
        history.add_review(served.id, "confirmed_defect", who="ben")
        assert [r.photo_path for r in history.inspections(reviewed=True)] == ["<upload>", "/inbox/b.png"]
        assert [r.photo_path for r in history.inspections(reviewed=False)] == ["/inbox/c.png", "/inbox/a.png"]
        reviewed = history.inspection(second.id).reviews
        assert [(r.id, r.verdict, r.who, r.note) for r in reviewed] == [(review.id, "false_alarm", "anna", "a reflection")]
        assert reviewed[0].at.tzinfo is not None
        with pytest.raises(HistoryError, match="false_alarm, confirmed_defect"):
            history.add_review(second.id, "maybe", who="anna")
        with pytest.raises(HistoryError, match="who gave it"):
            history.add_review(second.id, "false_alarm", who=" ")
        with pytest.raises(HistoryError, match="no inspection 999"):
            history.add_review(999, "false_alarm", who="anna")


def test_watch_records_the_same_bytes_under_the_same_path_once(location):
    with History(location) as history:
        history.record([_inspection("/inbox/a.png", "a" * 64)])
        with pytest.raises(HistoryError, match="refused to record twice"):
            history.record([_inspection("/inbox/b.png", "b" * 64), _inspection("/inbox/a.png", "a" * 64)])
        assert [r.photo_path for r in history.inspections()] == ["/inbox/a.png"]  # all or nothing
        history.record([_inspection("/inbox/a.png", "e" * 64)])  # changed bytes: a new verdict
        history.record([_inspection("/inbox/a.png", "a" * 64, station="line-2")])  # another line's inbox
        # The service may see the same upload any number of times.
        history.record([_inspection("<upload>", "a" * 64, source="service") for _ in range(2)])
        assert history.find_watched("line-1", "/inbox/a.png", "a" * 64).photo_sha256 == "a" * 64
        assert history.find_watched("line-2", "/inbox/a.png", "a" * 64).station == "line-2"
        assert history.find_watched("line-1", "/inbox/a.png", "f" * 64) is None
        assert history.find_watched("line-1", "<upload>", "a" * 64) is None  # only watch's own records count
        assert len(history.inspections(limit=None)) == 5


def test_constraints_refuse_unknown_sources_and_verdicts(location):
    with History(location) as history:
        for bad in (dict(source="camera"), dict(verdict="maybe")):
            with pytest.raises(HistoryError, match="(?i)refused an inspection.*check"):
                history.record([_inspection(**bad)])
        with pytest.raises(HistoryError, match="time zone"):
            history.record([_inspection(at=dt.datetime(2026, 1, 1))])


def test_stations_opening_a_new_database_at_once_migrate_it_once(location):
    errors, opened = [], []
    start = threading.Barrier(4)

    def open_it() -> None:
        start.wait()
        try:
            with History(location) as history:
                opened.append(history.verdict_counts())
        except Exception as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=open_it) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and opened == [{}] * 4


def test_a_database_of_a_newer_patchcore_is_refused(tmp_path):
    path = tmp_path / "history.db"
    History(path).close()
    engine = create_engine(database_url(path))
    with engine.begin() as connection:
        connection.execute(text(f"UPDATE {VERSION_TABLE} SET version_num = '9999'"))
    engine.dispose()
    with pytest.raises(HistoryError, match=r"history\.db.*revision 9999.*newer patchcore"):
        History(path)


def test_bad_locations_get_clear_errors(tmp_path):
    with pytest.raises(HistoryError, match="absent.*folder of the history database does not exist"):
        History(tmp_path / "absent" / "history.db")
    with pytest.raises(HistoryError, match="must be SQLite.*or PostgreSQL"):
        History("mysql://somewhere/db")
    not_a_database = tmp_path / "notes.db"
    not_a_database.write_text("these are my notes, not a database\n" * 100)
    with pytest.raises(HistoryError, match="notes.db: cannot open the history database"):
        History(not_a_database)


def test_postgresql_urls_get_a_driver_and_hide_their_password():
    url = database_url("postgresql://station:secret@db.example/history")
    assert url.drivername in ("postgresql+psycopg", "postgresql+psycopg2")
    assert "secret" not in url.render_as_string(hide_password=True)
    assert database_url("relative/history.db").database == str(Path("relative/history.db").absolute())


def test_an_unreachable_postgresql_server_is_named_in_the_error(postgresql_server, tmp_path):
    with pytest.raises(HistoryError, match=r"postgresql\+psycopg://station:\*\*\*@.*cannot open the history database"):
        History(f"postgresql://station:secret@/history?host={tmp_path}&port=1")


# -- the service ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served_model(tmp_path_factory) -> Path:
    from conftest import FAST, product_image
    from patchcore import PatchCore

    rng = np.random.default_rng(0)
    model = PatchCore(**FAST, coreset_ratio=0.25, resize=64, crop=64).fit([product_image(rng) for _ in range(6)])
    model.set_threshold(30.0)
    directory = tmp_path_factory.mktemp("served") / "tiny"
    model.save(directory)
    return directory


def _png(seed: int) -> bytes:
    from conftest import product_image

    buffer = io.BytesIO()
    Image.fromarray(product_image(np.random.default_rng(seed))).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_the_service_records_each_scored_request(served_model, tmp_path, request, backend):
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from patchcore.engine.persistence import model_sha256
    from patchcore.serving.app import create_app

    location = str(tmp_path / "service.db") if backend == "sqlite" else request.getfixturevalue("postgresql_url")
    app = create_app({"tiny": served_model}, history_url=location)
    photos = [_png(1), _png(2)]
    with TestClient(app) as client:
        answers = [client.post("/v1/models/tiny/predict", files={"file": (f"part-{i}.png", photo, "image/png")}).json()
                   for i, photo in enumerate(photos)]
        refused = client.post("/v1/models/tiny/predict", files={"file": ("junk.png", b"junk", "image/png")})
        assert refused.status_code == 422
        app.state.history.flush()
    with History(location) as history:
        rows = history.inspections(newest_first=False)
    assert len(rows) == 2  # the refused upload was never scored
    for row, answer, photo, i in zip(rows, answers, photos, range(2)):
        assert (row.source, row.photo_path, row.photo_sha256) == ("service", f"part-{i}.png", hashlib.sha256(photo).hexdigest())
        assert (row.model_name, row.model_version, row.model_sha256) == ("tiny", answer["model_version"],
                                                                         model_sha256(served_model))
        assert row.score == pytest.approx(answer["score"]) and row.threshold == 30.0
        assert row.verdict == ("ng" if answer["is_anomalous"] else "ok")
        assert row.timings["total"] == answer["timing_ms"]["total"]
        assert row.overlay_path is None and row.evidence == [] and row.error is None


def test_the_service_without_history_records_nothing(served_model):
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from patchcore.serving.app import create_app

    app = create_app({"tiny": served_model})
    with TestClient(app) as client:
        assert client.post("/v1/models/tiny/predict", content=_png(1), headers={"content-type": "image/png"}).status_code == 200
    assert app.state.history is None


# -- watch ---------------------------------------------------------------------------------------


def test_watch_records_its_verdicts_in_the_database_it_is_given(served_model, tmp_path, location):
    from test_watch import Running, _drop

    from patchcore.engine.digest import file_sha256
    from patchcore.engine.persistence import model_sha256

    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    with Running(served_model, inbox, out, database=location, station="line-7") as run:
        photo = _drop(inbox, "a.png", _png(500))
        _drop(inbox, "b.png", b"broken")
        run.wait_for_results(2)
        run.stop()
    assert not (out / "history.db").exists()  # the database given, not the default one
    with History(location) as history:
        rows = {Path(row.photo_path).name: row for row in history.inspections()}
    assert sorted(rows) == ["a.png", "b.png"]
    scored, broken = rows["a.png"], rows["b.png"]
    assert (scored.source, scored.station, scored.photo_sha256) == ("watch", "line-7", file_sha256(photo))
    assert (scored.model_name, scored.model_version, scored.model_sha256) == ("tiny", 1, model_sha256(served_model))
    assert scored.verdict in ("ok", "ng") and scored.threshold == 30.0 and Path(scored.overlay_path).is_file()
    assert (broken.verdict, broken.score, broken.stored_path) == ("error", None, str(out / "rejected" / "b.png"))
    assert "b.png" in broken.error or broken.error

"""Reviewing a station's verdicts through the service (the History view's API): listing with
filters, files served only from the station's folders, reviews and who gave them, the teach-in
queue applied with a supervisor's token as a new model version, the export of reviewed photos
that ``patchcore evaluate`` runs on, and drift figures in the API and in /metrics.

The station is real: ``patchcore watch`` (:class:`~patchcore.station.watch.Station`) scores
photos of a tiny model into a SQLite history with overlays, masks and evidence crops; each test
serves a copy of its database and of the model, so that reviews and teach-ins stay its own.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import FAST, product_image
from patchcore.cli.main import main
from patchcore.engine import persistence
from patchcore.station.history import History
from patchcore.station.schema import Inspection
from test_history_db import location, postgresql_server, postgresql_url  # noqa: F401 - fixtures: SQLite and PostgreSQL

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from patchcore.serving.app import create_app  # noqa: E402
from patchcore.serving.teach_tokens import ensure_token_file  # noqa: E402

UTC = dt.timezone.utc
MODEL = "line"


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _variation(rng: np.random.Generator) -> np.ndarray:
    """A good product under other light: flagged by a model that never saw it."""
    return np.clip(product_image(rng) * np.array([1.25, 1.0, 0.8]), 0, 255).astype(np.uint8)


def run_station(root: Path, photos: dict[str, bytes]) -> dict[str, Path]:
    """A tiny model with a calibrated threshold (``root/models/line``), and ``patchcore watch``
    run over ``photos`` with evidence and ``--sort ok,ng`` into ``root/out`` (its history.db)."""
    from patchcore import PatchCore
    from test_watch import Running

    rng = np.random.default_rng(7)
    model = PatchCore(**FAST, coreset_ratio=0.25, resize=64, crop=64, batch_size=4)
    model.fit([product_image(rng) for _ in range(8)])
    model.calibrate_threshold([product_image(rng) for _ in range(6)], max_false_positive_rate=0.1)
    model_dir = root / "models" / MODEL
    model.save(model_dir, event={"action": "fit", "who": "test"})
    inbox, out = root / "inbox", root / "out"
    inbox.mkdir()
    for name, data in photos.items():
        (inbox / name).write_bytes(data)
    with Running(model_dir, inbox, out, stop_after=len(photos), evidence=2, sort=("ok", "ng"), settle=0.05) as run:
        run.wait_for_results(len(photos))
        run.stop()
    return {"model": model_dir, "out": out, "db": out / "history.db"}


@pytest.fixture(scope="module")
def station(tmp_path_factory):
    rng = np.random.default_rng(11)
    photos = {f"good{i}.png": _png(product_image(rng)) for i in range(3)}
    photos |= {f"defect{i}.png": _png(product_image(rng, defect=(20 + 4 * i, 24, 14))) for i in range(2)}
    photos |= {f"light{i}.png": _png(_variation(rng)) for i in range(3)}
    found = run_station(tmp_path_factory.mktemp("review-station"), photos)
    found["photos"] = photos
    return found


@pytest.fixture
def service(station, tmp_path):
    """The app over copies of the station's database and model, with the token of 'alice'."""
    shutil.copy(station["db"], tmp_path / "history.db")
    shutil.copytree(station["model"], tmp_path / MODEL)
    tokens, token = ensure_token_file(tmp_path / "tokens", "alice")
    app = create_app({MODEL: tmp_path / MODEL}, history_url=tmp_path / "history.db", teach_token_file=tokens,
                     station_folders=[station["out"]], teach_max_images=2, drift_window=50, drift_multiple=2.0)
    with TestClient(app) as client:
        yield client, token, tmp_path


def test_the_queue_holds_the_latest_false_alarms_and_claims_each_once(location):
    """The queue's bookkeeping on SQLite and on a real PostgreSQL server."""
    with History(location) as history:
        rows = [Inspection(source="watch", station="s", photo_path=f"/in/{i}.png", photo_sha256=f"{i:064d}",
                           model_name=name, model_version=1, model_sha256="0" * 64, score=3.0, verdict="ng")
                for i, name in enumerate([MODEL, MODEL, MODEL, "other"])]
        history.record(rows)
        first, second, third, other = (row.id for row in rows)
        history.add_review(first, "false_alarm", "anna")
        history.add_review(second, "false_alarm", "anna")
        history.add_review(second, "confirmed_defect", "bob")  # the latest review counts: not queued
        history.add_review(third, "confirmed_defect", "anna")
        history.add_review(third, "false_alarm", "alice", verified=True)
        history.add_review(other, "false_alarm", "anna")
        queue = history.teach_in_queue(MODEL)
        assert [review.inspection_id for review in queue] == [first, third]
        assert queue[1].who_verified and queue[1].inspection.photo_path == "/in/2.png"
        ids = [review.id for review in queue]
        assert history.claim_teach_in(ids, "alice") == sorted(ids)
        assert history.claim_teach_in(ids, "carol") == []  # claimed: another apply cannot take them
        assert history.teach_in_queue(MODEL) == []
        assert [r.inspection_id for r in history.teach_in_queue(MODEL, stale_after=0)] == [first, third]
        history.release_teach_in([ids[1]])  # its teach-in failed: queued again
        assert [r.inspection_id for r in history.teach_in_queue(MODEL)] == [third]
        history.finish_teach_in([ids[0]], 7)
        assert [r.inspection_id for r in history.teach_in_queue(MODEL)] == [third]  # taught: out of the queue
        assert history.claim_teach_in([ids[0]], "carol") == []
        history.add_review(first, "false_alarm", "dave")  # marked again (version 7 was rolled back): queued again
        assert [r.inspection_id for r in history.teach_in_queue(MODEL)] == [third, first]
        taught = history.inspection(first).reviews[0]
        assert (taught.taught_by, taught.taught_version) == ("alice", 7) and taught.taught_at is not None
        assert [(i.id, r.verdict) for i, r in history.reviewed(model_name=MODEL)] == [
            (first, "false_alarm"), (second, "confirmed_defect"), (third, "false_alarm")]
        assert history.reviewed(model_name=MODEL)[0][1].who == "dave"
        assert history.count_inspections(reviewed=True) == 4 and history.model_names() == [MODEL, "other"]
        assert history.recent_scores(MODEL, 2) == [3.0, 3.0]


def _by_photo(client) -> dict[str, dict]:
    answer = client.get("/v1/history/inspections", params={"limit": 200})
    assert answer.status_code == 200, answer.text
    return {row["photo"]: row for row in answer.json()["inspections"]}


def _review(client, inspection_id: int, verdict: str, headers: dict | None = None, **body):
    return client.post(f"/v1/history/inspections/{inspection_id}/reviews", json={"verdict": verdict, **body},
                       headers=headers)


def test_listing_filters_by_model_verdict_score_time_and_review(service, station):
    client, _, _ = service
    everything = client.get("/v1/history/inspections").json()
    assert everything["total"] == len(station["photos"]) == len(everything["inspections"])
    ng = client.get("/v1/history/inspections", params={"verdict": "ng"}).json()["inspections"]
    ok = client.get("/v1/history/inspections", params={"verdict": "ok"}).json()["inspections"]
    assert {row["photo"] for row in ng} >= {"defect0.png", "defect1.png", "light0.png"}
    assert len(ng) + len(ok) == len(station["photos"]) and all(row["score"] >= row["threshold"] for row in ng)
    scores = sorted(row["score"] for row in everything["inspections"])
    middle = client.get("/v1/history/inspections", params={"min_score": scores[2], "max_score": scores[5]}).json()
    assert sorted(row["score"] for row in middle["inspections"]) == scores[2:6] and middle["total"] == 4
    assert client.get("/v1/history/inspections", params={"model": "other"}).json()["total"] == 0
    assert client.get("/v1/history/inspections", params={"model": MODEL}).json()["total"] == len(station["photos"])
    later = (dt.datetime.now(UTC) + dt.timedelta(minutes=1)).isoformat()
    assert client.get("/v1/history/inspections", params={"since": later}).json()["total"] == 0
    assert client.get("/v1/history/inspections", params={"until": later}).json()["total"] == len(station["photos"])
    naive = client.get("/v1/history/inspections", params={"since": "2026-01-01T08:00:00"})
    assert naive.status_code == 422 and "zone" in naive.json()["error"]
    # Paging: newest first, with the total.
    first = client.get("/v1/history/inspections", params={"limit": 3}).json()
    rest = client.get("/v1/history/inspections", params={"limit": 10, "offset": 3}).json()
    assert [r["id"] for r in first["inspections"] + rest["inspections"]] == [r["id"] for r in everything["inspections"]]
    assert first["total"] == rest["total"] == len(station["photos"])
    # Reviewed or not.
    target = ng[0]["id"]
    assert _review(client, target, "confirmed_defect", who="bob").status_code == 201
    reviewed = client.get("/v1/history/inspections", params={"reviewed": True}).json()["inspections"]
    assert [row["id"] for row in reviewed] == [target] and reviewed[0]["review"] == "confirmed_defect"
    assert client.get("/v1/history/inspections", params={"reviewed": False}).json()["total"] == len(station["photos"]) - 1
    summary = client.get("/v1/history").json()
    assert summary["enabled"] and summary["models"] == [MODEL] and sum(summary["verdicts"].values()) == len(station["photos"])


def test_an_inspection_comes_with_its_overlay_mask_photo_and_evidence(service, station):
    client, _, _ = service
    row = _by_photo(client)["defect0.png"]
    one = client.get(f"/v1/history/inspections/{row['id']}").json()
    assert one["verdict"] == "ng" and [crop["rank"] for crop in one["evidence"]] == [1, 2]
    with History(station["db"]) as history:
        recorded = history.inspection(row["id"])
    for url, path in ((one["files"]["overlay"], recorded.overlay_path), (one["files"]["mask"], recorded.mask_path),
                      (one["evidence"][0]["url"], recorded.evidence[0].picture_path)):
        answer = client.get(url)
        assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
        assert answer.content == Path(path).read_bytes()
    photo = client.get(one["files"]["photo"])
    assert photo.status_code == 200 and photo.content == station["photos"]["defect0.png"]
    assert Path(recorded.stored_path).parent.name == "ng"  # sorted by watch: read where it lies now
    assert client.get(f"/v1/history/inspections/{row['id']}/evidence/3").status_code == 404
    assert client.get("/v1/history/inspections/999999").status_code == 404


def test_files_outside_the_stations_folders_are_refused(service, station, tmp_path):
    client, _, folder = service
    secret = tmp_path / "secret.png"
    secret.write_bytes(station["photos"]["good0.png"])
    link = station["out"] / "overlays" / "link-to-secret.png"
    link.symlink_to(secret)
    try:
        recorded = {
            "absolute": "/etc/passwd",
            "traversal": str(station["out"] / "overlays" / ".." / ".." / "secret.png"),
            "symlink": str(link),
            "not_an_image": str(station["db"]),
        }
        with History(folder / "history.db") as history:
            rows = [Inspection(source="watch", station="s", photo_path=f"/x/{name}.png", photo_sha256="0" * 64,
                               model_name=MODEL, model_version=1, model_sha256="0" * 64, score=1.0, verdict="ok",
                               overlay_path=path) for name, path in recorded.items()]
            rows.append(Inspection(source="service", station="s", photo_path="../../secret.png", photo_sha256="0" * 64,
                                   model_name=MODEL, model_version=1, model_sha256="0" * 64, score=1.0, verdict="ok"))
            history.record(rows)
            ids = [row.id for row in rows]
        for inspection_id, name in zip(ids, recorded):
            answer = client.get(f"/v1/history/inspections/{inspection_id}/files/overlay")
            assert answer.status_code == 403, name
            assert "outside the station's folders" in answer.json()["error"] or "not an image" in answer.json()["error"]
            assert station["photos"]["good0.png"] not in answer.content
        upload = client.get(f"/v1/history/inspections/{ids[-1]}/files/photo")  # an upload's name is no path
        assert upload.status_code == 404 and "upload" in upload.json()["error"]
        assert client.get(f"/v1/history/inspections/{ids[0]}/files/..%2F..%2Fetc%2Fpasswd").status_code in (404, 422)
    finally:
        link.unlink()


def test_reviews_record_who_and_change_no_model(service, station):
    client, token, folder = service
    rows = _by_photo(client)
    light = rows["light0.png"]["id"]
    operator = _review(client, light, "false_alarm", who="  anna  ", note="just brighter light")
    assert operator.status_code == 201, operator.text
    review = operator.json()["review"]
    assert (review["who"], review["who_verified"], review["note"]) == ("anna", False, "just brighter light")
    supervisor = _review(client, rows["defect1.png"]["id"], "confirmed_defect", who="ignored",
                         headers={"Authorization": f"Bearer {token}"})
    assert supervisor.status_code == 201 and supervisor.json()["review"]["who"] == "alice"
    assert supervisor.json()["review"]["who_verified"] is True
    wrong = _review(client, light, "confirmed_defect", who="mallory", headers={"Authorization": "Bearer " + "x" * 43})
    assert wrong.status_code == 401
    assert _review(client, light, "false_alarm").status_code == 401  # nobody named
    assert _review(client, light, "looks fine", who="anna").status_code == 422
    foreign = _review(client, light, "confirmed_defect", who="anna", headers={"Origin": "https://evil.example"})
    assert foreign.status_code == 403
    assert _review(client, 999999, "false_alarm", who="anna").status_code == 404
    one = client.get(f"/v1/history/inspections/{light}").json()
    assert [(r["verdict"], r["who"]) for r in one["reviews"]] == [("false_alarm", "anna")]
    assert persistence.read_manifest(folder / MODEL)["version"] == 1  # reviews never teach


def test_applying_the_queue_needs_the_token_and_makes_a_new_version_naming_the_supervisor(service, station):
    client, token, folder = service
    rows = _by_photo(client)
    false_alarms = [rows[f"light{i}.png"] for i in range(3)]
    assert all(row["verdict"] == "ng" for row in false_alarms)
    for row in false_alarms:
        assert _review(client, row["id"], "false_alarm", who="anna").status_code == 201
    _review(client, rows["defect0.png"]["id"], "confirmed_defect", who="anna")
    queue = client.get("/v1/history/queue", params={"model": MODEL}).json()["entries"]
    assert [entry["inspection"]["id"] for entry in queue] == [row["id"] for row in false_alarms]
    assert all(entry["available"] for entry in queue)

    apply = "/v1/history/queue/apply"
    missing = client.post(apply, params={"model": MODEL})
    assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith("Bearer")
    wrong = client.post(apply, params={"model": MODEL}, headers={"Authorization": "Bearer " + "y" * 43})
    assert wrong.status_code == 401
    foreign = client.post(apply, params={"model": MODEL},
                          headers={"Authorization": f"Bearer {token}", "Origin": "https://evil.example"})
    assert foreign.status_code == 403
    assert persistence.read_manifest(folder / MODEL)["version"] == 1
    assert len(client.get("/v1/history/queue", params={"model": MODEL}).json()["entries"]) == 3

    before = _score(client, station["photos"]["light0.png"])
    auth = {"Authorization": f"Bearer {token}"}
    applied = client.post(apply, params={"model": MODEL}, headers=auth)
    assert applied.status_code == 200, applied.text
    body = applied.json()
    # Bounded as teach-in is (teach_max_images=2): the oldest two, the third stays queued.
    assert body["version"] == 2 and body["who"] == "alice" and body["left_in_queue"] == 1
    assert body["taught_inspections"] == [false_alarms[0]["id"], false_alarms[1]["id"]]
    entry = persistence.history(folder / MODEL)[-1]
    assert entry["action"] == "teach-in" and entry["who"] == "alice" and entry["version"] == 2
    assert [s["sha256"] for s in entry["sources"]] == [
        hashlib.sha256(station["photos"][f"light{i}.png"]).hexdigest() for i in range(2)]
    after = _score(client, station["photos"]["light0.png"])
    assert after["model_version"] == 2 and after["score"] < before["score"] and after["is_anomalous"] is False
    one = client.get(f"/v1/history/inspections/{false_alarms[0]['id']}").json()
    assert one["reviews"][-1]["taught_version"] == 2 and one["reviews"][-1]["taught_by"] == "alice"

    again = client.post(apply, params={"model": MODEL}, headers=auth)
    assert again.status_code == 200 and again.json()["version"] == 3 and again.json()["left_in_queue"] == 0
    assert client.get("/v1/history/queue", params={"model": MODEL}).json()["entries"] == []
    empty = client.post(apply, params={"model": MODEL}, headers=auth)
    assert empty.status_code == 409 and "empty" in empty.json()["error"]
    # Undone as any teach-in: rollback restores the version before.
    undo = client.post(f"/v1/models/{MODEL}/rollback", headers=auth)
    assert undo.status_code == 200 and undo.json()["restored_version"] == 2
    assert client.post(apply, params={"model": "unknown"}, headers=auth).status_code == 404


def test_a_photo_replaced_since_it_was_scored_is_not_taught(service, station, tmp_path):
    _, token, folder = service
    with History(folder / "history.db") as history:
        row = history.inspections(limit=1)[0]
        moved = tmp_path / "replaced" / "photo.png"
        moved.parent.mkdir()
        moved.write_bytes(station["photos"]["good1.png"])  # other bytes than the inspection scored
        history.set_stored_path(row.id, str(moved))
    app = create_app({MODEL: folder / MODEL}, history_url=folder / "history.db", teach_token_file=folder / "tokens",
                     station_folders=[tmp_path / "replaced"])
    with TestClient(app) as other:
        assert other.post(f"/v1/history/inspections/{row.id}/reviews",
                          json={"verdict": "false_alarm", "who": "anna"}).status_code == 201
        assert other.get(f"/v1/history/inspections/{row.id}/files/photo").status_code == 404
        refused = other.post("/v1/history/queue/apply", params={"model": MODEL},
                             headers={"Authorization": f"Bearer {token}"})
        assert refused.status_code == 409 and "replaced" in refused.json()["error"]
    assert persistence.read_manifest(folder / MODEL)["version"] == 1


def _score(client, data: bytes) -> dict:
    answer = client.post(f"/v1/models/{MODEL}/predict", content=data, headers={"content-type": "image/png"})
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_drift_figures_in_the_api_and_in_metrics(service, station):
    client, _, _ = service
    drift = client.get("/v1/history/drift").json()
    figures = drift["models"][MODEL]
    assert drift["window"] == 50 and figures["verdicts"] == len(station["photos"])
    flagged = sum(row["verdict"] == "ng" for row in _by_photo(client).values())
    assert figures["flagged"] == flagged and figures["flagged_share"] == pytest.approx(flagged / len(station["photos"]))
    assert figures["expected_share"] == pytest.approx(1 / 7)  # fpr 0.1 on 6 images: no better than 1/7
    assert figures["warning"] is None  # too few verdicts to judge
    assert set(figures["quantiles"]) == {"p50", "p90", "p99"}
    metrics = client.get("/metrics").text
    assert f'patchcore_drift_window_verdicts{{model="{MODEL}"}} {float(len(station["photos"]))}' in metrics
    assert f'patchcore_drift_flagged_share{{model="{MODEL}"}}' in metrics
    assert f'patchcore_drift_warning{{model="{MODEL}"}} 0.0' in metrics


def test_without_a_history_database_the_history_routes_say_so(station):
    with TestClient(create_app({MODEL: station["model"]})) as client:
        assert client.get("/v1/history").json() == {"enabled": False, "models": [], "verdicts": {}}
        for path in ("/v1/history/inspections", "/v1/history/queue", "/v1/history/drift", "/v1/history/inspections/1"):
            answer = client.get(path)
            assert answer.status_code == 404 and "--history" in answer.json()["error"], path


def test_export_writes_reviewed_photos_as_an_evaluation_layout_that_evaluate_runs_on(service, station, tmp_path, capsys):
    client, _, folder = service
    rows = _by_photo(client)
    for name in ("light0.png", "light1.png", "good0.png"):
        _review(client, rows[name]["id"], "false_alarm", who="anna")
    for name in ("defect0.png", "defect1.png"):
        _review(client, rows[name]["id"], "confirmed_defect", who="anna")
    _review(client, rows["light2.png"]["id"], "false_alarm", who="anna")  # changed their mind: the latest counts
    _review(client, rows["light2.png"]["id"], "confirmed_defect", who="bob")
    out = tmp_path / "reviewed"
    assert main(["review", "export", str(folder / "history.db"), "-o", str(out)]) == 0
    good = sorted(path.name.split("-", 1)[1] for path in (out / "good").iterdir())
    defect = sorted(path.name.split("-", 1)[1] for path in (out / "defect").iterdir())
    assert good == ["good0.png", "light0.png", "light1.png"] and defect == ["defect0.png", "defect1.png", "light2.png"]
    for path in (out / "good").iterdir():
        assert path.read_bytes() == station["photos"][path.name.split("-", 1)[1]]
    with History(station["db"]) as history:  # copies: the station's photos stay where they are
        assert all(Path(row.stored_path).is_file() for row in history.inspections(limit=None))
    assert "wrote 3 false alarms" in capsys.readouterr().out
    assert main(["review", "export", str(folder / "history.db"), "-o", str(out)]) == 2  # not into a used folder

    train = tmp_path / "train"
    train.mkdir()
    rng = np.random.default_rng(7)
    for i in range(6):
        Image.fromarray(product_image(rng)).save(train / f"t{i}.png")
    report = tmp_path / "report"
    assert main(["evaluate", str(out), "--train", str(train), "-o", str(report), "--json", "--resize", "64",
                 "--crop", "64", "--coreset-ratio", "0.25", "--backbone", "efficientnet_lite0",
                 "--search-backend", "numpy"]) == 0
    row = json.loads((report / "reviewed" / "metrics.json").read_text())
    assert row["n_test_good"] == 3 and row["n_test_defective"] == 3 and row["image_auroc"] is not None


def test_the_history_routes_answer_as_their_openapi_description_says(station, tmp_path):
    """The History view's routes with a database behind them, fuzzed from their OpenAPI
    description as tests/test_openapi.py fuzzes the others: documented statuses only, no 5xx."""
    schemathesis = pytest.importorskip("schemathesis")
    from schemathesis.config import SchemathesisConfig
    from test_openapi import schema_problems

    shutil.copy(station["db"], tmp_path / "history.db")
    app = create_app({MODEL: station["model"]}, history_url=tmp_path / "history.db", station_folders=[station["out"]])
    config = {"generation": {"max-examples": 15}, "seed": 20261207,
              "parameters": {"path.inspection_id": {"dictionary": "ids", "probability": 0.8}},
              "dictionaries": {"ids": {"values": [1, 2, 3]}}}
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=SchemathesisConfig.from_dict(config))
    scenarios, problems = schema_problems(schema.include(path_regex="^/v1/history"))
    assert scenarios > 0
    assert not problems, "\n\n".join(problems)

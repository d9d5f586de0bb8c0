"""Teach-in and rollback through the service, tried as a client would: no token, a wrong token, a
foreign web page, a request through a proxy on this machine, oversized requests, several workers."""

import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import FAST, product_image
from patchcore import PatchCore, load_model
from patchcore.engine import persistence

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from patchcore.serving.app import create_app  # noqa: E402
from patchcore.serving.teach_tokens import TokenFileError, add_token, ensure_token_file  # noqa: E402


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    rng = np.random.default_rng(4)
    train = [product_image(rng, (64, 96)) for _ in range(10)]
    calibration = [product_image(rng, (64, 96)) for _ in range(8)]
    variation = [np.clip(product_image(rng, (64, 96)) * np.array([1.25, 1.0, 0.8]), 0, 255).astype(np.uint8)
                 for _ in range(7)]
    model = PatchCore(**FAST, resize=64, coreset_ratio=0.25).fit(train)
    model.set_threshold(1.15 * max(p.score for p in model.predict(calibration, maps=False)), source="test")
    return model, variation


@pytest.fixture
def served(parts, tmp_path):
    """A saved model, a token file with the token of 'alice', and the app serving them."""
    model, variation = parts
    model.save(tmp_path / "m", event={"action": "fit", "who": "test"})
    tokens, token = ensure_token_file(tmp_path / "tokens", "alice")
    app = create_app({"m": tmp_path / "m"}, teach_token_file=tokens, teach_max_images=4)
    return app, token, variation, tmp_path


def _files(images):
    return [("file", (f"{i}.png", _png(image), "image/png")) for i, image in enumerate(images)]


def _score(client, image) -> dict:
    answer = client.post("/v1/models/m/predict", content=_png(image), headers={"content-type": "image/png"})
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_teach_in_needs_a_valid_token_from_every_address_loopback_included(served):
    app, token, variation, tmp_path = served
    # Behind a reverse proxy every request comes from 127.0.0.1: the address proves nothing.
    with TestClient(app, client=("127.0.0.1", 5000)) as proxy:
        missing = proxy.post("/v1/models/m/good", files=_files(variation[:2]))
        assert missing.status_code == 401 and "Authorization: Bearer" in missing.json()["error"]
        assert missing.headers["www-authenticate"].startswith("Bearer")
        wrong = proxy.post("/v1/models/m/good", files=_files(variation[:2]),
                           headers={"Authorization": "Bearer " + "x" * 43})
        assert wrong.status_code == 401 and "not valid" in wrong.json()["error"]
        basic = proxy.post("/v1/models/m/good", files=_files(variation[:2]), headers={"Authorization": "Basic YTpi"})
        assert basic.status_code == 401
    assert persistence.read_manifest(tmp_path / "m")["version"] == 1  # nothing changed
    # With the token, any address may teach.
    with TestClient(app, client=("10.1.2.3", 5000)) as remote:
        before = _score(remote, variation[-1])
        assert before["is_anomalous"] is True and before["model_version"] == 1
        answer = remote.post("/v1/models/m/good", files=_files(variation[:4]), headers={"Authorization": f"Bearer {token}"})
        assert answer.status_code == 200, answer.text
        assert answer.json()["images"] == 4 and answer.json()["version"] == 2
        after = _score(remote, variation[-1])
        assert after["is_anomalous"] is False and after["model_version"] == 2
    entry = persistence.history(tmp_path / "m")[-1]
    assert entry["action"] == "teach-in" and entry["who"] == "alice" and entry["images"] == 4
    assert [s["sha256"] for s in entry["sources"]] == [hashlib.sha256(_png(v)).hexdigest() for v in variation[:4]]


def test_a_web_page_of_another_site_cannot_teach_even_with_the_token(served):
    app, token, variation, tmp_path = served
    auth = {"Authorization": f"Bearer {token}"}
    with TestClient(app) as client:
        for foreign in ({"Origin": "https://evil.example"}, {"Origin": "null"},
                        {"Sec-Fetch-Site": "cross-site"}, {"Origin": "http://testserver.evil.example"}):
            refused = client.post("/v1/models/m/good", files=_files(variation[:1]), headers={**auth, **foreign})
            assert refused.status_code == 403 and "another site" in refused.json()["error"], foreign
        rollback = client.post("/v1/models/m/rollback", headers={**auth, "Origin": "https://evil.example"})
        assert rollback.status_code == 403
        assert persistence.read_manifest(tmp_path / "m")["version"] == 1
        # The service's own page is same-origin: its Origin names the host it was served from.
        own = client.post("/v1/models/m/good", files=_files(variation[:1]),
                          headers={**auth, "Origin": "http://testserver", "Sec-Fetch-Site": "same-origin"})
        assert own.status_code == 200, own.text
        # Behind a proxy that rewrites Host, the proxy's forwarded host (or --allow-origin) is the page's.
        proxied = client.post("/v1/models/m/good", files=_files(variation[1:2]),
                              headers={**auth, "Origin": "https://qc.factory.example", "Host": "127.0.0.1:8000",
                                       "X-Forwarded-Host": "qc.factory.example"})
        assert proxied.status_code == 200, proxied.text


def test_without_a_token_file_teach_in_and_rollback_are_off(parts, tmp_path):
    model, variation = parts
    model.save(tmp_path / "m")
    with TestClient(create_app({"m": tmp_path / "m"})) as client:
        for path in ("/v1/models/m/good", "/v1/models/m/rollback"):
            answer = client.post(path, files=_files(variation[:1]), headers={"Authorization": "Bearer " + "a" * 43})
            assert answer.status_code == 403 and "teach-in is off" in answer.json()["error"]


def test_a_token_file_others_can_read_is_refused_and_tokens_are_read_again_on_every_request(served, parts):
    app, token, variation, tmp_path = served
    loose = tmp_path / "loose-tokens"
    add_token(loose, "bob")
    os.chmod(loose, 0o644)
    with pytest.raises(TokenFileError, match="chmod 600"):
        create_app({"m": tmp_path / "m"}, teach_token_file=loose)
    # A token added while the service runs works at once; one removed stops working at once.
    new = add_token(tmp_path / "tokens", "carol")
    with TestClient(app) as client:
        answer = client.post("/v1/models/m/good", files=_files(variation[:1]), headers={"Authorization": f"Bearer {new}"})
        assert answer.status_code == 200 and persistence.history(tmp_path / "m")[-1]["who"] == "carol"
        lines = (tmp_path / "tokens").read_text().splitlines()
        (tmp_path / "tokens").write_text("\n".join(line for line in lines if not line.startswith("carol")) + "\n")
        again = client.post("/v1/models/m/good", files=_files(variation[:1]), headers={"Authorization": f"Bearer {new}"})
        assert again.status_code == 401


def test_teach_in_requests_are_bounded(served, parts, tmp_path):
    app, token, variation, _ = served
    auth = {"Authorization": f"Bearer {token}"}
    with TestClient(app) as client:
        too_many = client.post("/v1/models/m/good", files=_files(variation[:5]), headers=auth)  # the limit is 4
        assert too_many.status_code == 413 and "at most 4 images" in too_many.json()["error"]
    model, _ = parts
    model.save(tmp_path / "small")
    tokens, small_token = ensure_token_file(tmp_path / "small-tokens")
    tight = create_app({"m": tmp_path / "small"}, teach_token_file=tokens, teach_max_megapixels=0.01)
    with TestClient(tight) as client:
        big = client.post("/v1/models/m/good", files=_files(variation[:2]),  # 2 x 6,144 pixels > 10,000
                          headers={"Authorization": f"Bearer {small_token}"})
        assert big.status_code == 413 and "megapixels" in big.json()["error"]
    # A full memory bank is refused with what to do about it.
    full = PatchCore(**FAST, resize=64, coreset_ratio=0.25).fit(variation[:2])
    full.set_params(max_bank_size=full.memory_bank_.shape[0]).save(tmp_path / "full")
    with TestClient(create_app({"m": tmp_path / "full"}, teach_token_file=tokens)) as client:
        answer = client.post("/v1/models/m/good", files=_files(variation[2:3]), headers={"Authorization": f"Bearer {small_token}"})
        assert answer.status_code == 409 and "memory bank is full" in answer.json()["error"]


def test_rollback_through_the_service_restores_the_scores_bit_for_bit(served):
    app, token, variation, tmp_path = served
    auth = {"Authorization": f"Bearer {token}"}
    with TestClient(app) as client:
        before = _score(client, variation[-1])
        assert client.post("/v1/models/m/good", files=_files(variation[:4]), headers=auth).status_code == 200
        assert _score(client, variation[-1])["score"] != before["score"]
        assert client.post("/v1/models/m/rollback", headers={"Origin": "http://testserver"}).status_code == 401
        answer = client.post("/v1/models/m/rollback", headers=auth)
        assert answer.status_code == 200, answer.text
        assert answer.json()["version"] == 3 and answer.json()["restored_version"] == 1
        after = _score(client, variation[-1])
        assert after["score"] == before["score"] and after["model_version"] == 3
        history = client.get("/v1/models/m/history").json()
        assert [v["action"] for v in history["versions"]] == ["fit", "teach-in", "rollback"]
        assert history["versions"][-1]["who"] == "alice" and history["current_version"] == 3
        missing = client.post("/v1/models/m/rollback?to=99", headers=auth)
        assert missing.status_code == 409 and "cannot be restored" in missing.json()["error"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_several_workers_serve_one_model_version_and_never_overwrite_each_others_teach_in(parts, tmp_path):
    import httpx

    from patchcore.engine.export import export_model

    model, variation = parts
    export_model(model, tmp_path / "m")  # torch-free workers start fast
    tokens, token = ensure_token_file(tmp_path / "tokens")
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "patchcore.cli.main", "serve", str(tmp_path / "m"), "--port", str(port), "--workers", "2",
         "--threads", "1", "--teach-token-file", str(tokens)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        pids = set()
        # A new connection for every request, so that both workers take requests.
        with httpx.Client(base_url=url, timeout=60, headers={"Connection": "close"}) as client:
            while True:  # ready when both workers answer (each names its process in the metrics)
                assert server.poll() is None and time.monotonic() < deadline, "the service did not start"
                try:
                    answer = client.get("/healthz")
                except httpx.TransportError:
                    continue
                if answer.status_code == 200:
                    pids.add(answer.json().get("pid"))
                    if len(pids) >= 2:
                        break
            auth = {"Authorization": f"Bearer {token}"}
            with ThreadPoolExecutor(2) as pool:  # two teach-ins at once: each lands in its own version
                answers = list(pool.map(lambda images: client.post("/v1/models/m/good", files=_files(images),
                                                                   headers=auth), (variation[:2], variation[2:4])))
            assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
            assert sorted(a.json()["version"] for a in answers) == [2, 3]
            added = sum(a.json()["added_to_bank"] for a in answers)
            probe = _png(variation[-1])
            # Both workers are up and take connections in turn: each of them scores some of these.
            seen = [client.post("/v1/models/m/predict", content=probe, headers={"content-type": "image/png"}).json()
                    for _ in range(16)]
            # Metrics are summed over the workers: every scrape, whichever worker answers, counts all 16.
            scrapes = [client.get("/metrics").text for _ in range(4)]
    finally:
        server.terminate()
        server.wait(timeout=60)
    assert {answer["model_version"] for answer in seen} == {3}  # every worker scores with the newest version
    assert len({answer["score"] for answer in seen}) == 1
    for text in scrapes:
        assert 'patchcore_inferences_total{model="m",outcome="ok"} 16.0' in text
    final = load_model(tmp_path / "m")
    assert final.memory_bank_.shape[0] == model.memory_bank_.shape[0] + added  # neither teach-in was lost
    assert [e["who"] for e in persistence.history(tmp_path / "m")][1:] == ["supervisor", "supervisor"]
    assert json.loads((tmp_path / "m" / "patchcore.json").read_text())["version"] == 3
    assert Path(tokens).stat().st_mode & 0o077 == 0

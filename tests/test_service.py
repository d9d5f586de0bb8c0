"""The HTTP inference service: every endpoint, a corpus of bad uploads, load limits, concurrency, fuzzing."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
import anyio.to_thread  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


from conftest import FAST
from patchcore import PatchCore  # noqa: E402
from patchcore.engine import persistence  # noqa: E402
from patchcore.errors import ModelFormatError  # noqa: E402
from patchcore.engine.images import read_image  # noqa: E402
from patchcore.serving.app import create_app  # noqa: E402
from patchcore.serving.models import discover_models  # noqa: E402
from patchcore.serving.routes_dependencies import get_models  # noqa: E402

BAD_INPUTS = Path(__file__).parent / "data" / "bad_inputs"
PREDICT = "/v1/models/tiny/predict"


def _training_images(n: int = 8, size: int = 64) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size]
    base = np.stack([x * 4, y * 4, (x + y) * 2], axis=-1).astype(np.float64)
    return [np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8) for _ in range(n)]


def _png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _test_images() -> list[bytes]:
    rng = np.random.default_rng(1)
    images = []
    for i in range(6):
        array = _training_images(1)[0].copy()
        if i % 2:
            array[10 + i : 30 + i, 20:40] = rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)  # a "defect"
        images.append(_png_bytes(array))
    return images


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("models") / "tiny"
    # No threshold (most tests here score without one; a self-calibrated model is served below).
    PatchCore(**FAST, coreset_ratio=0.1, resize=64, crop=64, calibration="none").fit(_training_images()).save(directory)
    return directory


@pytest.fixture(scope="module")
def app(model_dir):
    return create_app({"tiny": model_dir})


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture
def threshold(app):
    """Give the served model a threshold for one test (threshold_ is set by calibration elsewhere)."""
    model = app.state.models["tiny"].model
    before = {name: getattr(model, name) for name in ("threshold_", "pixel_threshold_", "threshold_source_", "calibration_")}
    model.set_threshold(60.0, pixel_threshold=30.0)
    yield 60.0
    for name, value in before.items():
        setattr(model, name, value)


def test_a_saved_threshold_is_served(model_dir, tmp_path):
    model = PatchCore.load(model_dir).set_threshold(55.5, source="test")
    model.save(tmp_path / "with_threshold")
    with TestClient(create_app({"t": tmp_path / "with_threshold"})) as client:
        entry = client.get("/v1/models").json()["models"][0]
        assert (entry["threshold"], entry["threshold_source"]) == (55.5, "test")
        body = client.post("/v1/models/t/predict", content=_test_images()[1], headers={"content-type": "image/png"}).json()
        assert body["is_anomalous"] == (body["score"] >= 55.5)


def _post_raw(client, data: bytes, content_type: str = "application/octet-stream", query: str = ""):
    return client.post(PREDICT + query, content=data, headers={"content-type": content_type})


def _post_file(client, data: bytes, name: str = "image.png", query: str = "", field: str = "file"):
    return client.post(PREDICT + query, files={field: (name, data, "application/octet-stream")})


def _assert_healthy(client) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200 and response.json()["status"] == "ok"


def _decode_png(text: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(text)))


# -- endpoints -----------------------------------------------------------------------------------


def test_healthz(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json()["models"] == ["tiny"]
    assert response.headers["x-content-type-options"] == "nosniff"


def test_the_kind_of_threshold_is_served(model_dir, tmp_path):
    PatchCore(**FAST, coreset_ratio=0.1, resize=64, crop=64).fit(_training_images()).save(tmp_path / "self")
    with TestClient(create_app({"self": tmp_path / "self", "none": model_dir})) as client:
        entries = {entry["name"]: entry for entry in client.get("/v1/models").json()["models"]}
        assert entries["self"]["threshold_kind"] == "self-calibrated from 8 training photos"
        assert entries["self"]["calibration"].startswith("expected false-positive rate 11.1% (95% interval")  # 1/9
        assert (entries["none"]["threshold_kind"], entries["none"]["calibration"]) == ("none", None)
        for data in _test_images()[:2]:
            body = client.post("/v1/models/self/predict", content=data, headers={"content-type": "image/png"}).json()
            assert body["threshold_kind"] == "self-calibrated from 8 training photos"
            assert body["is_anomalous"] == (body["score"] >= entries["self"]["threshold"])


def test_list_and_describe_models(client, model_dir):
    listed = client.get("/v1/models").json()["models"]
    assert len(listed) == 1
    entry = listed[0]
    model = PatchCore.load(model_dir)
    assert entry["name"] == "tiny"
    assert entry["backbone"] == "efficientnet_lite0"
    assert entry["memory_bank_size"] == model.memory_bank_.shape[0]
    assert entry["threshold"] is None
    assert entry["format_version"] == persistence.FORMAT_VERSION
    assert client.get("/v1/models/tiny").json() == entry
    response = client.get("/v1/models/nope")
    assert response.status_code == 404 and "nope" in response.json()["error"]


def test_predict_multipart_and_raw_agree_with_the_library(client, model_dir):
    data = _test_images()[1]
    expected = PatchCore.load(model_dir).predict([Image.open(io.BytesIO(data))], maps=False)[0].score
    by_form = _post_file(client, data)
    by_raw = _post_raw(client, data, "image/png")
    for response in (by_form, by_raw):
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"] == "tiny"
        assert body["score"] == pytest.approx(expected, rel=1e-6)
        assert body["is_anomalous"] is None and body["threshold"] is None
        assert (body["width"], body["height"]) == (64, 64)
        assert {"total", "decode", "backbone", "search", "queue"} <= set(body["timing_ms"])
        assert "anomaly_map_png" not in body and "mask_png" not in body


def model_dir_of(client):
    return client.app.state.models["tiny"].directory


def test_predict_with_maps_overlay_and_mask(client):
    body = _post_file(client, _test_images()[0], query="?map=true&overlay=true&mask=true").json()
    heat = _decode_png(body["anomaly_map_png"])
    assert heat.size == (64, 64) and heat.mode == "RGB"
    assert _decode_png(body["overlay_png"]).size == (64, 64)
    assert body["mask_png"] is None  # no threshold: no mask
    # One colour scale for every image of the model: blue at the mean score of its good training patches.
    model = PatchCore.load(model_dir_of(client))
    assert body["map_scale"] == {"low": pytest.approx(model.normal_patch_score_mean_),
                                 "high": pytest.approx(model.normal_patch_score_mean_ + 8 * model.normal_patch_score_std_),
                                 "fixed": True}


def test_predict_with_threshold(client, threshold):
    body = _post_file(client, _test_images()[3], query="?mask=true").json()
    assert body["threshold"] == threshold
    assert body["is_anomalous"] == (body["score"] >= threshold)
    mask = np.asarray(_decode_png(body["mask_png"]))
    assert mask.shape == (64, 64) and set(np.unique(mask)) <= {0, 255}
    local = client.app.state.models["tiny"].model.predict([Image.open(io.BytesIO(_test_images()[3]))])[0]
    assert np.array_equal(mask == 255, local.anomaly_map >= 30.0)
    assert client.get("/v1/models").json()["models"][0]["threshold"] == threshold


def test_unknown_model_and_bad_requests(client):
    data = _test_images()[0]
    response = client.post("/v1/models/missing/predict", content=data, headers={"content-type": "image/png"})
    assert response.status_code == 404 and "unknown model" in response.json()["error"]
    response = _post_file(client, data, field="image")  # wrong field name
    assert response.status_code == 422 and "'file'" in response.json()["error"]
    response = client.post(PREDICT, data={"file": "not a file"})
    assert response.status_code in (400, 415, 422) and "error" in response.json()
    response = _post_raw(client, b'{"a": 1}', "application/json")
    assert response.status_code == 415 and "Content-Type" in response.json()["error"]
    response = _post_raw(client, data, query="?map=perhaps")
    assert response.status_code == 422 and "map" in response.json()["error"]
    response = client.post(PREDICT, content=b"--x\r\nbroken", headers={"content-type": "multipart/form-data; boundary=x"})
    assert 400 <= response.status_code < 500 and "error" in response.json()
    response = client.get(PREDICT)
    assert response.status_code == 405 and "error" in response.json()
    assert client.get("/no/such/page").status_code == 404
    _assert_healthy(client)


def test_openapi_docs_and_web_page(client):
    schema = client.get("/openapi.json").json()
    assert "/v1/models/{name}/predict" in schema["paths"]
    body = schema["paths"]["/v1/models/{name}/predict"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in body and "application/octet-stream" in body
    docs = client.get("/docs")
    assert docs.status_code == 200 and "content-security-policy" not in docs.headers
    assert client.head("/").status_code == 200 and client.head("/healthz").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/static/app.js" in page.text and "content-security-policy" in page.headers
    assert client.get("/static/app.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/static/style.css").status_code == 200
    assert client.get("/static/..%2Fservice.py").status_code == 404
    assert client.get("/static/service.py").status_code == 404


def test_metrics_count_requests_by_endpoint_and_status(client):
    client.get("/healthz")
    client.get("/v1/models/nope")
    text = client.get("/metrics").text
    assert 'patchcore_http_requests_total{endpoint="/healthz",method="GET",status="200"}' in text
    assert 'patchcore_http_requests_total{endpoint="/v1/models/{name}",method="GET",status="404"}' in text
    assert 'patchcore_http_request_duration_seconds_bucket{endpoint="/healthz",le="+Inf"}' in text
    assert "patchcore_inferences_in_flight 0" in text
    assert "# TYPE patchcore_http_request_duration_seconds histogram" in text


# -- the corpus of bad and awkward inputs ---------------------------------------------------------

REFUSED = {
    "not_an_image.txt": (422, "not an image"),
    "zero_bytes.png": (400, "zero bytes"),
    "truncated.png": (422, "truncated"),
    "truncated.jpg": (422, "truncated"),
    "corrupt.png": (422, "corrupt"),
    "bomb_30000x30000.png": (413, "too large"),
    "thin_1x20000.png": (422, "too large for the model"),
    "gif_not_accepted.gif": (422, "accepted formats"),
}
ACCEPTED = {"gray16.png": (72, 64), "rgba.png": (64, 64), "gray.png": (64, 64), "ok.jpg": (80, 96)}


def test_corpus_is_complete_and_small():
    files = {path.name for path in BAD_INPUTS.iterdir()}
    assert set(REFUSED) | set(ACCEPTED) <= files
    assert all((BAD_INPUTS / name).stat().st_size < 8192 for name in files)


@pytest.mark.parametrize("name", sorted(REFUSED))
@pytest.mark.parametrize("how", ["multipart", "raw"])
def test_bad_inputs_are_refused_clearly(client, name, how):
    data = (BAD_INPUTS / name).read_bytes()
    response = _post_file(client, data, name) if how == "multipart" else _post_raw(client, data)
    status, words = REFUSED[name]
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert words in response.json()["error"]
    _assert_healthy(client)


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_awkward_but_valid_images_work(client, name):
    response = _post_file(client, (BAD_INPUTS / name).read_bytes(), name, query="?map=true")
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["width"], body["height"]) == ACCEPTED[name]
    assert np.isfinite(body["score"])
    assert _decode_png(body["anomaly_map_png"]).size == ACCEPTED[name]


def test_read_image_from_bytes_converts_modes():
    for name in ACCEPTED:
        image = read_image((BAD_INPUTS / name).read_bytes(), name=name)
        assert image.mode == "RGB" and image.size == ACCEPTED[name]
    sixteen = np.asarray(read_image((BAD_INPUTS / "gray16.png").read_bytes()))
    assert sixteen.max() > 200  # 16-bit data is scaled to 8 bits, not clipped


# -- size limits and load shedding ----------------------------------------------------------------


@pytest.fixture(scope="module")
def small_client(model_dir):
    """A service accepting at most 2000-byte uploads, that sheds load as soon as a request must wait."""
    app = create_app({"tiny": model_dir}, max_upload_bytes=2000, inference_slots=1, max_queue=0)
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def test_upload_over_the_limit_is_413(small_client):
    big = _png_bytes((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    assert len(big) > 2000
    # raw body with a Content-Length over the limit
    response = small_client.post(PREDICT, content=big, headers={"content-type": "image/png"})
    assert response.status_code == 413 and "limit of 2000 bytes" in response.json()["error"]
    # multipart: the file over the limit, the body within the multipart allowance
    response = _post_file(small_client, big)
    assert response.status_code == 413 and "limit" in response.json()["error"]
    # no Content-Length at all (chunked): bytes are counted as they arrive
    huge = b"\x89PNG" + bytes(200_000)
    response = small_client.post(PREDICT, content=iter([huge[i : i + 8192] for i in range(0, len(huge), 8192)]),
                                 headers={"content-type": "image/png"})
    assert response.status_code == 413 and "limit" in response.json()["error"]
    assert small_client.get("/healthz").status_code == 200
    assert 'status="413"' in small_client.get("/metrics").text


def test_an_idle_service_with_no_queue_still_answers(small_client):
    # max_queue=0 sheds only requests that would have to wait; an idle service has a free slot.
    response = small_client.post(PREDICT, content=(BAD_INPUTS / "gray.png").read_bytes(), headers={"content-type": "image/png"})
    assert response.status_code == 200 and "score" in response.json()


class GatedModel:
    """A served model whose ``predict`` waits at a gate the test opens: a real blocking point."""

    def __init__(self, model) -> None:
        self.model = model
        self.entered = threading.Event()
        self.gate = threading.Event()

    def predict(self, *args, **kwargs):
        self.entered.set()
        self.gate.wait()
        return self.model.predict(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.model, name)


def _gate_model(app) -> GatedModel:
    """Serve the app's model behind a gate: the registry dependency gets a registry of that model."""
    served = app.state.models["tiny"]
    gated = GatedModel(served.model)
    registry = {"tiny": dataclasses.replace(served, model=gated)}

    async def gated_registry() -> dict:  # async, as the real one: health must not need a thread
        return registry

    app.dependency_overrides[get_models] = gated_registry
    return gated


def _wait_for(condition, what: str) -> None:
    """Wait until ``condition()`` holds (the deadline only keeps a broken service from hanging the suite)."""
    deadline = time.monotonic() + 60
    while not condition():
        assert time.monotonic() < deadline, f"the service never reached the expected state: {what}"
        time.sleep(0.01)


def test_load_is_shed_with_503_once_the_queue_is_full(model_dir):
    """One slot, one place in the queue: a third concurrent request is refused at once, the first two finish."""
    app = create_app({"tiny": model_dir}, inference_slots=1, max_queue=1)
    gated = _gate_model(app)
    body = (BAD_INPUTS / "gray.png").read_bytes()
    metrics = app.state.metrics

    with TestClient(app, raise_server_exceptions=False) as client, ThreadPoolExecutor(2) as pool:
        post = lambda: client.post(PREDICT, content=body, headers={"content-type": "image/png"})  # noqa: E731
        try:
            first = pool.submit(post)
            _wait_for(lambda: gated.entered.is_set() and metrics.in_flight == 1, "the slot is taken")
            second = pool.submit(post)
            _wait_for(lambda: metrics.waiting == 1, "the queue is full")
            shed = [post() for _ in range(3)]
        finally:
            gated.gate.set()
        assert [r.status_code for r in shed] == [503, 503, 503]
        assert shed[0].headers["retry-after"] == "1" and "overloaded" in shed[0].json()["error"]
        assert first.result().status_code == 200 and second.result().status_code == 200
        assert metrics.waiting == 0 and metrics.in_flight == 0


def test_uploads_are_decoded_while_the_slot_scores_another(model_dir):
    """Decoding runs in a pool of its own, before a request takes a slot: with the only slot held
    by a first photo, a corrupt second upload is already answered (422) by its decoder."""
    app = create_app({"tiny": model_dir}, inference_slots=1, max_queue=4)
    gated = _gate_model(app)
    body = (BAD_INPUTS / "gray.png").read_bytes()
    with TestClient(app, raise_server_exceptions=False) as client, ThreadPoolExecutor(2) as pool:
        try:
            first = pool.submit(client.post, PREDICT, content=body, headers={"content-type": "image/png"})
            _wait_for(lambda: gated.entered.is_set(), "the slot is taken")
            corrupt = pool.submit(client.post, PREDICT, content=(BAD_INPUTS / "truncated.png").read_bytes(),
                                  headers={"content-type": "image/png"})
            _wait_for(corrupt.done, "the corrupt upload is answered while the slot is held")
            assert corrupt.result().status_code == 422 and not first.done()
        finally:
            gated.gate.set()
        assert first.result().status_code == 200
        assert "decode" in first.result().json()["timing_ms"]


def test_decoded_photos_waiting_for_a_slot_are_bounded(model_dir):
    """However many requests wait, at most slots + decoders photos are decoded at once; the others
    wait as their upload's bytes, and all are answered once the slot frees."""
    app = create_app({"tiny": model_dir}, inference_slots=1, max_queue=100)
    gated = _gate_model(app)
    runner, metrics = app.state.runner, app.state.metrics
    bound = runner.slots + runner.decoders
    body = (BAD_INPUTS / "gray.png").read_bytes()
    requests = bound + 5
    held: list[int] = []

    def all_waiting() -> bool:
        held.append(runner.photos_held)
        return gated.entered.is_set() and metrics.waiting == requests - 1 and runner.photos_held == bound

    with TestClient(app, raise_server_exceptions=False) as client, ThreadPoolExecutor(requests) as pool:
        try:
            posts = [pool.submit(client.post, PREDICT, content=body, headers={"content-type": "image/png"})
                     for _ in range(requests)]
            _wait_for(all_waiting, f"{requests} requests admitted, {bound} photos decoded")
        finally:
            gated.gate.set()
        assert [post.result().status_code for post in posts] == [200] * requests
    assert max(held) == bound and runner.photos_held == 0
    assert metrics.waiting == 0 and metrics.in_flight == 0


def test_health_and_metrics_answer_while_scoring_holds_every_slot_and_thread(model_dir):
    """More scoring requests than inference slots and web thread-pool tokens together are held at a
    blocking point; /healthz and /metrics still answer, before any of them is released. (When the
    waiting requests held threads, the 41st took the last token and health probes hung.)"""
    app = create_app({"tiny": model_dir}, inference_slots=1, max_queue=100)
    gated = _gate_model(app)
    body = (BAD_INPUTS / "gray.png").read_bytes()
    metrics = app.state.metrics

    async def scenario() -> None:
        tokens = anyio.to_thread.current_default_thread_limiter().total_tokens
        held = 1 + tokens + 3  # one in the slot, more waiting than there are threads
        assert held - 1 <= 100
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://service") as http:
            posts = [asyncio.create_task(http.post(PREDICT, content=body, headers={"content-type": "image/png"}))
                     for _ in range(held)]
            try:
                deadline = time.monotonic() + 60
                while not (gated.entered.is_set() and metrics.in_flight == 1 and metrics.waiting == held - 1):
                    assert time.monotonic() < deadline, f"{held} scoring requests were never all held"
                    await asyncio.sleep(0.01)
                health = await http.get("/healthz")
                scraped = await http.get("/metrics")
                assert not any(post.done() for post in posts)  # all still held
            finally:
                gated.gate.set()
            answers = await asyncio.gather(*posts)
        assert health.status_code == 200 and health.json()["status"] == "ok"
        assert scraped.status_code == 200
        assert f"patchcore_inference_queue {held - 1}.0" in scraped.text
        assert "patchcore_inferences_in_flight 1.0" in scraped.text
        assert [answer.status_code for answer in answers] == [200] * held

    asyncio.run(scenario())
    assert metrics.waiting == 0 and metrics.in_flight == 0


# -- concurrency ----------------------------------------------------------------------------------


def test_concurrent_requests_give_the_same_scores_as_single_ones(client):
    images = _test_images()
    single = [_post_raw(client, data, "image/png").json()["score"] for data in images]
    jobs = [i % len(images) for i in range(24)]
    start = threading.Barrier(8)

    def send(index: int) -> float:
        try:
            start.wait(timeout=10)
        except threading.BrokenBarrierError:
            pass
        response = _post_raw(client, images[index], "image/png", query="?map=true")
        assert response.status_code == 200, response.text
        return response.json()["score"]

    with ThreadPoolExecutor(max_workers=8) as pool:
        scores = list(pool.map(send, jobs))
    assert scores == [single[i] for i in jobs]
    assert single[1] > single[0]  # the "defect" scores higher
    assert "patchcore_inferences_in_flight 0" in client.get("/metrics").text


# -- model files ----------------------------------------------------------------------------------


def test_altered_model_file_is_refused_at_load(model_dir, tmp_path):
    copy = tmp_path / "altered"
    shutil.copytree(model_dir, copy)
    tensors = sorted(copy.glob("memory_bank-*.safetensors"))[0]
    data = bytearray(tensors.read_bytes())
    data[len(data) - 5] ^= 0x01
    tensors.write_bytes(bytes(data))
    with pytest.raises(ModelFormatError, match="checksum does not match"):
        create_app({"altered": copy})


def test_discover_models(model_dir, tmp_path):
    assert discover_models(model_dir) == {"tiny": model_dir}
    folder = tmp_path / "many"
    shutil.copytree(model_dir, folder / "a")
    shutil.copytree(model_dir, folder / "b")
    (folder / "not_a_model").mkdir()
    assert sorted(discover_models(folder)) == ["a", "b"]
    with pytest.raises(ModelFormatError, match="no patchcore.json"):
        discover_models(folder / "not_a_model")
    with pytest.raises(ModelFormatError, match="not found"):
        discover_models(tmp_path / "nowhere")


# -- fuzzing --------------------------------------------------------------------------------------

_PNG_START = (BAD_INPUTS / "gray.png").read_bytes()[:33]  # signature + IHDR of a valid 64x64 PNG


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=4096), content_type=st.sampled_from(["application/octet-stream", "image/png", "multipart"]))
def test_fuzz_random_bytes_never_cause_a_server_error(client, data, content_type):
    if content_type == "multipart":
        response = _post_file(client, data)
    else:
        response = _post_raw(client, data, content_type)
    assert response.status_code == 200 or 400 <= response.status_code < 500, response.text
    if response.status_code != 200:
        assert response.json()["error"]


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tail=st.binary(max_size=2048), prefix=st.sampled_from(["png", "jpeg", "bmp", "tiff"]))
def test_fuzz_image_headers_with_random_bodies(client, tail, prefix):
    start = {"png": _PNG_START, "jpeg": b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", "bmp": b"BM", "tiff": b"II*\x00"}[prefix]
    response = _post_raw(client, start + tail)
    assert response.status_code == 200 or 400 <= response.status_code < 500, response.text
    _assert_healthy(client)


def test_a_jpeg_upload_scores_as_the_same_file_does_from_disk(client, model_dir, tmp_path):
    photo = Image.open(io.BytesIO(_test_images()[3])).convert("RGB").resize((256, 192))
    photo.save(tmp_path / "photo.jpg", quality=92)
    body = client.post(PREDICT, content=(tmp_path / "photo.jpg").read_bytes(), headers={"content-type": "image/jpeg"}).json()
    on_disk = PatchCore.load(model_dir).predict([tmp_path / "photo.jpg"], maps=False)[0].score
    assert body["score"] == on_disk and (body["width"], body["height"]) == (256, 192)

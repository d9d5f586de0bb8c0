"""The web page in a real headless Chromium against the real server (uvicorn on a loopback port)."""

from __future__ import annotations

import hashlib
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")

from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from conftest import FAST
from patchcore import PatchCore  # noqa: E402
from patchcore.serving.app import create_app  # noqa: E402

BAD_INPUTS = Path(__file__).parent / "data" / "bad_inputs"


def _find(*names: str) -> str | None:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return None


CHROMIUM = _find("chromium", "chromium-browser", "google-chrome", "chrome")
CHROMEDRIVER = _find("chromedriver")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="no Chromium and chromedriver found (Debian: apt-get install chromium chromium-driver)",
)


def _images(n: int, size: int = 64, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    base = np.stack([x * 4, y * 4, (x + y) * 2], axis=-1).astype(np.float64)
    return [np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8) for _ in range(n)]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _running(app):
    """Serve ``app`` with uvicorn on a free loopback port in a thread; yields its URL."""
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail("the service did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    directory = tmp_path_factory.mktemp("browser") / "tiny"
    PatchCore(**FAST, coreset_ratio=0.1, resize=64, crop=64).fit(_images(8)).save(directory)
    yield from _running(create_app({"tiny": directory}))


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,1000",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _upload(browser, path: Path) -> None:
    browser.find_element(By.ID, "file").send_keys(str(path))


def test_upload_shows_score_overlay_and_history(browser, server_url, tmp_path):
    normal, defect = tmp_path / "normal.png", tmp_path / "defect.png"
    Image.fromarray(_images(1, seed=5)[0]).save(normal)
    damaged = _images(1, seed=6)[0]
    damaged[20:40, 20:40] = 255
    Image.fromarray(damaged).save(defect)

    browser.get(server_url + "/")
    wait = WebDriverWait(browser, 30)
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
    assert browser.find_element(By.ID, "model").get_attribute("value") == "tiny"
    assert "efficientnet_lite0" in browser.find_element(By.ID, "model-info").text
    # A plain fit gives a verdict out of the box: its threshold is self-calibrated, and the page says so.
    assert "(self-calibrated from 8 training photos)" in browser.find_element(By.ID, "model-info").text

    _upload(browser, normal)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#history li")) == 1)
    score = float(browser.find_element(By.ID, "score").text)
    assert score > 0
    assert browser.find_element(By.ID, "verdict").text == "Normal"
    assert browser.find_element(By.ID, "threshold").text.endswith(" (self-calibrated from 8 training photos)")
    overlay = browser.find_element(By.ID, "overlay")
    assert overlay.get_attribute("src").startswith("data:image/png;base64,")
    wait.until(lambda d: d.execute_script("return document.getElementById('overlay').naturalWidth") == 64)
    wait.until(lambda d: d.execute_script("return document.getElementById('original').naturalWidth") == 64)
    assert browser.find_element(By.ID, "result").is_displayed()

    _upload(browser, defect)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#history li")) == 2)
    wait.until(lambda d: d.find_element(By.ID, "score").text != f"{score:.4f}")
    assert float(browser.find_element(By.ID, "score").text) > score
    assert browser.find_element(By.ID, "verdict").text == "Anomalous"
    newest = browser.find_elements(By.CSS_SELECTOR, "#history li")[0]
    assert "defect.png" in newest.text
    # Evidence: each anomalous patch beside the training patch it was measured against.
    assert browser.find_element(By.ID, "evidence-section").is_displayed()
    figures = browser.find_elements(By.CSS_SELECTOR, "#evidence figure")
    assert len(figures) == 3 and "nearest normal" in figures[0].text
    wait.until(lambda d: d.execute_script(
        "return document.querySelector('#evidence img').naturalWidth") > 128)  # two crops side by side

    _upload(browser, BAD_INPUTS / "truncated.png")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#history li")) == 3)
    status = browser.find_element(By.ID, "status")
    assert "truncated" in status.text and "error" in status.get_attribute("class")
    assert "error" in browser.find_elements(By.CSS_SELECTOR, "#history li")[0].get_attribute("class")
    # no script errors or Content-Security-Policy violations; only the refused upload's 422 may be logged
    severe = [entry["message"] for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert all("422" in message for message in severe), severe


@pytest.fixture(scope="module")
def teach_in_server(tmp_path_factory):
    from patchcore.serving.teach_tokens import ensure_token_file

    folder = tmp_path_factory.mktemp("browser-teach")
    PatchCore(**FAST, coreset_ratio=0.1, resize=64, crop=64).fit(_images(8)).save(folder / "tiny")
    tokens, token = ensure_token_file(folder / "tokens", "alice")
    for url in _running(create_app({"tiny": folder / "tiny"}, teach_token_file=tokens)):
        yield url, token, folder / "tiny"


def test_the_page_asks_for_the_token_before_it_offers_teach_in_and_can_undo_it(browser, teach_in_server, tmp_path):
    from patchcore.engine.persistence import history

    url, token, model_dir = teach_in_server
    image = tmp_path / "new_variant.png"
    Image.fromarray(_images(1, seed=9)[0]).save(image)
    browser.get(url + "/")
    browser.execute_script("sessionStorage.clear()")
    browser.get(url + "/")
    wait = WebDriverWait(browser, 30)
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
    _upload(browser, image)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#history li")) == 1)
    assert not browser.find_element(By.ID, "teach").is_displayed()  # no token yet: nothing to teach with
    assert browser.find_element(By.ID, "teach-token").is_displayed()
    # A wrong token is refused by the service and asked for again.
    browser.find_element(By.ID, "teach-token").send_keys("not-the-token-at-all")
    browser.find_element(By.ID, "use-token").click()
    browser.find_element(By.ID, "teach").click()
    wait.until(lambda d: "not valid" in d.find_element(By.ID, "teach-status").text)
    wait.until(lambda d: d.find_element(By.ID, "teach-token").is_displayed())
    assert len(history(model_dir)) == 1
    # With the token: teach the image, then undo.
    browser.find_element(By.ID, "teach-token").send_keys(token)
    browser.find_element(By.ID, "use-token").click()
    browser.find_element(By.ID, "teach").click()
    wait.until(lambda d: "version 2" in d.find_element(By.ID, "teach-status").text)
    wait.until(lambda d: "version 2" in d.find_element(By.ID, "model-info").text)
    taught = history(model_dir)[-1]
    assert taught["action"] == "teach-in" and taught["who"] == "alice"
    assert taught["sources"][0]["sha256"] == hashlib.sha256(image.read_bytes()).hexdigest()
    browser.find_element(By.ID, "undo").click()
    wait.until(lambda d: "restored as version 3" in d.find_element(By.ID, "teach-status").text)
    assert history(model_dir)[-1]["action"] == "rollback"
    severe = [entry["message"] for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert all("401" in message for message in severe), severe  # only the refused wrong token

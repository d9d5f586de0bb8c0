"""The History view in a real headless Chromium against the real server: a station's verdicts
(``patchcore watch`` on a tiny model) filtered, one marked a false alarm, the teach-in queue
applied with a supervisor's token, and the new model version seen."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")
pytest.importorskip("selenium.webdriver", reason="selenium is not installed")

from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from conftest import product_image  # noqa: E402
from patchcore.engine.persistence import history  # noqa: E402
from patchcore.serving.app import create_app  # noqa: E402
from patchcore.serving.teach_tokens import ensure_token_file  # noqa: E402
from patchcore.station.history import History  # noqa: E402
from test_browser import CHROMEDRIVER, CHROMIUM, _running, browser  # noqa: E402, F401 - the browser fixture
from test_review import MODEL, _variation, run_station  # noqa: E402

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="no Chromium and chromedriver found (Debian: apt-get install chromium chromium-driver)",
)


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def station_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser-review")
    rng = np.random.default_rng(5)
    photos = {"good0.png": _png(product_image(rng)), "good1.png": _png(product_image(rng)),
              "defect0.png": _png(product_image(rng, defect=(20, 24, 14))),
              "light0.png": _png(_variation(rng)), "light1.png": _png(_variation(rng))}
    station = run_station(root, photos)
    tokens, token = ensure_token_file(root / "tokens", "alice")
    app = create_app({MODEL: station["model"]}, history_url=station["db"], teach_token_file=tokens)
    for url in _running(app):
        yield url, token, station, len(photos)


def _items(driver) -> list:
    return driver.find_elements(By.CSS_SELECTOR, "#inspections li.inspection")


def test_review_a_false_alarm_and_apply_the_queue_with_the_token(browser, station_server):  # noqa: F811
    url, token, station, count = station_server
    with History(station["db"]) as database:
        flagged = {row.id for row in database.inspections(verdict="ng")}
        light = next(row.id for row in database.inspections() if row.photo_path.endswith("light0.png"))
    assert light in flagged and len(flagged) < count

    browser.get(url + "/")
    browser.execute_script("sessionStorage.clear(); localStorage.clear();")
    browser.get(url + "/")
    # The lists are redrawn after every change: an element found just before may be gone; look again.
    wait = WebDriverWait(browser, 30, ignored_exceptions=(StaleElementReferenceException,))
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
    wait.until(lambda d: d.find_element(By.ID, "show-history").is_displayed())
    browser.find_element(By.ID, "show-history").click()
    wait.until(lambda d: len(_items(d)) == count)
    assert not browser.find_element(By.ID, "drop").is_displayed()  # the Inspect view is hidden
    wait.until(lambda d: f"Drift of {MODEL}" in d.find_element(By.ID, "drift").text)
    # Each entry shows its overlay and evidence, served by the service from the station's files.
    wait.until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('#inspections img')].every(img => img.complete && img.naturalWidth > 0)"))

    # Filter: the flagged photos of the model.
    Select(browser.find_element(By.ID, "h-model")).select_by_value(MODEL)
    Select(browser.find_element(By.ID, "h-verdict")).select_by_value("ng")
    browser.find_element(By.ID, "h-show").click()
    wait.until(lambda d: {int(item.get_attribute("data-id")) for item in _items(d)} == flagged)
    wait.until(lambda d: all("Flagged" in item.text for item in _items(d)))

    # An operator marks the brighter photo a false alarm; it waits in the queue.
    browser.find_element(By.ID, "reviewer").send_keys("anna")
    browser.find_element(By.CSS_SELECTOR, f'#inspections li[data-id="{light}"] button[data-verdict="false_alarm"]').click()
    wait.until(lambda d: "recorded for anna" in d.find_element(By.ID, "h-status").text)
    wait.until(lambda d: [li.get_attribute("data-id") for li in d.find_elements(By.CSS_SELECTOR, "#queue li")] == [str(light)])
    wait.until(lambda d: "False alarm by anna" in d.find_element(By.CSS_SELECTOR, f'#inspections li[data-id="{light}"]').text)
    assert history(station["model"])[-1]["version"] == 1  # a review changes no model
    assert not browser.find_element(By.ID, "apply-queue").is_displayed()  # no token: nothing to apply with

    # A supervisor applies the queue with the token: a new model version, named after the token.
    browser.find_element(By.ID, "queue-token").send_keys(token)
    browser.find_element(By.ID, "queue-use-token").click()
    wait.until(lambda d: d.find_element(By.ID, "apply-queue").is_displayed())
    browser.find_element(By.ID, "apply-queue").click()
    wait.until(lambda d: "version 2" in d.find_element(By.ID, "queue-status").text)
    assert "by alice" in browser.find_element(By.ID, "queue-status").text
    wait.until(lambda d: "taught in version 2 by alice" in
               d.find_element(By.CSS_SELECTOR, f'#inspections li[data-id="{light}"]').text)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#queue li") == [])
    taught = history(station["model"])[-1]
    assert (taught["version"], taught["action"], taught["who"]) == (2, "teach-in", "alice")
    browser.find_element(By.ID, "show-inspect").click()
    wait.until(lambda d: "version 2" in d.find_element(By.ID, "model-info").text)
    severe = [entry["message"] for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert not severe, severe  # no script errors, no Content-Security-Policy violations

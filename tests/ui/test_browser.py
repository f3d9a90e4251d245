"""The page in a real headless Chromium (the distro's, with its matching chromedriver), against
a real TorchServe and a real ``python -m ui`` process: what a person sees and can do."""

from __future__ import annotations

import io

import numpy as np
import pytest
import requests
from PIL import Image

from client.errors import RequestRejected
from client.rest import RestClient
from loadtest.hostile import png_claiming
from tests.conftest import TINY_CLASSES, free_port
from tests.ui.conftest import MAX_REQUEST_SIZE, page_args
from ui.shot import PageDriver, ensure_browser, open_browser, run_page

pytestmark = [pytest.mark.serving, pytest.mark.slow]


def _decode(content: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(content)).convert("RGB"))


@pytest.fixture(scope="module")
def driver():
    ensure_browser()
    browser = open_browser(fake_camera=True)
    yield browser
    browser.quit()


@pytest.fixture
def browser(driver, page) -> PageDriver:
    view = PageDriver(driver, page.url)
    view.load()
    return view


def _served_message(server, data: bytes) -> str:
    with pytest.raises(RequestRejected) as refused:
        RestClient(server.inference_url, token=server.inference_key).predict(data, output="json")
    return refused.value.message


def test_an_uploaded_sample_is_segmented_and_shown(browser, page, ui_server, samples, tmp_path):
    assert (
        f"segserve page: {page.url} (predictions: REST {ui_server.inference_url}; "
        "TorchServe says Healthy)" in page.log()
    )
    path = sorted(samples.glob("*.png"))[0]
    assert browser.upload(path) == "ok"
    width, height = Image.open(path).size
    for view in ("segserve-input", "segserve-overlay", "segserve-mask", "segserve-heat"):
        assert browser.image_size(view) == (width, height), view
    legend = browser.legend()
    assert [name for name, _ in legend] == TINY_CLASSES  # every class, from the metadata
    assert sum(fraction for _, fraction in legend) == pytest.approx(1.0, abs=1e-9)
    summary = browser.summary()
    assert (summary["model"], summary["version"]) == ("segmenter", "1.0")
    assert float(summary["latency-ms"]) > 0 and 0 < float(summary["mean-confidence"]) <= 1
    served = RestClient(ui_server.inference_url, token=ui_server.inference_key)
    assert browser.download_bytes() == served.predict(path.read_bytes(), "mask").content
    overlay = served.predict(path.read_bytes(), "overlay").content
    shown = _decode(browser.image_bytes("segserve-overlay"))
    np.testing.assert_array_equal(shown, _decode(overlay))
    shot = browser.screenshot(tmp_path / "page.png")
    assert Image.open(shot).size[0] > width


def test_a_sample_can_be_picked_and_the_opacity_changed(browser, samples):
    name = sorted(samples.glob("*.png"))[1].name
    assert browser.pick_sample(name) == "ok"
    half = _decode(browser.image_bytes("segserve-overlay"))
    browser.set_opacity(1.0)

    def changed() -> bool:
        return not np.array_equal(_decode(browser.image_bytes("segserve-overlay")), half)

    browser._wait(changed, "the overlay to change")
    full = _decode(browser.image_bytes("segserve-overlay"))
    np.testing.assert_array_equal(full, _decode(browser.image_bytes("segserve-mask")))


def _bad_files(tmp_path):
    files = {
        "notes.txt": b"this is not an image\n" * 50,
        "bomb.png": png_claiming(100_000, 100_000),
        "huge.png": b"\x89PNG\r\n\x1a\n" + b"\0" * (MAX_REQUEST_SIZE + 1024),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return files


def test_bad_files_show_the_servers_message_and_the_page_goes_on(
    browser, ui_server, samples, tmp_path
):
    for name, data in _bad_files(tmp_path).items():
        assert browser.upload(tmp_path / name) == "error", name
        assert _served_message(ui_server, data) in browser.error_text(), name
        assert browser.image_size("segserve-overlay") is None  # the last result is cleared
    assert browser.upload(sorted(samples.glob("*.png"))[0]) == "ok"


def test_the_token_never_reaches_the_browser(browser, page, ui_server, samples):
    assert browser.upload(sorted(samples.glob("*.png"))[0]) == "ok"
    token = ui_server.inference_key
    assert token and token not in browser.driver.page_source
    fetched = browser.driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)"
    )
    # Everything the page loaded, fetched again; the event streams (heartbeat, queue data) stay
    # open, and what they carried is the outputs, already in page_source.
    streams = ("/heartbeat/", "/queue/data", "/stream/")
    urls = {u for u in fetched if u.startswith(page.url) and not any(s in u for s in streams)}
    urls |= {page.url, page.url + "config"}
    assert len(urls) > 5
    for url in urls:
        assert token not in requests.get(url, timeout=10).text, url


def test_webcam_frames_are_segmented(browser):
    # Chromium's fake camera (--use-fake-device-for-media-stream) streams a test pattern.
    browser.start_webcam()
    # New frames keep replacing the image: wait for one whose size can be read (not 0 x 0).
    frame = browser._wait(
        lambda: browser.image_size("segserve-webcam-overlay"), "a segmented frame"
    )
    assert frame is not None and min(frame) > 0
    assert browser._find("#segserve-webcam-status #segserve-summary")


def test_torchserve_down_is_shown_in_the_page(driver, token_file, samples, ui_server, tmp_path):
    dead = type(ui_server)(**{**ui_server.to_dict(),
                              "inference_url": f"http://127.0.0.1:{free_port()}"})  # fmt: skip
    with run_page(page_args(dead, token_file, samples), tmp_path / "page.log") as down:
        view = PageDriver(driver, down.url)
        view.load()
        assert view.upload(sorted(samples.glob("*.png"))[0]) == "error"
        assert "TorchServe is not answering at REST http://127.0.0.1:" in view.error_text()
        assert (
            f"warning: TorchServe is not answering at REST {dead.inference_url} yet" in down.log()
        )

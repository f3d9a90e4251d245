"""The page's server side against a real TorchServe: the same masks as every other path, the
server's own words for refused files, clear messages when the server or the token is wrong."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from client.errors import RequestRejected
from client.rest import RestClient
from loadtest.hostile import png_claiming
from tests.conftest import TINY_CLASSES, free_port
from tests.ui.conftest import ANSWER_TIMEOUT_S, MAX_REQUEST_SIZE
from ui.answer import colour_mask
from ui.app import Downloads, Page
from ui.backend import Backend, PageError
from ui.config import page_config

pytestmark = [pytest.mark.serving, pytest.mark.slow]


def _config(server, token_file, **overrides):
    return page_config({"inference_url": server.inference_url,
                        "grpc_target": server.grpc_inference_target,
                        "token_file": token_file, "timeout_s": ANSWER_TIMEOUT_S,
                        **overrides})  # fmt: skip


def _rest(server) -> RestClient:
    return RestClient(server.inference_url, token=server.inference_key)


def _decode(content: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(content)))


@pytest.fixture(scope="module")
def sample_bytes(samples) -> bytes:
    return sorted(samples.glob("*.png"))[0].read_bytes()


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_the_page_gets_the_served_mask_bit_for_bit(ui_server, token_file, sample_bytes, protocol):
    backend = Backend(_config(ui_server, token_file, protocol=protocol))
    answer = backend.predict(sample_bytes)
    seg = answer.segmentation
    served = _rest(ui_server).predict(sample_bytes, output="mask").mask()
    np.testing.assert_array_equal(seg.mask, served)
    assert [c.name for c in seg.classes] == TINY_CLASSES
    assert sum(c.pixel_fraction for c in seg.classes) == pytest.approx(1.0, abs=1e-9)
    assert seg.confidence_map is not None and seg.confidence_map.shape == served.shape
    assert (seg.model_name, seg.model_version) == ("segmenter", "1.0")
    assert answer.latency_ms > 0
    backend.close()


def _bad_files() -> dict[str, bytes]:
    return {
        "garbage": b"this is not an image, it is a text file\n" * 20,
        "empty": b"",
        "bomb": png_claiming(100_000, 100_000),
        "too_large": b"\x89PNG\r\n\x1a\n" + b"\0" * (MAX_REQUEST_SIZE + 1024),
    }


@pytest.mark.parametrize("name", list(_bad_files()))
def test_a_refused_file_shows_the_servers_own_message(ui_server, token_file, name):
    data = _bad_files()[name]
    with pytest.raises(RequestRejected) as direct:
        _rest(ui_server).predict(data, output="json")
    with pytest.raises(PageError) as shown:
        Backend(_config(ui_server, token_file)).predict(data)
    assert direct.value.message and direct.value.message in str(shown.value)
    assert f"HTTP {direct.value.status}" in str(shown.value)
    statuses = {"garbage": 415, "empty": 400, "bomb": 413, "too_large": 413}
    assert direct.value.status == statuses[name]


def test_torchserve_down_is_said_plainly(token_file):
    port = free_port()
    config = page_config({"inference_url": f"http://127.0.0.1:{port}", "token_file": token_file})
    with pytest.raises(
        PageError, match=rf"TorchServe is not answering at REST http://127.0.0.1:{port}"
    ):
        Backend(config).predict(b"\x89PNG")


def test_a_refused_token_is_said_and_a_rotated_file_applies_without_restart(
    ui_server, tmp_path, sample_bytes
):
    token = tmp_path / "token"
    token.write_text("not-the-token")
    backend = Backend(_config(ui_server, token))
    with pytest.raises(PageError, match="refused the page's token"):
        backend.predict(sample_bytes)
    token.write_text(ui_server.inference_key)  # what kubelet does when the Secret changes
    assert backend.predict(sample_bytes).segmentation.mask.size > 0


def test_the_page_outputs_match_the_servers_overlay(ui_server, token_file, samples, tmp_path):
    path = sorted(samples.glob("*.png"))[0]
    page = Page(_config(ui_server, token_file), Backend(_config(ui_server, token_file)),
                Downloads(tmp_path))  # fmt: skip
    state, status, summary, legend, _chart, download, rgb, blended, mask_view, heat = (
        page.segment_file(str(path), 0.5)
    )
    assert "segserve-ok" in status and 'data-model="segmenter"' in summary
    assert legend.count("data-class-id=") == len(TINY_CLASSES)
    served = _rest(ui_server).predict(path.read_bytes(), output="overlay").content
    np.testing.assert_array_equal(blended, _decode(served))  # the server's own overlay, 50 %
    np.testing.assert_array_equal(page.reblend(state, 0.0), rgb)
    np.testing.assert_array_equal(page.reblend(state, 1.0), mask_view)
    np.testing.assert_array_equal(mask_view, colour_mask(state[1]))
    assert heat.shape == rgb.shape and rgb.shape[:2] == _decode(path.read_bytes()).shape[:2]
    mask = _rest(ui_server).predict(path.read_bytes(), output="mask").content
    assert open(download, "rb").read() == mask and download.endswith(f"{path.stem}.mask.png")


def test_the_page_shows_a_bad_file_and_keeps_going(ui_server, token_file, samples, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"%PDF-1.4 not an image")
    page = Page(_config(ui_server, token_file), Backend(_config(ui_server, token_file)),
                Downloads(tmp_path / "downloads"))  # fmt: skip
    outputs = page.segment_file(str(bad), 0.5)
    assert outputs[0] is None and 'id="segserve-error"' in outputs[1] and "HTTP 415" in outputs[1]
    good = page.segment_file(str(sorted(samples.glob("*.png"))[0]), 0.5)
    assert good[0] is not None


def test_webcam_frames_go_through_the_same_client(ui_server, token_file, tmp_path):
    page = Page(_config(ui_server, token_file), Backend(_config(ui_server, token_file)),
                Downloads(tmp_path))  # fmt: skip
    frame = np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    blended, summary = page.segment_frame(frame, 0.5)
    assert blended.shape == frame.shape and "segserve-summary" in summary

"""The handler loaded from the real .mar by TorchServe's own loader, driven in-process.

No frontend: ``ts.model_loader`` loads the extracted archive exactly as a worker does, and a
batch goes through ``ts.service.Service``'s own request parsing, so per-index statuses,
content types and metric lines are the ones a worker would send back.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
from ts.model_loader import TsModelLoader
from ts.service import Service

REPO = Path(__file__).resolve().parents[2]


def png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def service(tiny_archive, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("extracted")
    with zipfile.ZipFile(tiny_archive / "segmenter.mar") as z:
        z.extractall(model_dir)
    metrics = MetricsCacheYamlImpl(str(REPO / "handler" / "metrics.yaml"))
    metrics.initialize_cache()
    metrics.model_name = "segmenter"
    sys.path.append(str(model_dir))  # what the worker does for its model dir
    try:
        yield TsModelLoader().load(
            "segmenter", str(model_dir), "segmenter_handler.py", None, 4, metrics_cache=metrics
        )
    finally:
        sys.path.remove(str(model_dir))
        sys.modules.pop("segmenter_handler", None)


def run_batch(service, items: list[tuple[dict, dict]]) -> list[bytes]:
    """items: (parameters {name: (content_type, value)}, headers) per request."""
    batch = []
    for i, (params, headers) in enumerate(items):
        batch.append(
            {
                "requestId": f"req-{i}".encode(),
                "headers": [{"name": k.encode(), "value": v.encode()} for k, v in headers.items()],
                "parameters": [
                    {"name": name, "contentType": ctype, "value": value}
                    for name, (ctype, value) in params.items()
                ],
            }
        )
    headers, input_batch, req_map = Service.retrieve_data_for_inference(batch)
    context = service.context
    context.request_ids, context.request_processor = req_map, headers
    context.metrics.request_ids = req_map
    return service._entry_point(input_batch, context)


def test_archive_config_reaches_the_handler(service):
    handler = service._entry_point.__self__
    assert handler.max_pixels == 40_000_000
    assert str(handler.device) == "cpu" and handler.half is False
    assert service.context.model_yaml_config["batchSize"] == 4


@contextlib.contextmanager
def drift_every(service, seconds: float):
    """The handler's ``drift_every_s`` for a while, its interval starting afresh."""
    handler = service._entry_point.__self__
    saved = handler.drift_every_s
    handler.drift_every_s, handler._drift_observed_at = seconds, -math.inf
    try:
        yield handler
    finally:
        handler.drift_every_s = saved


def drift_lines(caplog) -> int:
    lines = [r.getMessage() for r in caplog.records]
    return sum("[METRICS]segserve_class_pixel_fraction." in m for m in lines)


def test_drift_histograms_observe_one_image_per_interval(service, caplog):
    """The per-class lines are bounded by time, not by traffic: one image per interval, the
    first one at once; with 0, every image."""
    good = png((np.arange(40 * 60 * 3) % 251).astype(np.uint8).reshape(40, 60, 3))
    three = [({"body": ("application/octet-stream", good)}, {})] * 3
    classes = len(service._entry_point.__self__.meta.class_names)
    caplog.set_level(logging.INFO)
    with drift_every(service, 3600.0):
        run_batch(service, three)
        assert drift_lines(caplog) == classes  # the first image of the interval
        run_batch(service, three)
        assert drift_lines(caplog) == classes  # none more within it
    caplog.clear()
    with drift_every(service, 0.0):
        out = run_batch(service, three)
        assert drift_lines(caplog) == 3 * classes
    assert all(Image.open(io.BytesIO(body)).format == "PNG" for body in out)


def test_a_bad_drift_interval_names_the_option() -> None:
    from handler.drift import drift_interval

    for bad in ("soon", -1, float("nan")):
        with pytest.raises(ValueError, match="drift_every_s"):
            drift_interval({"drift_every_s": bad})


def test_mixed_batch_statuses_types_and_metrics(service, reference, caplog):
    rgb = (np.arange(40 * 60 * 3) % 251).astype(np.uint8).reshape(40, 60, 3)
    good = png(rgb)
    caplog.set_level(logging.INFO)
    service._entry_point.__self__._drift_observed_at = -math.inf  # this batch is observed
    out = run_batch(
        service,
        [
            ({"body": ("application/octet-stream", good)}, {}),
            ({"body": ("application/octet-stream", good[:100])}, {}),
            ({"data": ("image/png", good), "output": ("text/plain", "json")}, {}),
            ({"body": ("application/octet-stream", good)}, {"Accept": "image/jpeg"}),
        ],
    )
    ctx = service.context
    statuses = [ctx.get_response_status(i)[0] for i in range(4)]
    types = [ctx.get_response_content_type(i) for i in range(4)]
    assert statuses == [200, 400, 200, 200]
    assert types == ["image/png", "application/json", "application/json", "image/jpeg"]
    error = json.loads(out[1])
    assert error["code"] == 400 and error["type"] == "truncated" and error["message"]
    expected = reference.predict([rgb, rgb, rgb], batched=True)[0]
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(out[0]))), expected)
    body = json.loads(out[2])
    assert (body["width"], body["height"]) == (60, 40)
    assert Image.open(io.BytesIO(out[3])).format == "JPEG"
    lines = [r.getMessage() for r in caplog.records if "[METRICS]" in r.getMessage()]
    assert any("segserve_batch_size.Count:3.0|#ModelName:segmenter,Level:Model" in m for m in lines)
    assert any(
        "segserve_rejected_inputs_total.Count:1|#Reason:truncated,ModelName:segmenter" in m
        for m in lines
    )
    assert any("segserve_class_pixel_fraction." in m and "ClassName:" in m for m in lines)
    for name in ("preprocess", "inference", "postprocess"):
        assert any(f"segserve_{name}_seconds.Seconds:" in m for m in lines)
    assert not any("Failed to update metric" in r.getMessage() for r in caplog.records)


def test_all_bad_batch_still_answers_each(service):
    out = run_batch(
        service,
        [
            ({"body": ("application/octet-stream", b"")}, {}),
            ({"body": ("text/html", "<html></html>")}, {}),
            ({"body": ("application/octet-stream", b"\x89PNG")}, {"Accept": "text/csv"}),
        ],
    )
    codes = [json.loads(o)["code"] for o in out]
    assert codes == [400, 415, 400]
    assert [service.context.get_response_status(i)[0] for i in range(3)] == codes


@pytest.mark.parametrize("header", ["describe", "explain"])
def test_a_mode_header_never_changes_the_batch(service, header, caplog):
    """BaseHandler.handle switches to describe/explain mode on request 0's header of that name
    and answers one item for the whole batch; from a client that must stay an ordinary
    request, and its batch-mates keep their answers. HandlerTime is emitted (by BaseHandler)."""
    good = png((np.arange(24 * 32 * 3) % 251).astype(np.uint8).reshape(24, 32, 3))
    caplog.set_level(logging.INFO)
    out = run_batch(
        service,
        [
            ({"body": ("application/octet-stream", good)}, {header: "True"}),
            ({"body": ("application/octet-stream", good)}, {}),
        ],
    )
    assert len(out) == 2
    assert [service.context.get_response_status(i)[0] for i in range(2)] == [200, 200]
    assert [Image.open(io.BytesIO(o)).size for o in out] == [(32, 24), (32, 24)]
    lines = [r.getMessage() for r in caplog.records if "[METRICS]" in r.getMessage()]
    assert any("HandlerTime.Milliseconds:" in m for m in lines), lines

"""Real TorchServe (shared fixture): parity, formats, refusals, auth, metrics, gRPC."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests
from PIL import Image

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.serving, pytest.mark.slow]

SIZES = [(64, 64), (48, 80), (120, 40), (33, 97), (211, 157)]


def assert_token_refused(response: requests.Response) -> None:
    """TorchServe 0.12 answers a missing/wrong token with 400 InvalidKeyException, not 401."""
    assert response.status_code in (400, 401, 403), response.status_code
    error = response.json()
    assert error["type"] == "InvalidKeyException", error
    assert "Token Authorization failed" in error["message"]


def test_token_is_required(torchserve, helpers):
    body = helpers.png_bytes(helpers.random_image(64, 64, 0))
    assert_token_refused(helpers.rest_predict(torchserve, body, key=None))
    assert_token_refused(helpers.rest_predict(torchserve, body, key="wrong-key"))
    # The management key is not an inference key.
    assert_token_refused(helpers.rest_predict(torchserve, body, key=torchserve.management_key))
    assert helpers.rest_predict(torchserve, body).status_code == 200
    assert_token_refused(requests.get(f"{torchserve.inference_url}/ping", timeout=10))
    auth = {"Authorization": f"Bearer {torchserve.inference_key}"}
    ping = requests.get(f"{torchserve.inference_url}/ping", headers=auth, timeout=10)
    assert ping.status_code == 200 and ping.json()["status"] == "Healthy"
    assert_token_refused(requests.get(f"{torchserve.management_url}/models", timeout=10))
    # The metrics port has no token (Prometheus scrapes it as is).
    assert requests.get(f"{torchserve.metrics_url}/metrics", timeout=10).status_code == 200
    # Model registration is off (enable_model_api=false) even with the right key.
    mgmt = {"Authorization": f"Bearer {torchserve.management_key}"}
    register = requests.post(
        f"{torchserve.management_url}/models?url=x.mar", headers=mgmt, timeout=10
    )
    assert register.status_code >= 400


def test_served_masks_equal_offline_single_requests(torchserve, helpers, reference):
    images = [helpers.random_image(h, w, seed) for seed, (h, w) in enumerate(SIZES)]
    expected = reference.predict(images, batched=False)
    classes = set()
    for image, want in zip(images, expected, strict=True):
        response = helpers.rest_predict(torchserve, helpers.png_bytes(image))
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "image/png"
        got = helpers.decode_png(response.content)
        assert got.shape == image.shape[:2]
        np.testing.assert_array_equal(got, want)
        classes |= set(np.unique(got).tolist())
    assert len(classes) >= 2  # the comparison is not between two constant masks


@pytest.mark.parametrize("output", ["mask", "color", "overlay", "overlay_jpeg", "json"])
def test_every_output_format_roundtrips(torchserve, helpers, reference, output):
    image = helpers.random_image(50, 70, 11)
    want = reference.predict([image])[0]
    response = helpers.rest_predict(torchserve, helpers.png_bytes(image), output=output)
    assert response.status_code == 200, response.text
    content_type = response.headers["content-type"]
    if output == "json":
        assert content_type == "application/json"
        body = response.json()
        assert (body["width"], body["height"]) == (70, 50)
        assert sum(c["pixel_fraction"] for c in body["classes"]) == pytest.approx(1.0, abs=1e-9)
        for c in body["classes"]:
            assert c["pixel_fraction"] == pytest.approx(float((want == c["id"]).mean()))
        import base64

        np.testing.assert_array_equal(helpers.decode_png(base64.b64decode(body["mask"])), want)
        return
    decoded = Image.open(io.BytesIO(response.content))
    assert decoded.size == (70, 50)
    assert content_type == ("image/jpeg" if output == "overlay_jpeg" else "image/png")
    if output == "color":
        palette = np.asarray(reference.meta.palette, dtype=np.uint8)
        np.testing.assert_array_equal(np.asarray(decoded.convert("RGB")), palette[want])


def test_accept_header_picks_the_format(torchserve, helpers):
    body = helpers.png_bytes(helpers.random_image(40, 40, 3))
    as_json = helpers.rest_predict(torchserve, body, headers={"Accept": "application/json"})
    assert as_json.headers["content-type"] == "application/json" and as_json.json()["width"] == 40
    as_jpeg = helpers.rest_predict(torchserve, body, headers={"Accept": "image/jpeg"})
    assert as_jpeg.headers["content-type"] == "image/jpeg"
    bad = helpers.rest_predict(torchserve, body, output="heatmap")
    assert bad.status_code == 400 and "overlay_jpeg" in bad.json()["message"]


def _bomb() -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", 30_000, 30_000, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1000)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat)


def test_bad_inputs_get_4xx_json_and_the_worker_survives(torchserve, helpers):
    good = helpers.png_bytes(helpers.random_image(64, 64, 5))
    cases = {
        "empty": (b"", {}, 400),
        "random": (np.random.default_rng(1).bytes(5000), {}, 415),
        "truncated": (good[: len(good) // 2], {}, 400),
        "text": (b"just some text", {"Content-Type": "text/plain"}, 415),
        "html": (b"<html><body>x</body></html>", {"Content-Type": "text/html"}, 415),
        "bomb": (_bomb(), {}, 413),
    }
    for name, (body, headers, status) in cases.items():
        response = helpers.rest_predict(torchserve, body, headers=headers)
        assert response.status_code == status, (name, response.status_code, response.text)
        assert response.headers["content-type"] == "application/json", name
        error = response.json()
        assert error["code"] == status and len(error["message"]) > 20, (name, error)
    assert helpers.rest_predict(torchserve, good).status_code == 200


def test_prometheus_shows_the_custom_metrics(torchserve, helpers):
    helpers.rest_predict(torchserve, b"")  # one rejection, reason empty
    assert helpers.rest_predict(torchserve, helpers.png_bytes(helpers.random_image(32, 32, 9)))
    import yaml

    # Every model metric handler/metrics.yaml declares must reach Prometheus (emitted or removed).
    declared = yaml.safe_load((REPO / "handler" / "metrics.yaml").read_text())["model_metrics"]
    names = {m["name"] for m in declared.get("histogram", [])}
    gauges = {m["name"] for m in declared.get("gauge", [])}  # HandlerTime, PredictionTime (ts)
    counters = {m["name"].removesuffix("_total") for m in declared.get("counter", [])}
    assert counters == {"segserve_rejected_inputs"}, counters
    deadline = time.monotonic() + 30  # the frontend parses worker logs asynchronously
    while True:
        families = helpers.scrape(torchserve)
        rejected = families.get("segserve_rejected_inputs", []) + families.get(
            "segserve_rejected_inputs_total", []
        )
        done = names | gauges <= set(families) and rejected
        if done or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert names | gauges <= set(families), sorted(set(families))
    for name in names:
        counts = [s for s in families[name] if s.name == f"{name}_count"]
        assert counts and all(s.labels["ModelName"] == "segmenter" for s in counts), name
    # TorchServe's own gauges: HandlerTime from BaseHandler.handle, PredictionTime from ts.service.
    for gauge in gauges:
        samples = [s for s in families[gauge] if s.labels["ModelName"] == "segmenter"]
        assert samples and all(s.value > 0 for s in samples), (gauge, families[gauge])
    class_names = {s.labels["ClassName"] for s in families["segserve_class_pixel_fraction"]}
    assert class_names == {"background", "road", "building", "sky"}
    reasons = {s.labels["Reason"]: s.value for s in rejected if s.name.endswith("_total")}
    assert reasons.get("empty", 0) >= 1


def test_grpc_predictions(torchserve, helpers, reference, grpc_stubs):
    pb2, pb2_grpc = grpc_stubs
    image = helpers.random_image(72, 56, 21)
    want = reference.predict([image])[0]
    channel = grpc.insecure_channel(torchserve.grpc_inference_target)
    stub = pb2_grpc.InferenceAPIsServiceStub(channel)
    auth = (("authorization", f"Bearer {torchserve.inference_key}"),)
    request = pb2.PredictionsRequest(
        model_name="segmenter", input={"data": helpers.png_bytes(image), "output": b"mask"}
    )
    reply = stub.Predictions(request, metadata=auth, timeout=60)
    np.testing.assert_array_equal(helpers.decode_png(reply.prediction), want)
    as_json = stub.Predictions(
        pb2.PredictionsRequest(
            model_name="segmenter", input={"data": helpers.png_bytes(image), "output": b"json"}
        ),
        metadata=auth,
        timeout=60,
    )
    assert json.loads(as_json.prediction)["width"] == 56
    # gRPC has no per-item status in TorchServe 0.12: a refused item is a successful call whose
    # bytes are the JSON error body (clients must check for {"code", "type", "message"}).
    bad = stub.Predictions(
        pb2.PredictionsRequest(model_name="segmenter", input={"data": b"not an image"}),
        metadata=auth,
        timeout=60,
    )
    error = json.loads(bad.prediction)
    assert error["code"] == 415 and error["type"] == "not_an_image"
    with pytest.raises(grpc.RpcError) as info:
        stub.Predictions(request, timeout=60)  # no token
    assert info.value.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
    channel.close()


def test_served_masks_equal_training_predictor(torchserve, helpers, tiny_export):
    """Parity with the offline predictor users run (training/predict.py), single requests."""
    predict = pytest.importorskip("training.predict")
    predictor = predict.Predictor.from_export(tiny_export)
    for seed, (h, w) in enumerate(SIZES[:3]):
        image = helpers.random_image(h, w, 40 + seed)
        response = helpers.rest_predict(torchserve, helpers.png_bytes(image))
        assert response.status_code == 200, response.text
        mask, _ = predictor.predict(image)
        np.testing.assert_array_equal(helpers.decode_png(response.content), mask)

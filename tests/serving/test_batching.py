"""True batching on a real TorchServe: concurrent requests share ONE forward.

A dedicated server whose archive waits up to 5 s to fill a batch of 4: four concurrent requests
are then certainly one batch (the ``segserve_batch_size`` histogram proves it: one observation
per forward, valued by the images in it), and a corrupt member gets its own 4xx while its
batch-mates get exact masks.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from serving.archive import ArchiveOptions, build_archive
from serving.server import stop

pytestmark = [pytest.mark.serving, pytest.mark.slow]

SIZES = [(64, 64), (40, 90), (130, 70), (57, 57)]


@pytest.fixture(scope="module")
def batch_server(tiny_export, tmp_path_factory, torchserve_factory):
    store = tmp_path_factory.mktemp("batch_store")
    build_archive(tiny_export, store, ArchiveOptions(batch_size=4, max_batch_delay_ms=5000))
    info = torchserve_factory(store)
    try:
        yield info
    finally:
        stop(info.workdir)  # free the CPU for the next module now


def batch_stats(helpers, info) -> tuple[float, float]:
    samples = helpers.scrape(info).get("segserve_batch_size", [])
    count = sum(s.value for s in samples if s.name == "segserve_batch_size_count")
    total = sum(s.value for s in samples if s.name == "segserve_batch_size_sum")
    return count, total


def wait_for_stats(helpers, info, expected: tuple[float, float]) -> tuple[float, float]:
    deadline = time.monotonic() + 30  # metrics arrive via the worker log, asynchronously
    stats = batch_stats(helpers, info)
    while stats != expected and time.monotonic() < deadline:
        time.sleep(0.3)
        stats = batch_stats(helpers, info)
    return stats


def concurrently(fn, items):
    with ThreadPoolExecutor(len(items)) as pool:
        return list(pool.map(fn, items))


def test_concurrent_requests_share_one_forward_and_match_offline(batch_server, helpers, reference):
    images = [helpers.random_image(h, w, 100 + i) for i, (h, w) in enumerate(SIZES)]
    expected = reference.predict(images, batched=True)
    before = batch_stats(helpers, batch_server)
    responses = concurrently(
        lambda img: helpers.rest_predict(batch_server, helpers.png_bytes(img)), images
    )
    for response, image, want in zip(responses, images, expected, strict=True):
        assert response.status_code == 200, response.text
        got = helpers.decode_png(response.content)
        assert got.shape == image.shape[:2]
        np.testing.assert_array_equal(got, want)
    after = wait_for_stats(helpers, batch_server, (before[0] + 1, before[1] + 4))
    assert after == (before[0] + 1, before[1] + 4)  # one forward holding four images


def test_corrupt_member_gets_its_own_4xx(batch_server, helpers, reference):
    images = [helpers.random_image(h, w, 200 + i) for i, (h, w) in enumerate(SIZES[:3])]
    expected = reference.predict(images, batched=True)
    good = [helpers.png_bytes(img) for img in images]
    bodies = [good[0], good[1][: len(good[1]) // 3], good[1], good[2]]
    before = batch_stats(helpers, batch_server)
    responses = concurrently(lambda body: helpers.rest_predict(batch_server, body), bodies)
    assert [r.status_code for r in responses] == [200, 400, 200, 200]
    error = responses[1].json()
    assert error["type"] == "truncated" and "re-send" in error["message"]
    for response, want in zip([responses[0], responses[2], responses[3]], expected, strict=True):
        np.testing.assert_array_equal(helpers.decode_png(response.content), want)
    after = wait_for_stats(helpers, batch_server, (before[0] + 1, before[1] + 3))
    assert after == (before[0] + 1, before[1] + 3)  # same forward, corrupt one left out
    # The worker is still up: the management API lists it READY.
    import requests

    described = requests.get(
        f"{batch_server.management_url}/models/segmenter",
        headers={"Authorization": f"Bearer {batch_server.management_key}"},
        timeout=10,
    ).json()
    assert [w["status"] for w in described[0]["workers"]] == ["READY"]


def test_grpc_batch_with_a_bad_member(batch_server, helpers, reference, grpc_stubs):
    pb2, pb2_grpc = grpc_stubs
    images = [helpers.random_image(h, w, 300 + i) for i, (h, w) in enumerate(SIZES[:3])]
    expected = reference.predict(images, batched=True)
    inputs = [helpers.png_bytes(images[0]), b"<html>oops</html>"]
    inputs += [helpers.png_bytes(img) for img in images[1:]]
    channel = grpc.insecure_channel(batch_server.grpc_inference_target)
    stub = pb2_grpc.InferenceAPIsServiceStub(channel)
    auth = (("authorization", f"Bearer {batch_server.inference_key}"),)

    def call(data: bytes) -> bytes:
        request = pb2.PredictionsRequest(model_name="segmenter", input={"data": data})
        return stub.Predictions(request, metadata=auth, timeout=60).prediction

    replies = concurrently(call, inputs)
    channel.close()
    error = json.loads(replies[1])
    assert error["code"] == 415 and error["type"] == "not_an_image"
    for reply, want in zip([replies[0], replies[2], replies[3]], expected, strict=True):
        np.testing.assert_array_equal(helpers.decode_png(reply), want)

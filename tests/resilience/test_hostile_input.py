"""Hostile and odd inputs against the real server (shared ``torchserve`` fixture), REST and gRPC.

Every valid input gets the offline pipeline's mask at its own (displayed) size; every invalid
one a 4xx JSON error whose ``type`` names the problem; afterwards the server is still healthy
and still serves exact masks.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import requests
from PIL import Image

pytestmark = [pytest.mark.serving, pytest.mark.slow]


def send(info, case, timeout: float = 60) -> requests.Response:
    url = f"{info.inference_url}/predictions/segmenter"
    headers = {"Authorization": f"Bearer {info.inference_key}", **case.headers}
    if case.fields is not None:
        files = {k: ("f", v) for k, v in case.fields.items() if isinstance(v, bytes)}
        data = {k: v for k, v in case.fields.items() if isinstance(v, str)}
        return requests.post(url, files=files or None, data=data, headers=headers, timeout=timeout)
    headers.setdefault("Content-Type", "application/octet-stream")
    return requests.post(url, data=case.body, headers=headers, timeout=timeout)


def mask_of(content: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(content)))


def check_answer(case, status: int, content: bytes, offline) -> None:
    if case.size is not None:
        assert status == 200, f"{case.name}: {status} {content[:300]!r}"
        got = mask_of(content)
        assert got.shape == case.size, f"{case.name}: mask {got.shape}, image {case.size}"
        np.testing.assert_array_equal(got, offline(case.body), err_msg=case.name)
        return
    assert status == case.status, f"{case.name}: {status} {content[:300]!r}"
    error = json.loads(content)
    assert error["code"] == case.status and error["type"] == case.error_type, (case.name, error)
    assert len(error["message"]) > 20, (case.name, error)  # says what is wrong and what to do


def test_rest_corpus(torchserve, corpus, offline):
    answers = {case.name: send(torchserve, case) for case in corpus}
    for case in corpus:
        check_answer(case, answers[case.name].status_code, answers[case.name].content, offline)
    # The messages name the problem, not just a generic failure.
    assert "10000000000 pixels" in answers["png_bomb_100000x100000"].json()["message"]
    assert "10000x5000" in answers["png_claims_10000x5000"].json()["message"]
    assert "PDF" in answers["pdf"].json()["message"]
    assert "truncated" in answers["truncated_jpeg"].json()["message"]


def test_grpc_corpus_subset(torchserve, corpus, offline):
    from client.grpc_stubs import load_stubs

    stubs = load_stubs()
    channel = __import__("grpc").insecure_channel(torchserve.grpc_inference_target)
    stub = stubs.inference_pb2_grpc.InferenceAPIsServiceStub(channel)
    metadata = [("authorization", f"Bearer {torchserve.inference_key}")]

    def predict(inputs: dict[str, bytes]) -> bytes:
        request = stubs.inference_pb2.PredictionsRequest(model_name="segmenter", input=inputs)
        return stub.Predictions(request, metadata=metadata, timeout=60).prediction

    subset = [c for c in corpus if c.grpc]
    assert len(subset) >= 12
    for case in subset:
        if case.fields is not None:
            inputs = {k: v if isinstance(v, bytes) else v.encode() for k, v in case.fields.items()}
        else:
            inputs = {"data": case.body}
        content = predict(inputs)
        # gRPC drops per-item status codes: a refusal is an OK reply carrying the JSON error.
        status = 200 if case.size is not None else json.loads(content)["code"]
        check_answer(case, status, content, offline)
    png = next(c for c in corpus if c.name == "png").body
    # No image key at all, or only keys that are not image fields: a 400 naming the fields.
    for inputs in ({"output": b"mask"}, {"img": png, "extra": b"1"}):
        error = json.loads(predict(inputs))
        assert error["code"] == 400 and error["type"] == "empty", error
        assert "fields" in error["message"] and "data" in error["message"]
    channel.close()


def test_server_healthy_and_exact_after_the_corpus(torchserve, corpus, offline, scene_images):
    from loadtest.workers import worker_pids

    pids = worker_pids(torchserve)
    for case in corpus:  # once more, back to back, then the health check
        send(torchserve, case)
    assert worker_pids(torchserve) == pids  # no input killed (and restarted) the worker
    auth = {"Authorization": f"Bearer {torchserve.inference_key}"}
    ping = requests.get(f"{torchserve.inference_url}/ping", headers=auth, timeout=10)
    assert ping.status_code == 200 and ping.json()["status"] == "Healthy"
    mgmt = {"Authorization": f"Bearer {torchserve.management_key}"}
    described = requests.get(
        f"{torchserve.management_url}/models/segmenter", headers=mgmt, timeout=10
    ).json()
    assert [w["status"] for w in described[0]["workers"]] == ["READY"]
    for body in scene_images:
        resp = requests.post(
            f"{torchserve.inference_url}/predictions/segmenter", data=body, headers=auth, timeout=60
        )
        assert resp.status_code == 200, resp.text
        np.testing.assert_array_equal(mask_of(resp.content), offline(body))

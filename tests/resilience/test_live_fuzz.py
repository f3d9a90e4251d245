"""A bounded live fuzz run: seeded random fields, headers and bytes against the real server.

300 REST and 150 gRPC requests (4 in flight, so they share batches): every answer is a 2xx or
a 4xx, never a 5xx, and the worker keeps its pid. The pure-function fuzzing (Hypothesis) is
``tests/serving/test_fuzz.py``.
"""

from __future__ import annotations

import io
import json
import random
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from PIL import Image

pytestmark = [pytest.mark.serving, pytest.mark.slow]

REST_REQUESTS = 300
GRPC_REQUESTS = 150
KEYS = ["data", "body", "image", "file", "output", "stream", "Output", "\u00e9", "\x00", ""]
OUTPUTS = ["mask", "color", "overlay", "overlay_jpeg", "json", "MASK", "over-lay", ""]


def _png(rng: random.Random) -> bytes:
    h, w = rng.randint(1, 70), rng.randint(1, 70)
    rgb = np.random.default_rng(rng.randint(0, 1 << 30)).integers(0, 256, (h, w, 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=rng.choice(["PNG", "JPEG", "GIF"]))
    return buf.getvalue()


def _text(rng: random.Random, limit: int = 40) -> str:
    alphabet = "abc/*;=,.q01 \t" + "\u00e9\u00f1\u2028\ufeff\U0001f600\x01\x7f"
    if rng.random() < 0.05:
        limit = 5000
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, limit)))


def _header_text(rng: random.Random) -> bytes:
    # HTTP clients refuse leading/trailing whitespace in a header value; all else goes.
    return _text(rng).strip(" \t").encode("utf-8")


def _body(rng: random.Random) -> bytes:
    choice = rng.random()
    if choice < 0.5:
        return _png(rng)
    data = bytearray(_png(rng))
    if choice < 0.8:  # corrupt a valid file
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data[: rng.randint(0, len(data))])
    return rng.randbytes(rng.randint(0, 3000))


def _value(rng: random.Random) -> bytes | str:
    roll = rng.random()
    if roll < 0.4:
        return rng.choice(OUTPUTS)
    if roll < 0.7:
        return _text(rng)
    return rng.randbytes(rng.randint(0, 60))


def rest_request(rng: random.Random) -> dict:
    headers = {}
    if rng.random() < 0.4:
        headers["Accept"] = _header_text(rng)
    if rng.random() < 0.2:
        headers["X-Segserve-Output"] = rng.choice([*OUTPUTS, _header_text(rng)])
    if rng.random() < 0.5:
        files = {rng.choice(KEYS) or "data": ("f", _body(rng))}
        for _ in range(rng.randint(0, 3)):
            files[rng.choice([*KEYS, _text(rng, 12)]) or "x"] = (None, _value(rng))
        return {"files": files, "headers": headers}
    if rng.random() < 0.2:
        headers["Content-Type"] = rng.choice(["application/json", "text/plain", "image/png"])
    return {"data": _body(rng), "headers": headers}


def grpc_inputs(rng: random.Random) -> dict[str, bytes]:
    inputs = {rng.choice(KEYS[:4]): _body(rng)} if rng.random() < 0.9 else {}
    for _ in range(rng.randint(0, 3)):
        value = _value(rng)
        key = rng.choice([*KEYS, _text(rng, 12)]).replace("\x00", "") or "k"
        inputs[key] = value if isinstance(value, bytes) else value.encode("utf-8", "replace")
    return inputs


def frontend_multipart_refusal(status: int, content: bytes) -> bool:
    """TorchServe 0.12's frontend answers a multipart part with a blank name (e.g. only
    whitespace) with 500 ErrorDataDecoderException "empty name" from Netty's decoder, before any
    worker sees it: documented in docs/resilience.md, harmless to the worker."""
    try:
        error = json.loads(content)
    except ValueError:
        return False
    return status == 500 and error.get("type") == "ErrorDataDecoderException"


def test_live_fuzz_rest_and_grpc(torchserve):
    import grpc

    from client.grpc_stubs import load_stubs
    from loadtest.workers import worker_pids

    pids = worker_pids(torchserve)
    url = f"{torchserve.inference_url}/predictions/segmenter"
    auth = {"Authorization": f"Bearer {torchserve.inference_key}"}
    rng = random.Random(20261201)
    rest = [rest_request(rng) for _ in range(REST_REQUESTS)]
    grpc_requests = [grpc_inputs(rng) for _ in range(GRPC_REQUESTS)]

    def send_rest(kwargs: dict) -> tuple[int, bytes]:
        headers = {**auth, **kwargs.pop("headers")}
        resp = requests.post(url, headers=headers, timeout=60, **kwargs)
        return resp.status_code, resp.content

    stubs = load_stubs()
    channel = grpc.insecure_channel(torchserve.grpc_inference_target)
    stub = stubs.inference_pb2_grpc.InferenceAPIsServiceStub(channel)
    metadata = [("authorization", f"Bearer {torchserve.inference_key}")]

    def send_grpc(inputs: dict[str, bytes]) -> tuple[int, bytes]:
        request = stubs.inference_pb2.PredictionsRequest(model_name="segmenter", input=inputs)
        try:
            content = stub.Predictions(request, metadata=metadata, timeout=60).prediction
        except grpc.RpcError as err:
            return 1000 + err.code().value[0], err.details().encode()
        try:  # gRPC has no per-item status: a refusal is an OK reply carrying the JSON error
            return int(json.loads(content)["code"]), content
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            return 200, content

    try:
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(send_rest, rest)) + list(pool.map(send_grpc, grpc_requests))
    finally:
        channel.close()
    statuses = [status for status, _ in answers]
    bad = [
        (s, c[:200])
        for s, c in answers
        if not (200 <= s < 300 or 400 <= s < 500 or frontend_multipart_refusal(s, c))
    ]
    assert not bad, f"{len(bad)} answers neither 2xx nor 4xx, e.g. {bad[:5]}"
    assert statuses.count(200) > 100 and sum(400 <= s < 500 for s in statuses) > 100, statuses
    assert worker_pids(torchserve) == pids

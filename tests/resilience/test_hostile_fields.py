"""Hostile values in every field the handler reads, against the real server and archive.

Each hostile request is sent together with three good ones, so that TorchServe batches them
(archive batch 4, 50 ms delay): the hostile one must get a 2xx mask or a 4xx JSON error whose
message is bounded, printable ASCII; the good ones their exact masks; the worker its pid.

Before the fix, any non-ASCII character that reached the per-request status phrase (an echoed
``output`` value, ``Accept`` header, field name or gRPC key) killed the worker with its whole
batch ("Worker died."), a 40 KB ``output`` broke the HTTP status line, an ``overlay_jpeg`` wider
than JPEG allows failed the batch with 503, and a REST ``stream`` field hung for the response
timeout.
"""

from __future__ import annotations

import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import requests
from PIL import Image

from loadtest import hostile

pytestmark = [pytest.mark.serving, pytest.mark.slow]

MESSAGE_LIMIT = 600  # an error message quotes client input bounded (handler.errors.QUOTE_LIMIT)


def png_of(height: int, width: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(height // 8, 1), max(width // 8, 1), 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((width, height), Image.BILINEAR)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@dataclass(frozen=True)
class Hostile:
    """One hostile REST request: ``status`` 200 means a mask of the image's size."""

    name: str
    status: int
    files: dict[str, Any] | None = None
    data: Any = None
    headers: dict[str, Any] = field(default_factory=dict)
    error_type: str = ""


def rest_cases(png: bytes) -> list[Hostile]:
    b64 = base64.b64encode(png).decode()
    wide = png_of(1, 70_000, seed=3)
    long_text = "x" * 40_000
    return [
        Hostile("output_non_ascii", 400, {"data": ("i", png)}, {"output": "masqu\u00e9"},
                error_type="bad_request"),
        Hostile("output_emoji", 400, {"data": ("i", png)}, {"output": "\U0001f600"},
                error_type="bad_request"),
        Hostile("output_control_chars", 400, {"data": ("i", png)}, {"output": "\x00\x01\x1b[2J"},
                error_type="bad_request"),
        Hostile("output_invalid_utf8", 400, {"data": ("i", png), "output": (None, b"\xff\xfe\xfd")},
                error_type="bad_request"),
        Hostile("output_40kb", 400, {"data": ("i", png)}, {"output": long_text},
                error_type="bad_request"),
        Hostile("field_name_non_ascii_alone", 200, {"d\u00e9j\u00e0": ("i", png)}),
        Hostile("field_names_non_ascii", 400, {"d\u00e9j\u00e0": ("i", png), "\u00f1": ("j", b"1")},
                error_type="empty"),
        Hostile("field_names_long_control", 400,
                {"\x01" + "n" * 5000: ("i", png), "\u2028" * 300: ("j", b"1")}, error_type="empty"),
        Hostile("accept_non_ascii", 400, data=png, headers={"Accept": "image/\u00e9".encode()},
                error_type="bad_request"),
        Hostile("accept_invalid_utf8", 400, data=png, headers={"Accept": b"image/\xff\xfe"},
                error_type="bad_request"),
        Hostile("accept_control_and_long", 400, data=png,
                headers={"Accept": "\x01" + "a/b;" * 1500}, error_type="bad_request"),
        Hostile("x_segserve_output_non_ascii", 400, data=png,
                headers={"X-Segserve-Output": "m\u00e4sk".encode()}, error_type="bad_request"),
        Hostile("json_output_non_ascii", 400, data=json.dumps({"output": "\u00e9", "image": b64}),
                headers={"Content-Type": "application/json"}, error_type="bad_request"),
        Hostile("json_output_not_a_string", 400,
                data=json.dumps({"output": {"nested": ["\u00e9" * 3000]}, "image": b64}),
                headers={"Content-Type": "application/json"}, error_type="bad_request"),
        Hostile("json_keys_non_ascii", 415, data=json.dumps({"\u00e9\u0000": "x", "\ud7ff": 1}),
                headers={"Content-Type": "application/json"}, error_type="not_an_image"),
        Hostile("text_body_invalid_utf8", 415, data=b"\xff\xfe not an image \xc3",
                headers={"Content-Type": "text/plain; charset=utf-8"}, error_type="not_an_image"),
        Hostile("rest_stream_field", 200, {"data": ("i", png)}, {"stream": "true"}),
        Hostile("overlay_jpeg_too_wide", 400, {"data": ("i", wide)}, {"output": "overlay_jpeg"},
                error_type="unencodable"),
        Hostile("accept_jpeg_too_wide", 400, data=wide, headers={"Accept": "image/jpeg"},
                error_type="unencodable"),
        Hostile("jpeg_scan_bomb", 413, data=hostile.jpeg_scan_bomb(), error_type="decode_limit"),
    ]  # fmt: skip


def post(info, case: Hostile, timeout: float = 30) -> requests.Response:
    headers = {"Authorization": f"Bearer {info.inference_key}", **case.headers}
    if case.files is None and "Content-Type" not in headers:
        headers["Content-Type"] = "application/octet-stream"
    return requests.post(
        f"{info.inference_url}/predictions/segmenter",
        files=case.files,
        data=case.data,
        headers=headers,
        timeout=timeout,
    )


def error_problems(name: str, status: int, content: bytes, error_type: str = "") -> list[str]:
    """What is wrong with a 4xx JSON error: its code, type, or a message that is not bounded,
    printable ASCII (client input must be escaped and cut)."""
    try:
        error = json.loads(content)
        message = error["message"]
    except (ValueError, KeyError, TypeError):
        return [f"{name}: not a JSON error: {content[:200]!r}"]
    problems = []
    if error.get("code") != status or (error_type and error.get("type") != error_type):
        problems.append(
            f"{name}: {error.get('code')} {error.get('type')}, want {status} {error_type}"
        )
    if not 20 < len(message) <= MESSAGE_LIMIT:
        problems.append(f"{name}: message of {len(message)} characters")
    if not (message.isascii() and message.isprintable()):
        problems.append(f"{name}: message not printable ASCII: {message[:120]!r}")
    return problems


def mask_of(content: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(content)))


def with_batch_mates(info, send_hostile, good: list[bytes]):
    """Send the hostile request and the good ones at once, so they share a batch."""
    auth = {"Authorization": f"Bearer {info.inference_key}"}

    def send_good(body: bytes) -> requests.Response:
        url = f"{info.inference_url}/predictions/segmenter"
        return requests.post(url, data=body, headers=auth, timeout=30)

    with ThreadPoolExecutor(len(good) + 1) as pool:
        hostile = pool.submit(send_hostile)
        mates = [pool.submit(send_good, body) for body in good]
        return hostile.result(), [m.result() for m in mates]


def test_hostile_rest_fields_never_kill_a_worker_or_a_batch_mate(torchserve, offline):
    from loadtest.workers import worker_pids

    png = png_of(48, 80, seed=1)
    good = [png_of(40, 56, seed=s) for s in (10, 11, 12)]
    expected = [offline(body) for body in good]
    pids = worker_pids(torchserve)
    failures = []
    for case in rest_cases(png):
        try:
            resp, mates = with_batch_mates(torchserve, lambda c=case: post(torchserve, c), good)
        except requests.RequestException as exc:  # a hang or an unparsable status line
            failures.append(f"{case.name}: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        if resp.status_code != case.status:
            failures.append(f"{case.name}: {resp.status_code} {resp.content[:200]!r}")
        elif case.status == 200:
            if mask_of(resp.content).shape != (48, 80):
                failures.append(f"{case.name}: mask {mask_of(resp.content).shape}")
        else:
            failures += error_problems(case.name, resp.status_code, resp.content, case.error_type)
            if not (resp.reason.isascii() and len(resp.reason) < 40):
                failures.append(f"{case.name}: status phrase {resp.reason[:80]!r}")
        for mate, mask in zip(mates, expected, strict=True):
            if mate.status_code != 200:
                failures.append(f"{case.name}: batch-mate got {mate.status_code}")
            elif not np.array_equal(mask_of(mate.content), mask):
                failures.append(f"{case.name}: a batch-mate's mask differs from offline")
        if worker_pids(torchserve) != pids:
            failures.append(
                f"{case.name}: the worker died (pid {pids} -> {worker_pids(torchserve)})"
            )
            pids = worker_pids(torchserve)
    assert not failures, "\n".join(failures)


def grpc_stub(info):
    import grpc

    from client.grpc_stubs import load_stubs

    stubs = load_stubs()
    channel = grpc.insecure_channel(info.grpc_inference_target)
    stub = stubs.inference_pb2_grpc.InferenceAPIsServiceStub(channel)
    return stubs.inference_pb2, stub, channel


def grpc_cases(png: bytes) -> list[tuple[str, dict[str, bytes], int, str]]:
    """(name, input map, status, error type): 200 means a mask of the image's size."""
    return [
        ("key_non_ascii_alone", {"d\u00e9j\u00e0": png}, 200, ""),
        ("keys_non_ascii", {"d\u00e9j\u00e0": png, "\u00f1\u0001": b"1"}, 400, "empty"),
        ("key_long", {"k" * 20_000: png, "other": b"1"}, 400, "empty"),
        ("output_non_ascii", {"data": png, "output": "\u00e9".encode()}, 400, "bad_request"),
        ("output_invalid_utf8", {"data": png, "output": b"\xff\xfe"}, 400, "bad_request"),
        ("output_40kb", {"data": png, "output": b"y" * 40_000}, 400, "bad_request"),
        ("stream_field_garbage", {"data": png, "stream": b"\xff" * 100}, 200, ""),
        ("wide_overlay_jpeg", {"data": png_of(1, 70_000, 3), "output": b"overlay_jpeg"}, 400,
         "unencodable"),
    ]  # fmt: skip


def test_hostile_grpc_inputs_unary_and_stream(torchserve, offline):
    from loadtest.workers import worker_pids

    pb2, stub, channel = grpc_stub(torchserve)
    metadata = [("authorization", f"Bearer {torchserve.inference_key}")]
    png = png_of(48, 80, seed=1)
    pids = worker_pids(torchserve)
    failures = []
    try:
        for name, inputs, status, error_type in grpc_cases(png):
            request = pb2.PredictionsRequest(model_name="segmenter", input=inputs)
            calls = {
                "Predictions": lambda r=request: (
                    stub.Predictions(r, metadata=metadata, timeout=30).prediction
                ),
                # Without the ``stream`` input the client would normally add, too.
                "StreamPredictions": lambda r=request: b"".join(
                    c.prediction for c in stub.StreamPredictions(r, metadata=metadata, timeout=30)
                ),
            }
            for method, call in calls.items():
                try:
                    content = call()
                except Exception as exc:  # noqa: BLE001 - a hang or a dead worker
                    failures.append(f"{method} {name}: {type(exc).__name__} {str(exc)[:200]}")
                    continue
                if status == 200:
                    try:
                        shape = mask_of(content).shape
                    except OSError:
                        shape = content[:200]
                    if shape != (48, 80):
                        failures.append(f"{method} {name}: not a 48x80 mask: {shape!r}")
                else:
                    failures += error_problems(f"{method} {name}", status, content, error_type)
                if worker_pids(torchserve) != pids:
                    failures.append(f"{method} {name}: the worker died")
                    pids = worker_pids(torchserve)
    finally:
        channel.close()
    assert not failures, "\n".join(failures)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def test_grpc_invalid_utf8_key_is_refused_cleanly(torchserve):
    """A map key that is not UTF-8 (hand-encoded protobuf: Python's stubs refuse to send it)
    is refused by the frontend's parser with a clear status, without reaching a worker."""
    import grpc

    from loadtest.workers import worker_pids

    pids = worker_pids(torchserve)
    entry = _field(1, b"\xff\xfekey") + _field(2, png_of(16, 16))
    raw = _field(1, b"segmenter") + _field(3, entry)
    channel = grpc.insecure_channel(torchserve.grpc_inference_target)
    try:
        call = channel.unary_unary(
            "/org.pytorch.serve.grpc.inference.InferenceAPIsService/Predictions",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        metadata = [("authorization", f"Bearer {torchserve.inference_key}")]
        with pytest.raises(grpc.RpcError) as refused:
            call(raw, metadata=metadata, timeout=30)
        assert refused.value.code() != grpc.StatusCode.DEADLINE_EXCEEDED, refused.value
    finally:
        channel.close()
    assert worker_pids(torchserve) == pids

"""Hostile requests for `make chaos`: odd text and odd images that must never kill a worker.

:func:`rest_requests` and :func:`grpc_requests` build the list (pure, unit-tested): non-ASCII,
control-character, invalid-UTF-8 and tens-of-KB values in the multipart ``output`` field, in
multipart field *names*, in the ``Accept`` and ``X-Segserve-Output`` headers and in the gRPC
input map; a JSON body ``{"output": "é", "image": <base64>}``; a multipart ``stream=true``
field; an image whose ``overlay_jpeg`` answer would be wider than JPEG allows (70000 x 1);
random bytes; a PNG that claims 100000 x 100000 pixels. Multipart bodies are written here byte
by byte, so a field name can be bytes no HTTP library would send.

:func:`hostile_traffic` is the chaos scenario: Locust's REST + gRPC users send good traffic
while :class:`HostileLoop` cycles through the list. A hostile request may be refused (4xx) or
answered (2xx); it must not kill the worker (a restart shows as a pid change) or fail the
good requests batched with it.

Example:
    >>> names = [r.name for r in rest_requests(b"\\x89PNG...")]
    >>> "output_invalid_utf8" in names and "accept_long" in names
    True
    >>> body = multipart_body([(b"output", b"mask", None)], boundary="B")
    >>> body.decode()
    '--B\\r\\nContent-Disposition: form-data; name="output"\\r\\n\\r\\nmask\\r\\n--B--\\r\\n'
"""

from __future__ import annotations

import base64
import io
import json
import struct
import subprocess
import tempfile
import threading
import time
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from handler.imaging import JPEG_MAX_DIMENSION
from loadtest.errors import ChaosError
from loadtest.stats import pid_changes
from loadtest.workers import wait_workers_ready, worker_pids
from serving.properties import DEFAULT_MODEL_NAME
from serving.server import ServerError

# Longer than any limit a header or field value is likely to meet (Netty's 8 KiB header line).
LONG = 50_000
BOUNDARY = "segserve-hostile-7f3a"
# (name bytes, value bytes, filename or None): one multipart part.
Part = tuple[bytes, bytes, str | None]


@dataclass(frozen=True)
class HostileRequest:
    """One hostile request: REST (``body`` + ``headers``) or gRPC (``inputs``)."""

    name: str
    protocol: str  # "rest" or "grpc"
    body: bytes = b""
    # REST header values as bytes: sent on the wire exactly (requests passes bytes through).
    headers: dict[str, bytes] = field(default_factory=dict)
    inputs: dict[str, bytes] = field(default_factory=dict)


def multipart_body(parts: Sequence[Part], boundary: str = BOUNDARY) -> bytes:
    """A ``multipart/form-data`` body from raw parts; names are not escaped or encoded."""
    out = b""
    for name, value, filename in parts:
        disposition = b'Content-Disposition: form-data; name="' + name + b'"'
        if filename is not None:
            disposition += b'; filename="' + filename.encode() + b'"'
            disposition += b"\r\nContent-Type: application/octet-stream"
        out += b"--" + boundary.encode() + b"\r\n" + disposition + b"\r\n\r\n" + value + b"\r\n"
    return out + b"--" + boundary.encode() + b"--\r\n"


def png_claiming(width: int, height: int) -> bytes:
    """A ~60-byte PNG whose header claims ``width`` x ``height`` RGB pixels (a bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def jpeg_scan_bomb(scans: int = 300) -> bytes:
    """A progressive JPEG whose last scan is repeated ``scans`` times: each scan would make
    libjpeg pass over the whole picture again (the handler refuses it from its markers)."""
    import numpy as np
    from PIL import Image

    rgb = np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", progressive=True)
    data = buf.getvalue()
    last = data.rfind(b"\xff\xda")
    return data[:last] + data[last:-2] * scans + b"\xff\xd9"


def wide_png(width: int = JPEG_MAX_DIMENSION + 4_500, height: int = 1) -> bytes:
    """A real, valid PNG wider than a JPEG may be: its ``overlay_jpeg`` cannot be encoded."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (70, 130, 180)).save(buf, format="PNG")
    return buf.getvalue()


def odd_texts() -> dict[str, bytes]:
    """The odd values every text slot gets: name suffix → bytes."""
    return {
        "non_ascii": "é".encode(),
        "cyrillic_emoji": "маска🙂".encode(),
        "control_chars": b"\x00mask\x01\x1b[31m\x7f",
        "invalid_utf8": b"\xff\xfe\xc3\x28",
        "long": b"m" * LONG,
        "long_non_ascii": "é".encode() * (LONG // 2),
    }


def _multipart(name: str, parts: Sequence[Part], **headers: bytes) -> HostileRequest:
    content_type = f"multipart/form-data; boundary={BOUNDARY}".encode()
    return HostileRequest(
        name, "rest", multipart_body(parts), {"Content-Type": content_type, **headers}
    )


def _raw(name: str, body: bytes, content_type: bytes, **headers: bytes) -> HostileRequest:
    return HostileRequest(name, "rest", body, {"Content-Type": content_type, **headers})


def _text_slots(image: bytes) -> list[HostileRequest]:
    """Every odd text in every text slot a REST request has."""
    data: Part = (b"data", image, "image")
    octet = b"application/octet-stream"
    out: list[HostileRequest] = []
    for kind, text in odd_texts().items():
        out += [
            _multipart(f"output_{kind}", [data, (b"output", text, None)]),
            # The image under an odd field name, and an odd name for the output field.
            _multipart(f"field_name_{kind}", [(text, image, "image")]),
            _multipart(f"output_name_{kind}", [data, (text, b"mask", None)]),
            _raw(f"accept_{kind}", image, octet, Accept=text),
            _raw(f"x_segserve_output_{kind}", image, octet, **{"X-Segserve-Output": text}),
        ]
    return out


def rest_requests(image: bytes) -> list[HostileRequest]:
    """The REST hostile list; ``image`` is a valid PNG for the requests that need one."""
    data: Part = (b"data", image, "image")
    b64 = base64.b64encode(image).decode()
    as_json = b"application/json"
    bomb = png_claiming(100_000, 100_000)
    jpeg: Part = (b"output", b"overlay_jpeg", None)
    stream: Part = (b"stream", b"true", None)
    return _text_slots(image) + [
        _raw("json_output_non_ascii",
             json.dumps({"output": "é", "image": b64}, ensure_ascii=False).encode(), as_json),
        _raw("json_output_invalid_utf8",
             b'{"output": "\xff\xfe", "image": "' + b64.encode() + b'"}', as_json),
        _multipart("multipart_stream_true", [data, (b"output", b"mask", None), stream]),
        _multipart("multipart_stream_true_json", [data, (b"output", b"json", None), stream]),
        _multipart("overlay_jpeg_70000x1", [(b"data", wide_png(), "wide.png"), jpeg]),
        _raw("random_bytes", _random_bytes(4096), b"application/octet-stream"),
        _multipart("random_bytes_multipart", [(b"data", _random_bytes(4096), "x")]),
        _raw("png_bomb_100000x100000", bomb, b"image/png"),
        _multipart("png_bomb_overlay_jpeg", [(b"data", bomb, "bomb.png"), jpeg]),
    ]  # fmt: skip


def grpc_requests(image: bytes) -> list[HostileRequest]:
    """The gRPC hostile list: odd values and keys in the ``input`` map, odd images."""

    def rpc(name: str, **inputs: bytes) -> HostileRequest:
        return HostileRequest(name, "grpc", inputs=inputs)

    out: list[HostileRequest] = []
    for kind, text in odd_texts().items():
        # Map keys are proto strings (valid UTF-8 only): invalid bytes arrive replaced.
        key = text.decode("utf-8", errors="replace")
        out += [
            rpc(f"grpc_output_{kind}", data=image, output=text),
            rpc(f"grpc_key_{kind}", **{key: image}),
        ]
    return out + [
        rpc("grpc_stream_true_unary", data=image, stream=b"true"),
        rpc("grpc_overlay_jpeg_70000x1", data=wide_png(), output=b"overlay_jpeg"),
        rpc("grpc_random_bytes", data=_random_bytes(4096)),
        rpc("grpc_png_bomb", data=png_claiming(100_000, 100_000), output=b"overlay_jpeg"),
    ]  # fmt: skip


def _random_bytes(n: int, seed: int = 0) -> bytes:
    import random

    return random.Random(seed).randbytes(n)


# --- sending ------------------------------------------------------------------------------

# gRPC codes that mean "the request was refused" (a 4xx), not "the server failed".
GRPC_REFUSALS = ("INVALID_ARGUMENT", "FAILED_PRECONDITION", "OUT_OF_RANGE", "NOT_FOUND")


@dataclass(frozen=True)
class HostileAnswer:
    """What one hostile request got: ``status`` as text (``"415"``, ``"grpc INVALID_ARGUMENT"``,
    ``"no answer (ConnectionError)"``) and whether it is a 2xx/4xx (``acceptable``)."""

    name: str
    status: str
    acceptable: bool
    seconds: float
    detail: str = ""  # the start of an error answer


def classify_http(status: int) -> bool:
    """A 2xx or a 4xx is an acceptable answer to a hostile request; a 5xx or none is not."""
    return 200 <= status < 300 or 400 <= status < 500


def classify_grpc(code: str, details: str) -> bool:
    """An RPC error that refuses the request (a 4xx's equivalents) is acceptable.

    RESOURCE_EXHAUSTED is TorchServe's 413 (too large) *and* its 507 "Worker died." (a
    SIGKILLed worker, e.g. by the OOM killer): only the first is acceptable.
    """
    if code in GRPC_REFUSALS:
        return True
    return code == "RESOURCE_EXHAUSTED" and not details.startswith("Worker died")


def send_rest(info: Any, request: HostileRequest, session: requests.Session, model: str,
              timeout: float = 10.0) -> HostileAnswer:  # fmt: skip
    """POST one REST hostile request; never raises for HTTP trouble."""
    headers = {"Authorization": f"Bearer {info.inference_key}", **request.headers}
    start = time.monotonic()
    try:
        resp = session.post(
            f"{info.inference_url}/predictions/{model}",
            data=request.body,
            headers=headers,
            timeout=timeout,
        )
    except requests.RequestException as exc:
        seconds = time.monotonic() - start
        return HostileAnswer(request.name, f"no answer ({type(exc).__name__})", False, seconds)
    seconds = time.monotonic() - start
    return HostileAnswer(
        request.name, str(resp.status_code), classify_http(resp.status_code), seconds
    )


def send_grpc(stub: Any, stubs: Any, info: Any, request: HostileRequest, model: str,
              timeout: float = 10.0) -> HostileAnswer:  # fmt: skip
    """One gRPC Predictions call; a handler's refusal arrives as a ``{"code": 4xx}`` payload."""
    import grpc

    from client.grpc_client import rejection_in_payload

    message = stubs.inference_pb2.PredictionsRequest(model_name=model, input=request.inputs)
    metadata = [("authorization", f"Bearer {info.inference_key}")]
    start = time.monotonic()
    try:
        resp = stub.Predictions(message, timeout=timeout, metadata=metadata)
    except grpc.RpcError as err:
        code, details = err.code().name, err.details() or ""
        seconds = time.monotonic() - start
        ok = classify_grpc(code, details)
        return HostileAnswer(request.name, f"grpc {code}", ok, seconds, details[:160])
    seconds = time.monotonic() - start
    refused = rejection_in_payload(resp.prediction, "")
    status = getattr(refused, "status", 200)
    detail = str(refused)[:160] if refused is not None else ""
    return HostileAnswer(request.name, f"grpc OK {status}", classify_http(status), seconds, detail)


class HostileLoop:
    """One thread sending ``hostile`` in turn, round after round, until :meth:`stop`.

    ``timeout`` is short on purpose: a hostile request must be answered at once, and one
    that hangs is a finding (``no answer (ReadTimeout)``), not something to wait a minute for.
    """

    def __init__(
        self,
        info: Any,
        hostile: Sequence[HostileRequest],
        model: str = DEFAULT_MODEL_NAME,
        pause_s: float = 0.05,
        timeout: float = 10.0,
    ) -> None:
        if not hostile:
            raise ValueError("HostileLoop needs at least one request")
        self.info, self.hostile, self.model, self.pause_s = info, list(hostile), model, pause_s
        self.timeout = timeout
        self.answers: list[HostileAnswer] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import grpc

        from client.grpc_client import _CHANNEL_OPTIONS
        from client.grpc_stubs import load_stubs

        stubs = load_stubs()
        channel = grpc.insecure_channel(self.info.grpc_inference_target, _CHANNEL_OPTIONS)
        stub = stubs.inference_pb2_grpc.InferenceAPIsServiceStub(channel)
        session = requests.Session()
        n = 0
        while not self._stop.is_set():
            request = self.hostile[n % len(self.hostile)]
            n += 1
            if request.protocol == "grpc":
                answer = send_grpc(stub, stubs, self.info, request, self.model, self.timeout)
            else:
                answer = send_rest(self.info, request, session, self.model, self.timeout)
            self.answers.append(answer)
            self._stop.wait(self.pause_s)
        session.close()
        channel.close()

    def start(self) -> HostileLoop:
        self._thread.start()
        return self

    def stop(self, timeout: float = 90.0) -> list[HostileAnswer]:
        self._stop.set()
        self._thread.join(timeout)
        return list(self.answers)


class PidWatcher:
    """Samples the model's worker pids every ``every`` seconds: a change is a restart."""

    def __init__(self, info: Any, model: str = DEFAULT_MODEL_NAME, every: float = 0.5) -> None:
        self.info, self.model, self.every = info, model, every
        self.samples: list[tuple[int, ...]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                pids = tuple(sorted(worker_pids(self.info, self.model)))
            except ServerError:
                pids = ()
            if pids and (not self.samples or self.samples[-1] != pids):
                self.samples.append(pids)
            self._stop.wait(self.every)

    def start(self) -> PidWatcher:
        self._thread.start()
        return self

    def stop(self) -> list[tuple[int, ...]]:
        self._stop.set()
        self._thread.join(30)
        return self.samples


# --- figures (pure) and the scenario ------------------------------------------------------


def answer_figures(answers: Sequence[HostileAnswer]) -> dict[str, Any]:
    """Hostile answers by status, and the requests that got an unacceptable one.

    Example:
        >>> answer_figures([HostileAnswer("a", "400", True, 0.1),
        ...                 HostileAnswer("b", "500", False, 0.2)])["unacceptable"]
        {'b': ['500']}
    """
    bad: dict[str, set[str]] = {}
    details: dict[str, str] = {}
    for a in answers:
        if not a.acceptable:
            bad.setdefault(a.name, set()).add(a.status)
            details.setdefault(a.name, a.detail)
    return {
        "hostile_requests": len(answers),
        "hostile_by_status": dict(sorted(Counter(a.status for a in answers).items())),
        "hostile_distinct": len({a.name for a in answers}),
        "hostile_max_s": round(max((a.seconds for a in answers), default=0.0), 2),
        "unacceptable": {k: sorted(v) for k, v in sorted(bad.items())},
        "unacceptable_details": dict(sorted(details.items())),
    }


def hostile_traffic(
    info: Any,
    hostile: Sequence[HostileRequest],
    duration_s: float = 30.0,
    users: int = 4,
    model: str = DEFAULT_MODEL_NAME,
    out_dir: Path | None = None,
) -> Any:
    """Locust good traffic (REST + gRPC users) for ``duration_s`` with ``hostile`` cycling
    alongside; checks good-request failures, worker restarts and the hostile answers."""
    from loadtest.chaos import ScenarioResult
    from loadtest.run import server_locust_command
    from loadtest.slo import ReportError, summarise

    old = tuple(sorted(wait_workers_ready(info, model)))
    out_dir = Path(out_dir or tempfile.mkdtemp(prefix="segserve-hostile-"))
    watcher = PidWatcher(info, model).start()
    cmd = server_locust_command(
        info,
        out_dir / "locust",
        model_name=model,
        users=users,
        spawn_rate=users,
        duration=f"{int(duration_s)}s",
    )
    locust = subprocess.Popen(cmd)
    loop = HostileLoop(info, hostile, model).start()
    try:
        locust.wait(timeout=duration_s + 120)
    finally:
        answers = loop.stop()
        if locust.poll() is None:
            locust.kill()
    pid_sets = watcher.stop()
    try:
        good = summarise(out_dir / "locust_stats.csv")["total"]
    except (ReportError, KeyError) as exc:
        raise ChaosError(f"hostile_traffic: no usable Locust stats: {exc}") from None
    # The distinct pid sets in order: each change is a restart.
    seen = pid_changes([old, *pid_sets])
    restarts = len(seen) - 1
    figures = {
        "good_requests": good.requests,
        "good_failures": good.failures,
        "good_raw_failures": good.raw_failures,
        "good_p50_ms": good.p50_ms,
        "good_p95_ms": good.p95_ms,
        "good_rps": round(good.rps, 2),
        "users": users,
        "duration_s": duration_s,
        "worker_pids": [list(p) for p in seen],
        "worker_restarts": restarts,
        **answer_figures(answers),
    }
    checks = {
        "good requests were made": good.requests > 0,
        "hostile requests were sent": len(answers) > 0,
        "0 good-request failures (raw, before any retry)": good.raw_failures == 0,
        "0 worker restarts": restarts == 0,
        "every hostile answer is a 2xx or 4xx": not figures["unacceptable"],
    }
    return ScenarioResult("hostile_traffic", figures, checks)

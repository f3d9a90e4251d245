"""Retry/backoff and HTTP/gRPC error mapping, against a real local HTTP server in a thread.

A killed worker's requests (507 "Worker died.") are retried, a bounded number of times; a timed
out worker's (500 "Worker died.") are not. The real server's answers: tests/resilience.
"""

from __future__ import annotations

import json
import random
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from client.errors import (
    AuthError,
    ClientError,
    RequestRejected,
    RetryableServerError,
    ServerUnavailable,
    WorkerDied,
)
from client.rest import RestClient
from client.retry import WORKER_DIED_ONLY, RetryPolicy, call_with_retry

FAST = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.02, jitter=0.0)


@dataclass
class Script:
    """What the fake TorchServe answers, in order; the last answer repeats."""

    answers: list[tuple[int, dict, dict]]  # (status, json body, extra headers)
    seen: list[dict] = field(default_factory=list)  # request headers, one per request
    bodies: list[bytes] = field(default_factory=list)  # request bodies, one per request


@pytest.fixture
def server() -> Iterator[tuple[str, Script]]:
    script = Script(answers=[(200, {"status": "Healthy"}, {})])

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length", 0))
            script.bodies.append(self.rfile.read(length))
            script.seen.append(dict(self.headers))
            i = min(len(script.seen), len(script.answers)) - 1
            status, body, headers = script.answers[i]
            payload = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = _answer

        def log_message(self, *args: object) -> None:  # keep pytest output clean
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", script
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_fails_twice_then_succeeds(server: tuple[str, Script]) -> None:
    url, script = server
    busy = (503, {"code": 503, "type": "ServiceUnavailableException", "message": "busy"}, {})
    script.answers = [busy, busy, (200, {"status": "Healthy"}, {})]
    client = RestClient(url, url, token="tok", retry=FAST)
    assert client.ping() == "Healthy"
    assert len(script.seen) == 3
    assert all(h["Authorization"] == "Bearer tok" for h in script.seen)


def test_gives_up_after_attempts(server: tuple[str, Script]) -> None:
    url, script = server
    script.answers = [(503, {"message": "no worker"}, {})]
    client = RestClient(url, url, retry=RetryPolicy(attempts=2, base_delay=0.01, jitter=0))
    with pytest.raises(RetryableServerError, match="no worker") as info:
        client.ping()
    assert info.value.status == 503
    assert len(script.seen) == 2


def test_never_retries_a_4xx(server: tuple[str, Script]) -> None:
    url, script = server
    script.answers = [(400, {"code": 400, "type": "InvalidImage", "message": "not an image"}, {})]
    client = RestClient(url, url, retry=FAST)
    with pytest.raises(RequestRejected) as info:
        client.predict(b"garbage")
    assert (info.value.status, info.value.error_type, info.value.message) == (
        400,
        "InvalidImage",
        "not an image",
    )
    assert len(script.seen) == 1


def test_token_refusal_is_an_auth_error_naming_the_key_source(server: tuple[str, Script]) -> None:
    url, script = server
    message = "Token Authorization failed. Token either incorrect, expired, or not provided"
    script.answers = [(400, {"code": 400, "type": "InvalidKeyException", "message": message}, {})]
    client = RestClient(url, url, management_token="wrong", retry=FAST)
    with pytest.raises(AuthError) as info:
        client.list_models()
    text = str(info.value)
    assert "management" in text and "key_file.json" in text and "SEGSERVE_MANAGEMENT_TOKEN" in text
    assert len(script.seen) == 1


def test_the_image_is_the_raw_body_and_the_output_a_header(server: tuple[str, Script]) -> None:
    url, script = server
    script.answers = [(200, {"ok": True}, {})]
    pred = RestClient(url, url, retry=FAST).predict(b"\x89PNG...", output="json")
    assert pred.output == "json" and pred.json() == {"ok": True}
    assert script.seen[0]["Content-Type"] == "application/octet-stream"
    assert script.seen[0]["X-Segserve-Output"] == "json"
    assert script.bodies == [b"\x89PNG..."]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_down_names_url_and_make_serve() -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(ServerUnavailable) as info:
        RestClient(url, url, retry=FAST).ping()
    assert url in str(info.value) and "make serve" in str(info.value)
    assert info.value.reason == "connection refused"


def test_delays_double_and_cap() -> None:
    policy = RetryPolicy(attempts=6, base_delay=0.5, max_delay=3.0, jitter=0.0)
    assert list(policy.delays()) == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_jitter_only_shortens_within_bounds() -> None:
    policy = RetryPolicy(attempts=50, base_delay=1.0, max_delay=1.0, jitter=0.5)
    delays = list(policy.delays(random.Random(0)))
    assert len(delays) == 49 and all(0.5 <= d <= 1.0 for d in delays)
    assert len(set(delays)) > 40  # really random, not constant


def test_retry_after_lengthens_pause_up_to_cap() -> None:
    calls, sleeps = [], []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise RetryableServerError(503, "busy", retry_after=10.0)
        return "ok"

    policy = RetryPolicy(attempts=3, base_delay=0.1, max_delay=2.0, jitter=0.0)
    assert call_with_retry(flaky, policy, sleep=sleeps.append) == "ok"
    assert sleeps == [2.0, 2.0]


def test_non_retryable_error_is_raised_at_once() -> None:
    sleeps: list[float] = []

    def broken() -> None:
        raise ClientError("bad")

    with pytest.raises(ClientError, match="bad"):
        call_with_retry(broken, FAST, sleep=sleeps.append)
    assert sleeps == []


@pytest.mark.parametrize("kwargs", [{"attempts": 0}, {"base_delay": -1}, {"jitter": 1.5}])
def test_policy_rejects_bad_values(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)


WORKER_DIED = {"code": 507, "type": "InternalServerException", "message": "Worker died."}
OK_PING = (200, {"status": "Healthy"}, {})


def test_a_killed_workers_request_is_retried_once_and_counted(server: tuple[str, Script]) -> None:
    """507 "Worker died." (TorchServe's answer to a SIGKILLed worker's batch) is retried."""
    url, script = server
    script.answers = [(507, WORKER_DIED, {}), OK_PING]
    seen: list[tuple[int, str, bool]] = []
    client = RestClient(
        url, url, retry=FAST, on_retry=lambda a, e, d: seen.append((a, type(e).__name__, e.killed))
    )
    assert client.ping() == "Healthy"
    assert len(script.seen) == 2 and seen == [(1, "WorkerDied", True)]


def test_worker_deaths_are_retried_at_most_worker_died_retries_times(
    server: tuple[str, Script],
) -> None:
    url, script = server
    script.answers = [(507, WORKER_DIED, {})]
    policy = RetryPolicy(attempts=5, base_delay=0.01, jitter=0.0, worker_died_retries=1)
    with pytest.raises(WorkerDied) as info:
        RestClient(url, url, retry=policy).ping()
    # Two dead workers in a row: the request may be their cause; it is not sent a third time.
    assert (info.value.status, info.value.killed, len(script.seen)) == (507, True, 2)


def test_a_timed_out_worker_is_not_retried(server: tuple[str, Script]) -> None:
    """500 "Worker died." is responseTimeout: retrying would kill the next worker too."""
    url, script = server
    script.answers = [(500, {**WORKER_DIED, "code": 500}, {}), OK_PING]
    with pytest.raises(WorkerDied) as info:
        RestClient(url, url, retry=FAST).ping()
    assert (info.value.status, info.value.killed, info.value.retryable) == (500, False, False)
    assert len(script.seen) == 1


def test_worker_died_only_policy_still_counts_503s(server: tuple[str, Script]) -> None:
    url, script = server
    script.answers = [(503, {"message": "busy"}, {}), OK_PING]
    with pytest.raises(RetryableServerError):
        RestClient(url, url, retry=WORKER_DIED_ONLY).ping()
    assert len(script.seen) == 1
    script.seen.clear()
    script.answers = [(507, WORKER_DIED, {}), OK_PING]
    assert RestClient(url, url, retry=WORKER_DIED_ONLY).ping() == "Healthy"
    assert len(script.seen) == 2


def test_policy_rejects_negative_worker_died_retries() -> None:
    with pytest.raises(ValueError, match="worker_died_retries"):
        RetryPolicy(worker_died_retries=-1)

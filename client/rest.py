"""REST client for segserve's TorchServe: predictions, health, and the management API.

Each method maps HTTP failures to the typed errors of :mod:`client.errors`, and retries the
retryable ones (connection refused, 502/503/504, and a 507 "Worker died." -- the worker was
killed under the request -- a bounded number of times) with backoff. Every call here is idempotent
(a prediction has no side effect), so retrying is safe. Sessions are per thread, so one client
can be shared by a thread pool.

Example:
    >>> client = RestClient("http://127.0.0.1:8080", token=None)  # doctest: +SKIP
    >>> client.ping()                                              # doctest: +SKIP
    'Healthy'
    >>> client.predict(Path("cat.jpg").read_bytes()).mask().shape  # doctest: +SKIP
    (480, 640)
"""

from __future__ import annotations

import json
import threading
from typing import Any

import requests

from client.errors import (
    WORKER_DIED_MESSAGE,
    AuthError,
    ClientError,
    RequestRejected,
    RetryableServerError,
    ServerError,
    ServerUnavailable,
    WorkerDied,
)
from client.outputs import OUTPUT_HEADER, Prediction, check_output
from client.retry import RetryCallback, RetryPolicy, call_with_retry
from client.tokens import bearer
from serving.properties import DEFAULT_MODEL_NAME, INFERENCE_PORT, MANAGEMENT_PORT

DEFAULT_INFERENCE_URL = f"http://127.0.0.1:{INFERENCE_PORT}"
DEFAULT_MANAGEMENT_URL = f"http://127.0.0.1:{MANAGEMENT_PORT}"
RETRYABLE_STATUS = (502, 503, 504)
# TorchServe's "Worker died." statuses: 507 the worker was SIGKILLed (retried: the request was a
# bystander), 500 it passed responseTimeout or crashed (not retried: it may be the cause).
WORKER_KILLED_STATUS = 507
# TorchServe answers a bad/missing token with this text (HTTP 400, InvalidKeyException).
TOKEN_REFUSED = "Token Authori"


def error_from_response(resp: requests.Response, kind: str) -> ClientError:
    """The typed error for a non-2xx answer; ``kind`` is the token kind the call used."""
    body = _error_body(resp)
    message = str(body.get("message") or resp.reason or "")
    url = resp.url
    if resp.status_code in (400, 401, 403) and (
        TOKEN_REFUSED in message or resp.status_code == 401
    ):
        return AuthError(url.split("?")[0], kind, message)
    if resp.status_code in RETRYABLE_STATUS:
        return RetryableServerError(resp.status_code, message, url, _retry_after(resp))
    if resp.status_code in (500, WORKER_KILLED_STATUS) and message.startswith(
        WORKER_DIED_MESSAGE.rstrip(".")
    ):
        killed = resp.status_code == WORKER_KILLED_STATUS
        return WorkerDied(resp.status_code, message, url, killed=killed)
    if 400 <= resp.status_code < 500:
        return RequestRejected(resp.status_code, str(body.get("type", "")), message, url)
    return ServerError(resp.status_code, message, url)


def _error_body(resp: requests.Response) -> dict[str, Any]:
    """TorchServe and the handler send ``{"code","type","message"}``; tolerate anything else."""
    try:
        body = resp.json()
    except (ValueError, json.JSONDecodeError):
        return {"message": resp.text[:500]}
    return body if isinstance(body, dict) else {"message": str(body)[:500]}


def _retry_after(resp: requests.Response) -> float | None:
    try:
        return float(resp.headers.get("Retry-After", ""))
    except ValueError:
        return None


def raw_body_request(image: bytes, output: str) -> dict[str, Any]:
    """The ``requests`` keyword arguments of a prediction: the image as the raw body, the
    output format in :data:`client.outputs.OUTPUT_HEADER` (what the client and the Locust
    users send; see :meth:`RestClient.predict` for why not multipart).

    >>> raw_body_request(b"img", "mask")["headers"]
    {'Content-Type': 'application/octet-stream', 'X-Segserve-Output': 'mask'}
    """
    return {
        "data": image,
        "headers": {"Content-Type": "application/octet-stream", OUTPUT_HEADER: output},
    }


class RestClient:
    """Talks to TorchServe's inference (8080) and management (8081) REST APIs."""

    def __init__(
        self,
        inference_url: str = DEFAULT_INFERENCE_URL,
        management_url: str = DEFAULT_MANAGEMENT_URL,
        model_name: str = DEFAULT_MODEL_NAME,
        token: str | None = None,
        management_token: str | None = None,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        on_retry: RetryCallback | None = None,
    ) -> None:
        """``on_retry(attempt, error, delay)`` is called before each retry (to count them)."""
        self.inference_url = inference_url.rstrip("/")
        self.management_url = management_url.rstrip("/")
        self.model_name = model_name
        self.token = token
        self.management_token = management_token
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.on_retry = on_retry
        self._local = threading.local()

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        return session

    def _call(self, method: str, url: str, kind: str, **kwargs: Any) -> requests.Response:
        token = self.management_token if kind == "management" else self.token
        headers = {**kwargs.pop("headers", {}), **bearer(token)}

        def once() -> requests.Response:
            try:
                resp = self._session().request(
                    method, url, headers=headers, timeout=self.timeout, **kwargs
                )
            except requests.ConnectionError as exc:
                raise ServerUnavailable(url, _reason(exc)) from None
            except requests.Timeout:
                raise ClientError(
                    f"{method} {url} timed out after {self.timeout:g}s; the server may be "
                    "overloaded: raise --timeout or lower --concurrency"
                ) from None
            if resp.status_code >= 400:
                raise error_from_response(resp, kind)
            return resp

        return call_with_retry(once, self.retry, on_retry=self.on_retry)

    def ping(self) -> str:
        """TorchServe's health status (``"Healthy"``); raises ServerUnavailable when down."""
        resp = self._call("GET", f"{self.inference_url}/ping", "inference")
        return str(resp.json().get("status", ""))

    def predict(
        self, image: bytes, output: str = "mask", model_version: str | None = None
    ) -> Prediction:
        """Segment one encoded image (PNG/JPEG bytes) and return the answer in ``output`` form.

        The image travels as the raw request body and the output format in the
        ``X-Segserve-Output`` header (TorchServe drops query strings before they reach the
        handler). Not multipart: the frontend's form decoder spools every part above 16 KB to
        a temporary file, which cost 20 % of the served throughput on a 2-core machine
        (docs/performance.md); the handler still accepts multipart from other clients.
        """
        check_output(output)
        url = f"{self.inference_url}/predictions/{self.model_name}"
        if model_version:
            url += f"/{model_version}"
        resp = self._call("POST", url, "inference", **raw_body_request(image, output))
        return Prediction(resp.content, output, resp.headers.get("Content-Type", ""))

    def list_models(self) -> list[dict[str, Any]]:
        """``[{"modelName": ..., "modelUrl": ...}, ...]`` from the management API."""
        resp = self._call("GET", f"{self.management_url}/models", "management")
        return list(resp.json().get("models", []))

    def describe_model(
        self, model_name: str | None = None, model_version: str | None = None
    ) -> list[dict[str, Any]]:
        """Describe a model: versions, batch size, workers and their status."""
        url = f"{self.management_url}/models/{model_name or self.model_name}"
        if model_version:
            url += f"/{model_version}"
        return list(self._call("GET", url, "management").json())

    def close(self) -> None:
        session = getattr(self._local, "session", None)
        if session is not None:
            session.close()
            self._local.session = None

    def __enter__(self) -> RestClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _reason(exc: requests.ConnectionError) -> str:
    text = str(exc)
    if "Connection refused" in text or "ConnectionRefused" in text:
        return "connection refused"
    if "Name or service not known" in text or "NameResolution" in text:
        return "unknown host"
    if "timed out" in text.lower():
        return "connection timed out"
    return text.split(": ")[-1][:200] or "connection error"

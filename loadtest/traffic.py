"""Request traffic for the fault runs: one request's :class:`Outcome`, and the loops that send.

* :func:`post_image` posts one image (raw body) and records its :class:`Outcome`; it never
  raises for HTTP trouble (status 0: no answer, -1: a 200 without a PNG mask);
* :class:`TrafficLoop` runs threads that send images back to back until stopped, counting the
  requests in flight;
* :class:`ClientSender` is a ``TrafficLoop`` request that goes through the segserve client
  (REST or gRPC, with retries) and keeps the failures its retries absorbed.

Example:
    >>> Outcome(0.0, 0.1, 200).ok, Outcome(0.0, 0.1, 507, "Worker died.").ok
    (True, False)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import requests

from loadtest.errors import ChaosError
from serving.properties import DEFAULT_MODEL_NAME


@dataclass(frozen=True)
class Outcome:
    """One request: monotonic start/end, HTTP status (0: no answer), short error text."""

    start: float
    end: float
    status: int
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200


def post_image(
    info: Any,
    image: bytes,
    model: str = DEFAULT_MODEL_NAME,
    headers: dict[str, str] | None = None,
    timeout: float = 60.0,
    session: requests.Session | None = None,
) -> Outcome:
    """POST one image (raw body) and record what happened; never raises for HTTP trouble."""
    url = f"{info.inference_url}/predictions/{model}"
    headers = {"Authorization": f"Bearer {info.inference_key}", **(headers or {})}
    start = time.monotonic()
    try:
        resp = (session or requests).post(url, data=image, headers=headers, timeout=timeout)
    except requests.RequestException as exc:
        return Outcome(start, time.monotonic(), 0, type(exc).__name__)
    error = "" if resp.status_code == 200 else resp.text[:300]
    if resp.status_code == 200 and not resp.content.startswith(b"\x89PNG"):
        return Outcome(start, time.monotonic(), -1, "200 without a PNG mask")
    return Outcome(start, time.monotonic(), resp.status_code, error)


class TrafficLoop:
    """``concurrency`` threads posting images back to back until :meth:`stop`.

    Example:
        >>> loop = TrafficLoop(info, images, concurrency=4).start()  # doctest: +SKIP
        >>> time.sleep(5); outcomes = loop.stop()                   # doctest: +SKIP
    """

    def __init__(
        self,
        info: Any,
        images: Sequence[bytes],
        concurrency: int = 4,
        model: str = DEFAULT_MODEL_NAME,
        timeout: float = 60.0,
        request: Callable[..., Outcome] = post_image,
    ) -> None:
        if not images:
            raise ValueError("TrafficLoop needs at least one image")
        self.info, self.images, self.model = info, list(images), model
        self.concurrency, self.timeout, self.request = concurrency, timeout, request
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._outcomes: list[Outcome] = []
        self._in_flight = 0
        self._threads: list[threading.Thread] = []

    def _run(self, index: int) -> None:
        session = requests.Session()
        n = index
        while not self._stop.is_set():
            image = self.images[n % len(self.images)]
            n += self.concurrency
            with self._lock:
                self._in_flight += 1
            try:
                outcome = self.request(
                    self.info, image, self.model, timeout=self.timeout, session=session
                )
            finally:
                with self._lock:
                    self._in_flight -= 1
            with self._lock:
                self._outcomes.append(outcome)
        session.close()

    def start(self) -> TrafficLoop:
        for i in range(self.concurrency):
            thread = threading.Thread(target=self._run, args=(i,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    def outcomes(self) -> list[Outcome]:
        with self._lock:
            return list(self._outcomes)

    def stop(self, timeout: float | None = None) -> list[Outcome]:
        """Stop sending; wait for the requests in flight (each bounded by its own timeout)."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout if timeout is not None else self.timeout + 5)
        if any(t.is_alive() for t in self._threads):
            raise ChaosError("requests still hanging after their timeout: the server hangs")
        return self.outcomes()


class ClientSender:
    """A :class:`TrafficLoop` ``request`` that goes through the segserve client (REST or gRPC)
    with a retry policy, and counts the raw failures its retries absorbed.

    ``retried`` lists one ``"<Error>: <message>"`` per retried attempt: what the user would
    have seen without the client's retries.

    Example:
        >>> sender = ClientSender(info, "grpc", RetryPolicy(attempts=3))     # doctest: +SKIP
        >>> TrafficLoop(info, images, 2, request=sender).start()            # doctest: +SKIP
    """

    def __init__(self, info: Any, protocol: str, policy: Any, model: str = DEFAULT_MODEL_NAME,
                 timeout: float = 60.0) -> None:  # fmt: skip
        from client.grpc_client import GrpcClient
        from client.rest import RestClient

        if protocol not in ("rest", "grpc"):
            raise ValueError(f"protocol must be 'rest' or 'grpc', got {protocol!r}")
        self.protocol = protocol
        self.retried: list[str] = []
        self._lock = threading.Lock()
        common = {"model_name": model, "token": info.inference_key, "timeout": timeout}
        if protocol == "rest":
            self.client: Any = RestClient(
                info.inference_url, retry=policy, on_retry=self._count, **common
            )
        else:
            self.client = GrpcClient(
                info.grpc_inference_target, retry=policy, on_retry=self._count, **common
            )

    def _count(self, attempt: int, error: Exception, delay: float) -> None:
        with self._lock:
            self.retried.append(f"{type(error).__name__}: {str(error)[:100]}")

    def __call__(self, info: Any, image: bytes, model: str, **_: Any) -> Outcome:
        from client.errors import ClientError

        start = time.monotonic()
        try:
            content = self.client.predict(image).content
        except ClientError as exc:
            status = int(getattr(exc, "status", 0))
            return Outcome(start, time.monotonic(), status, f"{type(exc).__name__}: {exc}"[:300])
        if not content.startswith(b"\x89PNG"):
            return Outcome(start, time.monotonic(), -1, "200 without a PNG mask")
        return Outcome(start, time.monotonic(), 200)

    def close(self) -> None:
        self.client.close()

"""Fault scenarios against a real TorchServe: kill a worker, overload the queue, time a model out.

``python -m loadtest.chaos --export-dir runs/default/export`` (``make chaos``) builds fault
archives from an export, starts one TorchServe per scenario on free ports, runs

* **worker_kill**: a bounded threaded request loop; SIGKILL the worker mid-run. Checks that the
  failed requests are no more than those in flight at the kill, and measures the seconds to the
  first success sent after the kill and to steady throughput again. Beside it, REST and gRPC
  loops through the segserve client (which retries a killed worker's requests) must see no
  failure: the report gives the raw failures and those left after the client's retries;
* **overload**: ``job_queue_size`` small, a slow request holds the worker, a burst beyond the
  queue. Checks that the excess gets 503s *before* any accepted request completes (refused at
  once, not queued), that accepted requests succeed, and that a client retrying with backoff
  turns every 503 into a success;
* **timeout**: one request slower than the archive's ``responseTimeout``. Checks that it fails
  with a 5xx in bounded time, that TorchServe restarts the worker and that it serves again;
* **hostile_traffic** (:mod:`loadtest.hostile`): Locust's REST + gRPC users while a stream of
  hostile requests (odd text in every field and header, a 70000 px wide overlay_jpeg, random
  bytes, a PNG bomb) cycles. Checks 0 good-request failures, 0 worker restarts and that every
  hostile answer is a 2xx or 4xx; measures the good requests' p95;

then prints a report (requests, failures, in-flight bound, recovery seconds) and writes it to
``--out``. Exit status 0 when every check holds, 1 otherwise, 2 when the run could not start.

The slowness is injected by a handler subclass packed into the fault archives
(`loadtest/fault_handler.py`): it sleeps for the seconds in the request header
``X-Segserve-Fault-Sleep`` before the normal handler runs. Production archives never contain it.

Example:
    >>> outcomes = [Outcome(0.0, 0.1, 200), Outcome(0.5, 0.6, 200), Outcome(1.0, 1.2, 503)]
    >>> summarize(outcomes)["failed"], summarize(outcomes)["statuses"]
    (1, {'200': 2, '503': 1})
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import signal
import sys
import tempfile
import threading
import time
import zipfile
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import requests

FAULT_HEADER = "X-Segserve-Fault-Sleep"
FAULT_ENTRY_POINT = "fault_handler.py"
# The fault-injecting handler packed into fault archives (a real, linted module).
FAULT_HANDLER_FILE = Path(__file__).resolve().with_name("fault_handler.py")
REPO = Path(__file__).resolve().parent.parent
RESULTS = Path("loadtest/results")


class ChaosError(RuntimeError):
    """A scenario could not be set up (no export, server did not start); the message says why."""


# --- archives and configs -----------------------------------------------------------------


def add_fault_handler(mar: Path) -> Path:
    """Rewrite ``mar`` in place so that TorchServe loads ``loadtest/fault_handler.py``."""
    buf = io.BytesIO()
    with zipfile.ZipFile(mar) as src, zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename == "MAR-INF/MANIFEST.json":
                manifest = json.loads(data)
                manifest["model"]["handler"] = FAULT_ENTRY_POINT
                data = json.dumps(manifest, indent=2).encode()
            dst.writestr(item, data)
        dst.writestr(FAULT_ENTRY_POINT, FAULT_HANDLER_FILE.read_bytes())
    tmp = mar.with_suffix(".mar.tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, mar)
    return mar


def build_fault_archive(export_dir: Path, store: Path, **options: Any) -> Path:
    """``store/<model_name>.mar`` from ``export_dir`` with the fault handler; ``options`` are
    :class:`serving.archive.ArchiveOptions` fields (batch_size, response_timeout_s, ...)."""
    from serving.archive import ArchiveError, ArchiveOptions, build_archive

    try:
        mar = build_archive(export_dir, store, ArchiveOptions(**options))
    except ArchiveError as exc:
        raise ChaosError(str(exc)) from None
    return add_fault_handler(mar)


def write_server_config(out: Path, overrides: dict[str, str], base: Path | None = None) -> Path:
    """A copy of ``base`` (the repo's config.properties) with ``overrides``, paths made absolute.

    Example:
        >>> path = write_server_config(Path(tempfile.mkdtemp()) / "c.properties",
        ...                            {"job_queue_size": "2"})
        >>> "job_queue_size=2" in path.read_text()
        True
    """
    from serving.properties import read_properties
    from serving.server import runtime_properties, write_properties

    base = Path(base or REPO / "config.properties").resolve()
    props = runtime_properties(read_properties(base), base.parent, None, None)
    props.update({k: str(v) for k, v in overrides.items()})
    out.parent.mkdir(parents=True, exist_ok=True)
    return write_properties(props, out)


def worker_pids(info: Any, model: str = "segmenter") -> list[int]:
    """Pids of the model's workers, from the management API's describe output."""
    resp = requests.get(
        f"{info.management_url}/models/{model}",
        headers={"Authorization": f"Bearer {info.management_key}"},
        timeout=10,
    )
    resp.raise_for_status()
    return [int(w["pid"]) for v in resp.json() for w in v.get("workers", []) if w.get("pid")]


def wait_workers_ready(info: Any, model: str = "segmenter", timeout_s: float = 120) -> list[int]:
    """Pids once every worker of ``model`` is READY (raises ChaosError after ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    headers = {"Authorization": f"Bearer {info.management_key}"}
    while time.monotonic() < deadline:
        try:
            described = requests.get(
                f"{info.management_url}/models/{model}", headers=headers, timeout=10
            ).json()
            workers = [w for v in described for w in v.get("workers", [])]
        except (requests.RequestException, ValueError, TypeError):
            workers = []
        if workers and all(w.get("status") == "READY" for w in workers):
            return [int(w["pid"]) for w in workers]
        time.sleep(0.25)
    raise ChaosError(f"workers of {model} not READY after {timeout_s:.0f} s")


# --- traffic ------------------------------------------------------------------------------


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
    model: str = "segmenter",
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
        model: str = "segmenter",
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

    def __init__(self, info: Any, protocol: str, policy: Any, model: str = "segmenter",
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


def client_figures(sender: ClientSender, outcomes: Sequence[Outcome]) -> dict[str, Any]:
    """What the user of the client saw (``failed``) and what its retries absorbed."""
    return {
        "requests": len(outcomes),
        "failed": sum(not o.ok for o in outcomes),
        "retried": len(sender.retried),
        "retried_errors": sorted(set(sender.retried)),
        "failure_messages": sorted({o.error[:120] for o in outcomes if not o.ok}),
    }


# --- figures (pure) -----------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of ``values``; 0.0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100.0 * len(ordered) + 0.5)))
    return float(ordered[rank - 1])


def summarize(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    """Request count, failures, statuses and latency percentiles (ms) of successful requests."""
    latencies = [1000.0 * (o.end - o.start) for o in outcomes if o.ok]
    statuses = Counter(str(o.status) for o in outcomes)
    return {
        "requests": len(outcomes),
        "ok": sum(o.ok for o in outcomes),
        "failed": sum(not o.ok for o in outcomes),
        "statuses": dict(sorted(statuses.items())),
        "p50_ms": round(percentile(latencies, 50), 1),
        "p95_ms": round(percentile(latencies, 95), 1),
    }


def success_rate(outcomes: Sequence[Outcome], t0: float, t1: float) -> float:
    """Successful completions per second in ``[t0, t1)``."""
    if t1 <= t0:
        return 0.0
    return sum(1 for o in outcomes if o.ok and t0 <= o.end < t1) / (t1 - t0)


def recovery_figures(
    outcomes: Sequence[Outcome], t_event: float, window_s: float = 2.0, fraction: float = 0.8
) -> dict[str, float | None]:
    """How traffic came back after a fault at ``t_event`` (monotonic seconds).

    * ``first_success_s``: from the event to the completion of the first successful request
      *sent after* it (a request sent before may have been answered by the dying worker);
    * ``steady_s``: from the event to the start of the first ``window_s`` window whose
      success rate is at least ``fraction`` of the rate before the event (so it may lead the
      real return by up to ``window_s * (1 - fraction)``);
    * ``baseline_rps``: successes per second before the event.

    Example:
        >>> before = [Outcome(t / 10, t / 10 + 0.1, 200) for t in range(100)]    # 10/s to t=10
        >>> after = [Outcome(13 + t / 10, 13.1 + t / 10, 200) for t in range(50)]
        >>> recovery_figures(before + after, t_event=10.0)
        {'baseline_rps': 10.0, 'first_success_s': 3.1, 'steady_s': 2.7}
    """
    first_start = min((o.start for o in outcomes), default=t_event)
    baseline = success_rate(outcomes, first_start + 0.1 * (t_event - first_start), t_event)
    after = [o.end for o in outcomes if o.ok and o.start >= t_event]
    first = round(min(after) - t_event, 2) if after else None
    steady = None
    last_end = max((o.end for o in outcomes), default=t_event)
    t = t_event
    while t + window_s <= last_end + 1e-9 and baseline > 0:
        if success_rate(outcomes, t, t + window_s) >= fraction * baseline:
            steady = round(t - t_event, 2)
            break
        t += 0.1
    return {"baseline_rps": round(baseline, 2), "first_success_s": first, "steady_s": steady}


def in_flight_at(outcomes: Sequence[Outcome], t: float) -> int:
    """Requests started before ``t`` and not finished at ``t``."""
    return sum(1 for o in outcomes if o.start <= t < o.end)


# --- scenarios ----------------------------------------------------------------------------


@dataclass
class ScenarioResult:
    """Figures of one scenario and the checks it passed or failed (name → ok)."""

    name: str
    figures: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, bool] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(self.checks.values())


def worker_kill(
    info: Any,
    images: Sequence[bytes],
    batch_size: int,
    concurrency: int = 8,
    warmup_s: float = 4.0,
    after_s: float = 12.0,
    model: str = "segmenter",
    client_concurrency: int = 2,
    client_policy: Any = None,
) -> ScenarioResult:
    """SIGKILL the (single) worker under request loops; bound the failures, time recovery.

    Two kinds of traffic run together: a raw loop (``concurrency`` threads, plain requests,
    no retry) whose failures are bounded and whose recovery is timed, and, per protocol,
    ``client_concurrency`` threads through the segserve client with ``client_policy``, which
    retries the killed batch's requests: its users must see no failure at all.
    """
    from client.retry import RetryPolicy

    old_pids = wait_workers_ready(info, model)
    policy = client_policy or RetryPolicy(attempts=4, base_delay=0.2, max_delay=2.0)
    protocols = ("rest", "grpc") if client_concurrency else ()
    senders = [ClientSender(info, p, policy, model) for p in protocols]
    client_loops = [
        TrafficLoop(info, images, client_concurrency, model, request=sender).start()
        for sender in senders
    ]
    loop = TrafficLoop(info, images, concurrency, model).start()
    time.sleep(warmup_s)
    in_flight = loop.in_flight()
    t_kill = time.monotonic()
    for pid in old_pids:
        os.kill(pid, signal.SIGKILL)
    time.sleep(after_s)
    new_pids = wait_workers_ready(info, model)
    outcomes = loop.stop()
    client = {
        s.protocol: client_figures(s, cl.stop())
        for s, cl in zip(senders, client_loops, strict=True)
    }
    for sender in senders:
        sender.close()
    failed = [o for o in outcomes if not o.ok]
    # The dead worker held at most one batch: its requests fail, the queue's wait and succeed.
    # (A request sent a few ms after the SIGKILL may still join that batch before the frontend
    # notices, so the bound is the batch, not "sent before the kill".)
    bound = batch_size * len(old_pids)
    recovery = recovery_figures(outcomes, t_kill)
    back = t_kill + recovery["first_success_s"] if recovery["first_success_s"] else float("inf")
    client_retried = sum(c["retried"] for c in client.values())
    figures = {
        **summarize(outcomes),
        "concurrency": concurrency,
        "killed_pids": old_pids,
        "new_pids": new_pids,
        "in_flight_at_kill": in_flight,
        "failure_bound": bound,
        "failures_sent_after_kill": sum(1 for o in failed if o.start >= t_kill),
        "failure_messages": sorted({o.error[:120] for o in failed}),
        **recovery,
        # Raw: requests that failed on the wire (the raw loop's, the client's retried attempts);
        # after retries: what the client's users saw.
        "raw_failures": len(failed) + client_retried,
        "failures_after_client_retries": sum(c["failed"] for c in client.values()),
        **{f"client_{protocol}": c for protocol, c in client.items()},
    }
    checks = {
        "worker restarted (new pid)": bool(new_pids) and not set(new_pids) & set(old_pids),
        "failures <= one batch of the killed worker": len(failed) <= bound,
        "failures <= requests in flight at the kill": len(failed) <= max(in_flight, 1),
        "no failure after the new worker answered": all(o.end <= back for o in failed),
        "a request sent after the kill succeeded": figures["first_success_s"] is not None,
        "throughput back to steady state": figures["steady_s"] is not None,
    }
    if client:
        checks["0 failures through the client's retries (REST + gRPC)"] = figures[
            "failures_after_client_retries"
        ] == 0 and all(c["requests"] > 0 for c in client.values())
    return ScenarioResult("worker_kill", figures, checks)


def overload(
    info: Any,
    images: Sequence[bytes],
    queue_size: int,
    burst: int = 12,
    hold_s: float = 2.0,
    retry_clients: int = 6,
    model: str = "segmenter",
) -> ScenarioResult:
    """A burst beyond ``job_queue_size`` while a slow request holds the worker."""
    from client.errors import ClientError
    from client.rest import RestClient
    from client.retry import RetryPolicy

    wait_workers_ready(info, model)
    # Every request of the burst is slow, so the queue is still full while the excess arrives.
    slow = {FAULT_HEADER: str(hold_s)}
    with ThreadPoolExecutor(burst) as pool:
        outcomes = list(
            pool.map(lambda i: post_image(info, images[i % len(images)], model, slow), range(burst))
        )
    accepted = [o for o in outcomes if o.ok]
    refused = [o for o in outcomes if o.status == 503]
    first_done = min((o.end for o in accepted), default=float("inf"))
    # Clients that retry with backoff: a 503 is "busy", not "broken".
    policy = RetryPolicy(attempts=12, base_delay=0.25, max_delay=2.0, jitter=0.5)
    retried: list[str] = []

    def with_retry(i: int) -> str:
        client = RestClient(
            info.inference_url, model_name=model, token=info.inference_key, retry=policy
        )
        try:
            return "ok" if client.predict(images[i % len(images)]).content else "empty"
        except ClientError as exc:
            return f"{type(exc).__name__}: {str(exc)[:100]}"
        finally:
            client.close()

    with ThreadPoolExecutor(retry_clients) as pool:
        retried = list(pool.map(with_retry, range(retry_clients)))
    figures = {
        **summarize(outcomes),
        "queue_size": queue_size,
        "burst": burst,
        "refused_503": len(refused),
        "max_503_latency_ms": round(1000 * max((o.end - o.start for o in refused), default=0), 1),
        "first_accepted_done_ms": round(1000 * (first_done - min(o.start for o in outcomes)), 1),
        "retrying_clients": retry_clients,
        "retrying_clients_ok": retried.count("ok"),
        "retry_errors": [r for r in retried if r != "ok"],
    }
    checks = {
        "excess refused with 503": len(refused) > 0,
        "only 200 or 503": len(accepted) + len(refused) == len(outcomes),
        "503s answered before any accepted request completed": all(
            o.end < first_done for o in refused
        ),
        "accepted requests completed": len(accepted) >= 1,
        "retry with backoff turned every 503 into a success": retried.count("ok") == retry_clients,
    }
    return ScenarioResult("overload", figures, checks)


def response_timeout(
    info: Any,
    images: Sequence[bytes],
    timeout_s: int,
    sleep_s: float,
    model: str = "segmenter",
) -> ScenarioResult:
    """One request slower than ``responseTimeout``: a bounded 5xx, a new worker, service again."""
    old_pids = wait_workers_ready(info, model)
    slow = post_image(info, images[0], model, {FAULT_HEADER: str(sleep_s)}, timeout=sleep_s + 60)
    # Right after the 5xx the management API may still list the dying worker as READY: wait
    # (bounded) for the replacement, so "no restart" is a finding, not a race.
    deadline = time.monotonic() + 60
    new_pids = wait_workers_ready(info, model)
    while set(new_pids) & set(old_pids) and time.monotonic() < deadline:
        time.sleep(0.25)
        new_pids = wait_workers_ready(info, model)
    t_ready = time.monotonic()
    after = [post_image(info, image, model) for image in images[:3]]
    figures = {
        "response_timeout_s": timeout_s,
        "handler_sleep_s": sleep_s,
        "slow_status": slow.status,
        "slow_message": slow.error[:200],
        "slow_seconds": round(slow.end - slow.start, 2),
        "old_pids": old_pids,
        "new_pids": new_pids,
        "worker_back_s": round(t_ready - slow.end, 2),
        "after_statuses": [o.status for o in after],
    }
    checks = {
        "slow request failed with a 5xx": 500 <= slow.status < 600,
        "failed before the handler would have finished": slow.end - slow.start < sleep_s,
        "worker restarted (new pid)": not set(new_pids) & set(old_pids),
        "serves again after the restart": all(o.ok for o in after),
    }
    return ScenarioResult("timeout", figures, checks)


# --- the scripted run (make chaos) -----------------------------------------------------------


def _start_server(export_dir: Path, work: Path, name: str, config: dict[str, str], **options):
    from serving.server import Ports, ServerError, start

    store = work / name / "store"
    build_fault_archive(export_dir, store, **options)
    conf = write_server_config(work / name / "config.properties", config)
    try:
        return start(conf, store, work / name / "server", Ports.free(), timeout_s=240)
    except ServerError as exc:
        raise ChaosError(f"{name}: TorchServe did not start: {exc}") from None


def run_all(
    export_dir: Path,
    work: Path,
    images: Sequence[bytes],
    kill_after_s: float = 12.0,
    hostile_s: float = 30.0,
    out: Path | None = None,
):
    """Run the four scenarios, each on its own fresh TorchServe; returns their results.

    ``out`` keeps the hostile scenario's Locust CSVs (default: under ``work``, deleted).
    """
    from loadtest import hostile
    from serving.server import stop

    bad = hostile.rest_requests(images[0]) + hostile.grpc_requests(images[0])
    locust_dir = (out or work) / "hostile_traffic"

    plans: list[tuple[str, dict, dict, Callable[[Any], ScenarioResult]]] = [
        (
            "worker_kill",
            {},
            {"batch_size": 4, "max_batch_delay_ms": 20},
            lambda info: worker_kill(info, images, batch_size=4, after_s=kill_after_s),
        ),
        (
            "overload",
            {"job_queue_size": "2"},
            {"batch_size": 1, "max_batch_delay_ms": 1},
            lambda info: overload(info, images, queue_size=2),
        ),
        (
            "timeout",
            {},
            {"batch_size": 1, "max_batch_delay_ms": 1, "response_timeout_s": 2},
            lambda info: response_timeout(info, images, timeout_s=2, sleep_s=8.0),
        ),
        (
            "hostile_traffic",
            {},
            {"batch_size": 4, "max_batch_delay_ms": 20},
            lambda info: hostile.hostile_traffic(
                info, bad, duration_s=hostile_s, users=4, out_dir=locust_dir
            ),
        ),
    ]
    results = []
    for name, config, options, scenario in plans:
        info = _start_server(export_dir, work, name, config, **options)
        try:
            results.append(scenario(info))
        finally:
            stop(info.workdir)
    return results


def report_markdown(results: Sequence[ScenarioResult]) -> str:
    """The human report: one section per scenario, figures then checks."""
    lines = ["# segserve chaos report", ""]
    for result in results:
        lines += [f"## {result.name}: {'PASS' if result.passed else 'FAIL'}", ""]
        lines += [f"- {k}: {json.dumps(v)}" for k, v in result.figures.items()]
        lines.append("")
        lines += [f"- [{'x' if ok else ' '}] {check}" for check, ok in result.checks.items()]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.chaos", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--export-dir", type=Path, default=Path("runs/default/export"))
    parser.add_argument(
        "--out", type=Path, default=None, help="default: loadtest/results/chaos-<UTC>"
    )
    parser.add_argument("--image-size", type=int, default=128, help="synthetic image side, px")
    parser.add_argument(
        "--kill-after", type=float, default=12.0, help="seconds of traffic after the kill"
    )
    parser.add_argument(
        "--hostile-duration", type=float, default=30.0, help="seconds of hostile traffic"
    )
    args = parser.parse_args(argv)
    if not (args.export_dir / "model.pt").is_file():
        print(
            f"error: {args.export_dir}/model.pt not found: run `make train export` first "
            "(or pass --export-dir)",
            file=sys.stderr,
        )
        return 2
    from loadtest.images import load_images

    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or RESULTS / f"chaos-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    images = load_images(None, n=8, size=(args.image_size, args.image_size))
    try:
        with tempfile.TemporaryDirectory(prefix="segserve-chaos-") as work:
            results = run_all(
                args.export_dir.resolve(),
                Path(work),
                images,
                args.kill_after,
                args.hostile_duration,
                out=out,
            )
    except ChaosError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = report_markdown(results)
    (out / "report.md").write_text(text, encoding="utf-8")
    (out / "report.json").write_text(
        json.dumps([asdict(r) | {"passed": r.passed} for r in results], indent=2), encoding="utf-8"
    )
    print(text)
    print(f"report: {out / 'report.md'}")
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

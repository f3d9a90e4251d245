"""Locust users for segserve: REST (HttpUser) and gRPC (a User reporting to Locust's stats).

Run through ``python -m loadtest.run`` (headless, with an SLO report), or directly::

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8080 --grpc-host 127.0.0.1:7070 \
        --rest-weight 1 --grpc-weight 1 --output mask --key-file key_file.json

Custom options (also in Locust's web UI): --grpc-host, --model-name, --rest-weight,
--grpc-weight, --images FOLDER (default: embedded synthetic scenes), --num-images,
--image-size, --output {mask,color,overlay,overlay_jpeg,json}, --key-file, --token,
--request-timeout.
Every request is one image; the stats' request types are ``POST`` (REST) and ``grpc``.

Like the segserve client, a user retries once a request whose worker was killed under it
(HTTP 507 / gRPC RESOURCE_EXHAUSTED "Worker died.": :data:`client.retry.WORKER_DIED_ONLY`),
and nothing else: a 503 or a timed-out worker still counts. The failed attempt is reported
under ``<name>: worker died (retried)`` (a raw failure, which ``loadtest.slo`` reports apart);
the request's own entry then times the whole request, retry included.

Distributed runs (``--processes N``, or ``--master`` + ``--worker`` processes elsewhere): the
master merges the workers' request stats (Locust's own merge of counts and response-time
histograms). This file adds what makes the end of such a run exact and checkable:

* every worker counts its own request attempts by protocol and sends the counts with each of
  Locust's stats reports (``events.report_to_master`` -> ``events.worker_report``);
* when the test stops, the master sends each worker :data:`DRAIN_MESSAGE`; the worker stops its
  users (in-flight requests finish, up to ``--stop-timeout``) and marks its next stats report
  ``final``; the master waits for every worker's final report, so no worker's last requests
  are lost (Locust alone gives them 0.5 s);
* the master (or the single local process) then writes ``<--csv PREFIX>_merged.json``
  (:func:`loadtest.slo.merged_path`): its merged stats entries, unchanged from Locust's
  ``StatsEntry.serialize``, and the worker list with their counts. ``loadtest.slo`` reads it.

Workers take the master's segserve options (``--grpc-host``, ``--output``, ``--token``, ...)
with each spawn message, so ``locust --worker --master-host HOST -f loadtest/locustfile.py`` is
enough on a worker.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import time
from pathlib import Path
from typing import Any

from locust import HttpUser, User, between, events, task
from locust.env import Environment
from locust.runners import STATE_MISSING, WORKER_REPORT_INTERVAL, MasterRunner, WorkerRunner

from client.errors import ClientError, WorkerDied
from client.outputs import OUTPUT_FORMATS
from client.rest import error_from_response, raw_body_request
from client.retry import WORKER_DIED_ONLY
from client.tokens import resolve_token
from loadtest.images import ImageSourceError, load_images
from loadtest.slo import RETRIED_SUFFIX, merged_path, protocol_of
from serving.properties import DEFAULT_MODEL_NAME

GRPC_REQUEST_TYPE = "grpc"
REST_NAME = "predict"
GRPC_NAME = "Predictions"
# Filled once per Locust process by on_init (again on a worker at each test start, with the
# master's options); users only read them.
IMAGES: list[bytes] = []
SETTINGS: dict[str, object] = {}
# The master asks a worker to stop its users and send a final stats report.
DRAIN_MESSAGE = "segserve_drain"
# The key of this file's record in a worker's stats report.
REPORT_KEY = "segserve"
# This process's request attempts {protocol: {"requests": n, "failures": n}} since test start,
# and whether its users are stopped (its next stats report is its last).
COUNTS: dict[str, dict[str, int]] = {}
FINAL = {"final": False}
# On the master: the latest record each worker reported, by Locust client id.
WORKERS: dict[str, dict[str, Any]] = {}


@events.init_command_line_parser.add_listener
def add_options(parser) -> None:  # type: ignore[no-untyped-def]
    group = parser.add_argument_group("segserve")
    group.add_argument("--grpc-host", default="127.0.0.1:7070", help="gRPC inference host:port")
    group.add_argument("--model-name", default=DEFAULT_MODEL_NAME)
    group.add_argument("--rest-weight", type=int, default=1, help="share of REST users (0: none)")
    group.add_argument("--grpc-weight", type=int, default=1, help="share of gRPC users (0: none)")
    group.add_argument("--images", default="", help="folder of images (default: synthetic set)")
    group.add_argument("--num-images", type=int, default=16, help="images in the request pool")
    group.add_argument("--image-size", type=int, default=128, help="synthetic image side, px")
    group.add_argument("--output", default="mask", choices=OUTPUT_FORMATS)
    group.add_argument("--key-file", default="", help="TorchServe key_file.json")
    # is_secret (masked in the web UI) is only accepted by Locust's parser, not by a group.
    parser.add_argument("--token", default="", is_secret=True, help="else $SEGSERVE_TOKEN")
    group.add_argument("--request-timeout", type=float, default=30.0, help="seconds per call")


@events.init.add_listener
def on_init(environment: Environment, **_: object) -> None:
    opts = environment.parsed_options
    if opts is None:  # used as a library without Locust's CLI: nothing to configure
        return
    if opts.rest_weight < 0 or opts.grpc_weight < 0 or opts.rest_weight + opts.grpc_weight == 0:
        raise SystemExit("--rest-weight and --grpc-weight must be >= 0 and not both 0")
    RestUser.weight = opts.rest_weight
    GrpcUser.weight = opts.grpc_weight
    # Locust logs and ignores an ordinary exception in an init listener; SystemExit stops it.
    try:
        configure(opts)
    except (ImageSourceError, ClientError) as exc:
        raise SystemExit(f"error: {exc}") from None
    # grpc's own threads would block gevent's loop: let it cooperate, before any channel. Always
    # (cheap): a worker learns the master's --grpc-weight only when the test starts.
    import grpc.experimental.gevent as grpc_gevent

    grpc_gevent.init_gevent()
    runner = environment.runner
    if isinstance(runner, WorkerRunner):
        runner.register_message(DRAIN_MESSAGE, _on_drain, concurrent=True)
        environment.events.report_to_master.add_listener(_add_report)
        environment.events.test_start.add_listener(_worker_test_start)
    else:  # the master, or a single local process
        if isinstance(runner, MasterRunner):
            environment.events.worker_report.add_listener(_collect_report)
            environment.events.test_stopping.add_listener(_drain_workers)
        environment.events.test_start.add_listener(_reset)
        environment.events.test_stop.add_listener(_write_merged)


def configure(opts: Any) -> None:
    """Images, answer format, model and token from the options (ImageSourceError/ClientError)."""
    folder = Path(opts.images) if opts.images else None
    size = (opts.image_size, opts.image_size)
    source = (opts.images, opts.num_images, opts.image_size)
    if SETTINGS.get("source") != source:
        IMAGES[:] = load_images(folder, n=opts.num_images, size=size)
    token = resolve_token("inference", opts.token or None, opts.key_file or None)
    SETTINGS.update(output=opts.output, model=opts.model_name, token=token, source=source)


@events.request.add_listener
def _count_request(request_type: str, exception: BaseException | None = None, **_: object) -> None:
    """Every attempt this process sends (retried ones too), by protocol: the worker's own count,
    independent of Locust's stats, which the report holds the merged stats to."""
    counts = COUNTS.setdefault(protocol_of(request_type), {"requests": 0, "failures": 0})
    counts["requests"] += 1
    counts["failures"] += exception is not None


def _record() -> dict[str, Any]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "counts": {k: dict(v) for k, v in COUNTS.items()},
        "final": FINAL["final"],
    }


def _reset(**_: object) -> None:
    COUNTS.clear()
    FINAL["final"] = False
    WORKERS.clear()


def _worker_test_start(environment: Environment, **_: object) -> None:
    """A worker starts a test: Locust has just copied the master's custom options into
    ``parsed_options`` (the spawn message); count from zero, as Locust's stats do."""
    _reset()
    try:
        configure(environment.parsed_options)
    except (ImageSourceError, ClientError) as exc:
        # Too late to refuse to start: keep this worker's own settings and say why.
        logging.getLogger(__name__).error("the master's segserve options fail here: %s", exc)


def _add_report(data: dict[str, Any], **_: object) -> None:
    """Worker: ride along every stats report. ``final`` is read in the same synchronous event
    as Locust serialises the stats, so a final record comes with the last requests' stats."""
    data[REPORT_KEY] = _record()


def _on_drain(environment: Environment, **_: object) -> None:
    """Worker, asked by the master at the end: stop the users (in-flight requests finish), then
    let the next stats report (every WORKER_REPORT_INTERVAL s) carry ``final``."""
    environment.runner.stop()
    FINAL["final"] = True


def _collect_report(client_id: str, data: dict[str, Any], **_: object) -> None:
    if REPORT_KEY in data:
        WORKERS[client_id] = data[REPORT_KEY]


def _drain_workers(environment: Environment, **_: object) -> None:
    """Master, the test stopping: ask every connected worker to stop and wait for the stats
    report each sends after its users stopped (bounded: stop timeout + two report intervals)."""
    runner = environment.runner
    waiting = {c.id for c in runner.clients.all if c.state != STATE_MISSING}
    for client_id in waiting:
        runner.send_message(DRAIN_MESSAGE, None, client_id=client_id)
    deadline = time.monotonic() + (environment.stop_timeout or 0) + 2 * WORKER_REPORT_INTERVAL + 5
    while time.monotonic() < deadline:
        if all(WORKERS.get(c, {}).get("final") for c in waiting):
            return
        time.sleep(0.1)  # gevent-patched by Locust: the messages keep coming


def _write_merged(environment: Environment, **_: object) -> None:
    """Master or local process, the test stopped: the merged stats and the workers, for the
    report. Locust's own --json-file is not used: with --processes its forked workers keep the
    option and overwrite the file with their (empty) stats when they exit."""
    opts = environment.parsed_options
    if opts is None or not opts.csv_prefix:
        return
    runner = environment.runner
    if isinstance(runner, MasterRunner):
        mode, expected = "distributed", int(opts.expect_workers)
        workers = [{"id": k, **v} for k, v in sorted(WORKERS.items())]
    else:
        FINAL["final"] = True  # the users are stopped: every request of this process is in
        mode, expected = "local", 1
        workers = [{"id": "local", **_record()}]
    stats = runner.stats
    payload = {
        "mode": mode,
        "expected_workers": expected,
        "workers": workers,
        "start_time": stats.start_time,
        "last_request_timestamp": stats.last_request_timestamp,
        # StatsEntry.serialize, not RequestStats.serialize_stats: that one resets the entries
        "entries": [e.serialize() for e in stats.entries.values() if e.num_requests],
    }
    path = merged_path(opts.csv_prefix)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")


def _auth() -> dict[str, str]:
    token = SETTINGS.get("token")
    return {"Authorization": f"Bearer {token}"} if token else {}


def _retried(error: ClientError | None, worker_deaths: int, attempt: int) -> bool:
    """Whether the Locust users send a request again after ``error`` (at ``attempt``)."""
    policy = WORKER_DIED_ONLY
    return error is not None and attempt < policy.attempts and policy.allows(error, worker_deaths)


class RestUser(HttpUser):
    """POST /predictions/<model>: the image as the raw body, the output in a header (what
    client.rest sends: no multipart spooling in the frontend)."""

    wait_time = between(0.0, 0.05)

    @task
    def predict(self) -> None:
        image = random.choice(IMAGES)
        start = time.perf_counter()
        delays = WORKER_DIED_ONLY.delays()
        deaths = 0
        for attempt in range(1, WORKER_DIED_ONLY.attempts + 1):
            with self._post(image) as resp:
                error = error_from_response(resp, "inference") if resp.status_code >= 400 else None
                deaths += isinstance(error, WorkerDied) and error.killed
                if not _retried(error, deaths, attempt):
                    # The user's view: the whole request, a retried attempt's time included.
                    resp.request_meta["response_time"] = (time.perf_counter() - start) * 1000.0
                    if resp.status_code != 200:
                        resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                    elif not resp.content:
                        resp.failure("empty answer")
                    return
                resp.request_meta["name"] = REST_NAME + RETRIED_SUFFIX
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
            time.sleep(next(delays))  # gevent-patched: other users run meanwhile

    def _post(self, image: bytes):  # type: ignore[no-untyped-def]
        request = raw_body_request(image, SETTINGS["output"])
        return self.client.post(
            f"/predictions/{SETTINGS['model']}",
            data=request["data"],
            headers={**request["headers"], **_auth()},
            name=REST_NAME,
            timeout=self.environment.parsed_options.request_timeout,
            catch_response=True,
        )


class GrpcUser(User):
    """Predictions over gRPC; each call is reported to Locust as request type ``grpc``."""

    wait_time = between(0.0, 0.05)

    def on_start(self) -> None:
        from client.grpc_client import GrpcClient

        opts = self.environment.parsed_options
        # Only a killed worker's requests are retried, each reported as a raw failure: a load
        # test must count failures, not hide them.
        self.grpc = GrpcClient(
            opts.grpc_host,
            model_name=str(SETTINGS["model"]),
            token=SETTINGS.get("token"),  # type: ignore[arg-type]
            retry=WORKER_DIED_ONLY,
            timeout=opts.request_timeout,
            on_retry=self._report_retried,
        )
        self._attempt_start = time.perf_counter()

    def _report_retried(self, attempt: int, error: ClientError, delay: float) -> None:
        now = time.perf_counter()
        self.environment.events.request.fire(
            request_type=GRPC_REQUEST_TYPE,
            name=GRPC_NAME + RETRIED_SUFFIX,
            response_time=(now - self._attempt_start) * 1000.0,
            response_length=0,
            exception=error,
            context={},
        )
        self._attempt_start = now + delay

    def on_stop(self) -> None:
        self.grpc.close()

    @task
    def predict(self) -> None:
        image = random.choice(IMAGES)
        start = self._attempt_start = time.perf_counter()
        length, exception = 0, None
        try:
            length = len(self.grpc.predict(image, output=str(SETTINGS["output"])).content)
        except Exception as exc:  # noqa: BLE001 - every failure must reach Locust's stats
            exception = exc
        self.environment.events.request.fire(
            request_type=GRPC_REQUEST_TYPE,
            name=GRPC_NAME,
            response_time=(time.perf_counter() - start) * 1000.0,
            response_length=length,
            exception=exception,
            context={},
        )

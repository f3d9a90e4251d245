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
"""

from __future__ import annotations

import random
import time
from pathlib import Path

from locust import HttpUser, User, between, events, task
from locust.env import Environment

from client.errors import ClientError, WorkerDied
from client.outputs import OUTPUT_FORMATS
from client.rest import error_from_response
from client.retry import WORKER_DIED_ONLY
from client.tokens import resolve_token
from loadtest.images import ImageSourceError, load_images
from loadtest.slo import RETRIED_SUFFIX
from serving.properties import DEFAULT_MODEL_NAME

GRPC_REQUEST_TYPE = "grpc"
REST_NAME = "predict"
GRPC_NAME = "Predictions"
# Filled once per Locust process by on_init; users only read them.
IMAGES: list[bytes] = []
SETTINGS: dict[str, object] = {}


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
    folder = Path(opts.images) if opts.images else None
    size = (opts.image_size, opts.image_size)
    # Locust logs and ignores an ordinary exception in an init listener; SystemExit stops it.
    try:
        IMAGES[:] = load_images(folder, n=opts.num_images, size=size)
        token = resolve_token("inference", opts.token or None, opts.key_file or None)
    except (ImageSourceError, ClientError) as exc:
        raise SystemExit(f"error: {exc}") from None
    SETTINGS.update(output=opts.output, model=opts.model_name, token=token)
    if opts.grpc_weight:
        # grpc's own threads would block gevent's loop: let it cooperate, before any channel.
        import grpc.experimental.gevent as grpc_gevent

        grpc_gevent.init_gevent()


def _auth() -> dict[str, str]:
    token = SETTINGS.get("token")
    return {"Authorization": f"Bearer {token}"} if token else {}


def _retried(error: ClientError | None, worker_deaths: int, attempt: int) -> bool:
    """Whether the Locust users send a request again after ``error`` (at ``attempt``)."""
    policy = WORKER_DIED_ONLY
    return error is not None and attempt < policy.attempts and policy.allows(error, worker_deaths)


class RestUser(HttpUser):
    """POST /predictions/<model> with the image and output as multipart fields."""

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
        return self.client.post(
            f"/predictions/{SETTINGS['model']}",
            files={"data": ("image", image, "application/octet-stream")},
            data={"output": SETTINGS["output"]},
            headers=_auth(),
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

"""gRPC client for segserve's TorchServe: Predictions, StreamPredictions(2), Ping, management.

TorchServe's gRPC inputs are a ``map<string, bytes>``: the image goes under ``data`` and the
output format under ``output`` (the same names as the REST multipart fields). The token is
sent as ``authorization: Bearer <key>`` metadata, checked by TorchServe's GRPCInterceptor.

Example:
    >>> client = GrpcClient("127.0.0.1:7070", token="...")          # doctest: +SKIP
    >>> client.predict(Path("cat.png").read_bytes()).mask().shape   # doctest: +SKIP
    (128, 128)
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import grpc

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
from client.grpc_stubs import Stubs, load_stubs
from client.outputs import Prediction, check_output
from client.retry import RetryCallback, RetryPolicy, call_with_retry
from serving.properties import DEFAULT_MODEL_NAME, GRPC_INFERENCE_PORT, GRPC_MANAGEMENT_PORT

DEFAULT_INFERENCE_TARGET = f"127.0.0.1:{GRPC_INFERENCE_PORT}"
DEFAULT_MANAGEMENT_TARGET = f"127.0.0.1:{GRPC_MANAGEMENT_PORT}"
# Large masks/overlays exceed gRPC's 4 MiB default; TorchServe's own limit is max_request_size.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
PAGE_SIZE = 100
# Input key asking the handler to mark its answer as a stream's last chunk (StreamPredictions).
STREAM_KEY = "stream"
_REJECTED = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.ALREADY_EXISTS: 409,
}
# TorchServe maps its "Worker died." statuses to gRPC codes (GRPCUtils): 507, the worker was
# SIGKILLed, becomes RESOURCE_EXHAUSTED; 500, it passed responseTimeout, becomes INTERNAL.
_WORKER_DIED = {grpc.StatusCode.RESOURCE_EXHAUSTED: 507, grpc.StatusCode.INTERNAL: 500}


def error_from_rpc(err: grpc.RpcError, target: str, kind: str) -> ClientError:
    """The typed error for a failed call; ``kind`` is the token kind the call used."""
    code = err.code()
    details = _details_message(err.details() or "")
    if code == grpc.StatusCode.UNAVAILABLE and _is_connect_failure(details):
        return ServerUnavailable(target, details.split("\n")[0][:200])
    if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
        return AuthError(target, kind, details)
    if code == grpc.StatusCode.UNAVAILABLE:
        return RetryableServerError(503, details, target)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ClientError(
            f"gRPC call to {target} passed its deadline; raise --timeout or lower --concurrency"
        )
    if code in _WORKER_DIED and details.startswith(WORKER_DIED_MESSAGE.rstrip(".")):
        # details: "Worker died.\norg.pytorch.serve.http.InternalServerException"
        message = details.split("\n")[0]
        killed = code == grpc.StatusCode.RESOURCE_EXHAUSTED
        return WorkerDied(_WORKER_DIED[code], message, target, killed=killed)
    if code in _REJECTED:
        return RequestRejected(_REJECTED[code], code.name, details, target)
    return ServerError(500, f"{code.name}: {details}", target)


def rejection_in_payload(content: bytes, target: str) -> ClientError | None:
    """The handler's per-image 4xx, which TorchServe's gRPC path delivers as a normal answer.

    GRPCJob ignores the status a handler sets for one image of a batch, so a refused image
    arrives as ``{"code": 4xx, "type": ..., "message": ...}`` bytes; PNG/JPEG never start
    with ``{``, and the handler's ``json`` output has no ``code`` field.
    """
    if not content.startswith(b"{"):
        return None
    try:
        body = json.loads(content)
    except ValueError:
        return None
    code = body.get("code") if isinstance(body, dict) else None
    if not isinstance(code, int) or "message" not in body:
        return None
    if 400 <= code < 500:
        return RequestRejected(code, str(body.get("type", "")), str(body["message"]), target)
    if 500 <= code < 600:
        return ServerError(code, str(body["message"]), target)
    return None


def _details_message(details: str) -> str:
    """The handler's ``{"code","type","message"}`` JSON if TorchServe passed it on, else text."""
    try:
        body = json.loads(details)
    except ValueError:
        return details
    return str(body.get("message", details)) if isinstance(body, dict) else details


def _is_connect_failure(details: str) -> bool:
    text = details.lower()
    return any(s in text for s in ("connect", "connection refused", "dns", "unreachable"))


class GrpcClient:
    """Talks to TorchServe's gRPC inference (7070) and management (7071) services."""

    def __init__(
        self,
        inference_target: str = DEFAULT_INFERENCE_TARGET,
        management_target: str = DEFAULT_MANAGEMENT_TARGET,
        model_name: str = DEFAULT_MODEL_NAME,
        token: str | None = None,
        management_token: str | None = None,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        stubs: Stubs | None = None,
        on_retry: RetryCallback | None = None,
    ) -> None:
        """``on_retry(attempt, error, delay)`` is called before each retry (to count them)."""
        self.inference_target = inference_target
        self.management_target = management_target
        self.model_name = model_name
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.on_retry = on_retry
        self.stubs = stubs or load_stubs()
        self._tokens = {"inference": token, "management": management_token}
        # Channels are thread-safe and multiplex calls: one per service for the client's life.
        self._inference_channel = grpc.insecure_channel(inference_target, _CHANNEL_OPTIONS)
        self._management_channel = grpc.insecure_channel(management_target, _CHANNEL_OPTIONS)
        self._inference = self.stubs.inference_pb2_grpc.InferenceAPIsServiceStub(
            self._inference_channel
        )
        self._management = self.stubs.management_pb2_grpc.ManagementAPIsServiceStub(
            self._management_channel
        )

    def _metadata(self, kind: str) -> list[tuple[str, str]]:
        token = self._tokens[kind]
        return [("authorization", f"Bearer {token}")] if token else []

    def _unary(self, method: Any, request: Any, kind: str) -> Any:
        target = self.inference_target if kind == "inference" else self.management_target

        def once() -> Any:
            try:
                return method(request, timeout=self.timeout, metadata=self._metadata(kind))
            except grpc.RpcError as err:
                raise error_from_rpc(err, target, kind) from None

        return call_with_retry(once, self.retry, on_retry=self.on_retry)

    def _request(
        self, image: bytes, output: str, model_version: str | None, stream: bool = False
    ) -> Any:
        check_output(output)
        inputs = {"data": image, "output": output.encode()}
        if stream:
            inputs[STREAM_KEY] = b"true"
        return self.stubs.inference_pb2.PredictionsRequest(
            model_name=self.model_name, model_version=model_version or "", input=inputs
        )

    def _prediction(self, content: bytes, output: str) -> Prediction:
        rejected = rejection_in_payload(content, self.inference_target)
        if rejected is not None:
            raise rejected
        return Prediction(content, output)

    def ping(self) -> str:
        """TorchServe's health status (``"Healthy"``)."""
        empty = _empty()
        resp = self._unary(self._inference.Ping, empty, "inference")
        try:
            return str(json.loads(resp.health).get("status", resp.health))
        except ValueError:
            return resp.health

    def predict(
        self, image: bytes, output: str = "mask", model_version: str | None = None
    ) -> Prediction:
        """Segment one encoded image; same answer bytes as the REST ``predict``."""
        request = self._request(image, output, model_version)
        resp = self._unary(self._inference.Predictions, request, "inference")
        return self._prediction(resp.prediction, output)

    def stream_predict(
        self, image: bytes, output: str = "mask", model_version: str | None = None
    ) -> Iterator[Prediction]:
        """StreamPredictions: one request, the handler's answer as a stream of chunks.

        segserve's handler sends one chunk per image. The request carries the input
        ``stream=true`` so the handler marks its answer as the stream's last chunk
        (``ts_stream_next: false``); TorchServe 0.12 kills the worker otherwise.
        Not retried: a stream may fail after yielding.
        """
        request = self._request(image, output, model_version, stream=True)
        try:
            for resp in self._inference.StreamPredictions(
                request, timeout=self.timeout, metadata=self._metadata("inference")
            ):
                yield self._prediction(resp.prediction, output)
        except grpc.RpcError as err:
            raise error_from_rpc(err, self.inference_target, "inference") from None

    def predict_via_stream(
        self, image: bytes, output: str = "mask", model_version: str | None = None
    ) -> Prediction:
        """:meth:`stream_predict` with the chunks joined: a drop-in for :meth:`predict`."""
        chunks = list(self.stream_predict(image, output, model_version))
        return Prediction(b"".join(c.content for c in chunks), output)

    def list_models(self) -> list[dict[str, Any]]:
        """Registered models, as the management API's JSON."""
        models: list[dict[str, Any]] = []
        page = 0
        while True:  # limit=0 means "no models" over gRPC, unlike REST: page explicitly
            request = self.stubs.management_pb2.ListModelsRequest(
                limit=PAGE_SIZE, next_page_token=page
            )
            body = json.loads(self._unary(self._management.ListModels, request, "management").msg)
            models += body.get("models", [])
            page = int(body.get("nextPageToken") or 0)
            if not page or not body.get("models"):
                return models

    def describe_model(
        self, model_name: str | None = None, model_version: str | None = None
    ) -> list[dict[str, Any]]:
        """Describe a model: versions, batch size, workers and their status."""
        request = self.stubs.management_pb2.DescribeModelRequest(
            model_name=model_name or self.model_name, model_version=model_version or ""
        )
        resp = self._unary(self._management.DescribeModel, request, "management")
        return list(json.loads(resp.msg))

    def close(self) -> None:
        self._inference_channel.close()
        self._management_channel.close()

    def __enter__(self) -> GrpcClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _empty() -> Any:
    from google.protobuf import empty_pb2

    return empty_pb2.Empty()

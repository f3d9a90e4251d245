"""Typed client errors: each message says what went wrong *and* what to do about it.

The CLI prints ``str(error)`` and exits non-zero; library users catch the class they care about.

Example:
    >>> err = RequestRejected(400, "InvalidImage", "not_an_image: cannot decode", url="http://x")
    >>> err.status, err.retryable
    (400, False)
"""

from __future__ import annotations

# TorchServe's message when the worker holding a batch is gone (every request of the batch).
WORKER_DIED_MESSAGE = "Worker died."


class ClientError(Exception):
    """Base class of everything the segserve client raises on purpose."""

    retryable = False


class ServerUnavailable(ClientError):
    """Nothing answers at the address, or the server says it is busy (503/UNAVAILABLE)."""

    retryable = True

    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        self.reason = reason
        super().__init__(
            f"cannot reach TorchServe at {url} ({reason}). Is it running? "
            "Start it with `make serve` (or pass the right --url / --grpc-target)."
        )


class AuthError(ClientError):
    """The server refused the token: missing, wrong kind (inference vs management) or expired."""

    def __init__(self, url: str, kind: str, detail: str = "") -> None:
        self.url = url
        self.kind = kind
        env = "SEGSERVE_MANAGEMENT_TOKEN" if kind == "management" else "SEGSERVE_TOKEN"
        super().__init__(
            f"{url} refused the {kind} token{f' ({detail})' if detail else ''}. "
            f"Against a local TorchServe the key is the '{kind}' entry of key_file.json, written "
            f"in the directory TorchServe was started from: pass it with --key-file PATH or set "
            f"{env} (the inference and management keys differ and change at every restart). "
            "Against the Kubernetes deployment it is a token of the Secret segserve-api-tokens "
            "(pass --token or set SEGSERVE_TOKEN)."
        )


class RequestRejected(ClientError):
    """A 4xx answer: the request itself is wrong, retrying cannot help."""

    def __init__(self, status: int, error_type: str, message: str, url: str = "") -> None:
        self.status = status
        self.error_type = error_type
        self.message = message
        self.url = url
        where = f" {url}" if url else ""
        super().__init__(f"request rejected by{where} (HTTP {status} {error_type}): {message}")


class ServerError(ClientError):
    """A 5xx answer other than 503: the server failed on a valid request."""

    def __init__(self, status: int, message: str, url: str = "") -> None:
        self.status = status
        self.message = message
        self.url = url
        super().__init__(f"TorchServe at {url} failed (HTTP {status}): {message}")


class RetryableServerError(ServerError):
    """502/503/504: a proxy or an overloaded TorchServe; worth another try after a pause."""

    retryable = True

    def __init__(self, status: int, message: str, url: str = "", retry_after: float | None = None):
        super().__init__(status, message, url)
        self.retry_after = retry_after


class WorkerDied(ServerError):
    """TorchServe lost the worker process that held this request's batch ("Worker died.").

    TorchServe 0.12 tells two deaths apart, and so does this class (``killed``):

    * the process was SIGKILLed (exit 137: the OOM killer, the kubelet, an operator, ``make
      chaos``): HTTP 507, gRPC RESOURCE_EXHAUSTED. The request was a bystander of its batch
      and a prediction has no side effect, so it is ``retryable`` (a bounded number of times,
      :attr:`client.retry.RetryPolicy.worker_died_retries`);
    * the worker passed the model's ``responseTimeout`` (or crashed on the batch): HTTP 500,
      gRPC INTERNAL. This request may be the cause: sending it again would hold the next
      worker for another full timeout and kill it too, so it is not retried.
    """

    def __init__(self, status: int, message: str, url: str = "", killed: bool = False) -> None:
        super().__init__(status, message, url)
        self.killed = killed
        self.retryable = killed


class ConfigurationError(ClientError):
    """Bad client-side input: a missing key file, an unknown output format, an unreadable image."""

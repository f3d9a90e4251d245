"""The page's side of TorchServe: one ``json`` prediction per image through segserve's client.

The token lives here, on the server side of the page: it is read from ``token_file`` (re-read
on every call, so a rotated Kubernetes Secret applies without a restart) or resolved the way
the CLI does (``$SEGSERVE_TOKEN``, ``./key_file.json``), and it is never handed to Gradio.

Every failure becomes a :class:`PageError` whose text is what the person sees: the server's own
message for a refused image, a clear sentence when TorchServe is down or refuses the token.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from client.errors import (
    AuthError,
    ClientError,
    ConfigurationError,
    RequestRejected,
    ServerUnavailable,
)
from client.grpc_client import GrpcClient
from client.outputs import Prediction
from client.rest import RestClient
from client.retry import RetryPolicy
from client.tokens import key_from_key_file, resolve_token
from ui.answer import AnswerError, Segmentation, parse_answer
from ui.config import PageConfig

# A page is interactive: one quick retry for a restarting worker, then tell the person.
PAGE_RETRY = RetryPolicy(attempts=2, base_delay=0.2, max_delay=0.5)


class PageError(Exception):
    """A message for the person using the page (shown in its status line)."""


@dataclass(frozen=True)
class Answer:
    """One prediction as the page needs it."""

    segmentation: Segmentation
    latency_ms: float


def read_token_file(path: Path) -> str:
    """The token in ``path``: a bare token (a Secret's key), or TorchServe's key_file.json.

    >>> import tempfile
    >>> p = Path(tempfile.mkdtemp()) / "token"
    >>> _ = p.write_text("s3cret\\n")
    >>> read_token_file(p)
    's3cret'
    """
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigurationError(f"token file {path} is not readable: {exc}") from None
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except ValueError:
            pass
        else:
            return key_from_key_file(data, path, "inference")
    if not text or any(ch.isspace() for ch in text):
        raise ConfigurationError(
            f"token file {path} must hold one token (no spaces), or be TorchServe's key_file.json"
        )
    return text


class Backend:
    """Predictions for the page over REST or gRPC, with the token kept server side."""

    def __init__(self, config: PageConfig) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._client: RestClient | GrpcClient | None = None
        self._client_token: str | None = None

    @property
    def target(self) -> str:
        """Where predictions go, for messages."""
        if self.config.protocol == "grpc":
            return f"gRPC {self.config.grpc_target}"
        return f"REST {self.config.inference_url}"

    def _token(self) -> str | None:
        if self.config.token_file is not None:
            return read_token_file(self.config.token_file)
        return resolve_token("inference")

    def _current_client(self) -> RestClient | GrpcClient:
        token = self._token()
        with self._lock:
            if self._client is None or token != self._client_token:
                if self._client is not None:
                    self._client.close()
                self._client = self._make_client(token)
                self._client_token = token
            return self._client

    def _make_client(self, token: str | None) -> RestClient | GrpcClient:
        cfg = self.config
        if cfg.protocol == "grpc":
            return GrpcClient(
                cfg.grpc_target, model_name=cfg.model_name, token=token,
                timeout=cfg.timeout_s, retry=PAGE_RETRY,
            )  # fmt: skip
        return RestClient(
            cfg.inference_url, model_name=cfg.model_name, token=token,
            timeout=cfg.timeout_s, retry=PAGE_RETRY,
        )  # fmt: skip

    def predict(self, image: bytes) -> Answer:
        """Segment one encoded image; a :class:`PageError` says what went wrong."""
        started = time.perf_counter()
        try:
            prediction: Prediction = self._current_client().predict(image, output="json")
            latency_ms = 1000.0 * (time.perf_counter() - started)
            return Answer(parse_answer(prediction.json()), latency_ms)
        except RequestRejected as exc:
            # The handler's own words (e.g. "the file is not an image: ..."), as sent.
            raise PageError(
                f"The server refused this file (HTTP {exc.status}): {exc.message}"
            ) from None
        except ServerUnavailable:
            raise PageError(
                f"TorchServe is not answering at {self.target}: start it (`make serve`) or "
                "check the page's --inference-url / --grpc-target."
            ) from None
        except AuthError:
            raise PageError(
                f"TorchServe at {self.target} refused the page's token: check the page's "
                "--token-file (or $SEGSERVE_TOKEN / key_file.json)."
            ) from None
        except (AnswerError, ValueError) as exc:
            raise PageError(f"The server's answer could not be read: {exc}") from None
        except ClientError as exc:
            raise PageError(f"The prediction failed: {exc}") from None

    def ping(self) -> str:
        """TorchServe's health (``"Healthy"``), or a :class:`PageError` saying why not."""
        try:
            return self._current_client().ping()
        except ServerUnavailable:
            raise PageError(f"TorchServe is not answering at {self.target} yet") from None
        except ClientError as exc:
            raise PageError(f"TorchServe at {self.target}: {exc}") from None

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

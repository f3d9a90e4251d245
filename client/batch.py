"""Segment many images with a bounded number of requests in flight, saving each answer.

A bad image is recorded and the rest go on; a down server or a refused token stops the whole
job at once (every other image would fail the same way).

Example:
    >>> paths = list_images(Path("imgs"))                          # doctest: +SKIP
    >>> result = predict_paths(RestClient(), paths, Path("out"))   # doctest: +SKIP
    >>> len(result.saved), result.failed                           # doctest: +SKIP
    (12, {})
"""

from __future__ import annotations

from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from client.errors import AuthError, ClientError, ConfigurationError, ServerUnavailable
from client.outputs import Prediction, save_prediction

FATAL = (AuthError, ServerUnavailable)


class Predictor(Protocol):
    def predict(self, image: bytes, output: str = "mask") -> Prediction: ...


@dataclass
class BatchResult:
    saved: dict[Path, Path] = field(default_factory=dict)  # input image -> file written
    failed: dict[Path, str] = field(default_factory=dict)  # input image -> error message


def _one(client: Predictor, path: Path, out_dir: Path, output: str) -> Path:
    try:
        image = path.read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"cannot read image {path}: {exc.strerror}") from None
    return save_prediction(out_dir, path, client.predict(image, output=output))


def predict_paths(
    client: Predictor,
    paths: list[Path],
    out_dir: Path,
    output: str = "mask",
    concurrency: int = 4,
) -> BatchResult:
    """Predict every path with at most ``concurrency`` requests in flight."""
    if concurrency < 1:
        raise ConfigurationError(f"concurrency must be >= 1, got {concurrency}")
    result = BatchResult()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        futures: dict[Future[Path], Path] = {
            pool.submit(_one, client, p, out_dir, output): p for p in paths
        }
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for fut in done:
                exc = fut.exception()
                if isinstance(exc, FATAL):
                    for other in pending:
                        other.cancel()
                    raise exc
                if isinstance(exc, ClientError):
                    result.failed[futures[fut]] = str(exc)
                elif exc is not None:
                    raise exc
                else:
                    result.saved[futures[fut]] = fut.result()
    return result

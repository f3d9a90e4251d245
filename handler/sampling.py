"""The active-learning hook: keep the inputs the model is least sure of, for labelling.

Off unless ``SEGSERVE_SAMPLE_DIR`` is set (the worker inherits TorchServe's environment).
Then every answered image whose mean confidence is below ``SEGSERVE_SAMPLE_BELOW`` (default
0.5) is written there as the bytes the client sent plus a JSON sidecar (time, model, mean
confidence, per-class shares), until the folder holds ``SEGSERVE_SAMPLE_MAX_MB`` (default
512) MiB: a full folder keeps what it has and stops, it never grows without bound. A failure
to write is logged and never fails the request.

Example:
    >>> import tempfile
    >>> sampler = LowConfidenceSampler(Path(tempfile.mkdtemp()), below=0.5, max_bytes=10_000)
    >>> sampler.offer(b"img", 0.9, {"model": "m"}) is None      # confident enough: not kept
    True
    >>> sampler.offer(b"img", 0.2, {"model": "m"}).suffix
    '.bin'
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

DIR_ENV, BELOW_ENV, MAX_MB_ENV = (
    "SEGSERVE_SAMPLE_DIR",
    "SEGSERVE_SAMPLE_BELOW",
    "SEGSERVE_SAMPLE_MAX_MB",
)
DEFAULT_BELOW = 0.5
DEFAULT_MAX_MB = 512.0


def mean_confidence(fractions: np.ndarray, confidences: np.ndarray) -> float:
    """The image's mean confidence from its per-class statistics (handler.drift): classes
    weighted by their pixel share, absent classes (NaN) left out.

    >>> mean_confidence(np.array([0.5, 0.5, 0.0]), np.array([0.9, 0.5, np.nan]))
    0.7
    """
    present = ~np.isnan(confidences)
    weight = float(fractions[present].sum())
    if weight <= 0:
        return float("nan")
    return round(float((fractions[present] * confidences[present]).sum() / weight), 6)


class LowConfidenceSampler:
    """Writes low-confidence inputs into ``folder`` while it holds less than ``max_bytes``."""

    def __init__(self, folder: Path, below: float, max_bytes: int) -> None:
        self.folder, self.below, self.max_bytes = folder, below, max_bytes
        folder.mkdir(parents=True, exist_ok=True)

    def used_bytes(self) -> int:
        """What the folder holds now (every worker writes there: counted, not remembered)."""
        return sum(p.stat().st_size for p in self.folder.iterdir() if p.is_file())

    @classmethod
    def from_environment(
        cls, environ: Mapping[str, str] = os.environ
    ) -> LowConfidenceSampler | None:
        """The sampler the environment asks for, or None (off). A bad value is a ValueError
        naming the variable."""
        folder = environ.get(DIR_ENV, "").strip()
        if not folder:
            return None
        try:
            below = float(environ.get(BELOW_ENV, DEFAULT_BELOW))
            max_mb = float(environ.get(MAX_MB_ENV, DEFAULT_MAX_MB))
        except ValueError as exc:
            raise ValueError(f"{BELOW_ENV} / {MAX_MB_ENV} must be numbers: {exc}") from None
        if not 0 < below <= 1 or max_mb <= 0:
            raise ValueError(f"{BELOW_ENV} must be in (0, 1] and {MAX_MB_ENV} > 0")
        return cls(Path(folder), below, int(max_mb * 2**20))

    def offer(self, image: bytes, confidence: float, record: Mapping[str, Any]) -> Path | None:
        """Keep ``image`` if its ``confidence`` is below the threshold and there is room; the
        path written, else None."""
        if not confidence < self.below:  # NaN (nothing predicted) is not kept either
            return None
        sidecar = json.dumps({**record, "mean_confidence": confidence, "time": time.time()})
        size = len(image) + len(sidecar)
        if self.used_bytes() + size > self.max_bytes:
            return None
        stem = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:12]}"
        path = self.folder / f"{stem}.bin"
        try:
            path.write_bytes(image)
            path.with_suffix(".json").write_text(sidecar)
        except OSError:
            logger.warning(
                "could not keep a low-confidence input in %s", self.folder, exc_info=True
            )
            return None
        return path

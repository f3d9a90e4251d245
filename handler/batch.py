"""One TorchServe batch on its way through the handler's preprocess → inference → postprocess.

Kept out of ``segmenter_handler.py`` because TorchServe's loader requires that file to define
exactly one class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from handler.preprocessing import Geometry
from handler.request import ParsedRequest
from handler.telemetry import Telemetry


@dataclass
class PreparedImage:
    """An accepted request, decoded and resized: where its answer goes and how to undo the
    resize."""

    idx: int
    request: ParsedRequest
    rgb: np.ndarray
    tensor: torch.Tensor
    geometry: Geometry


@dataclass
class Batch:
    """Per-index answers so far (``None``: not answered yet) and the images still in the run."""

    responses: list[Any]
    telemetry: Telemetry
    start: float
    prepared: list[PreparedImage] = field(default_factory=list)
    inputs: torch.Tensor | None = None  # the collated forward input, None when nothing is left
    logits: Any = None
    preprocessed_at: float = 0.0
    inferred_at: float = 0.0

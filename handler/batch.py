"""One TorchServe batch on its way through the handler's preprocess → inference → postprocess.

Kept out of ``segmenter_handler.py`` because TorchServe's loader requires that file to define
exactly one class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from handler.pixels import host_rgb
from handler.preprocessing import Geometry
from handler.request import ParsedRequest
from handler.telemetry import Telemetry


@dataclass
class PreparedImage:
    """An accepted request, decoded and resized: where its answer goes and how to undo the
    resize."""

    idx: int
    request: ParsedRequest
    pixels: torch.Tensor  # (3, H, W) uint8 on the model's device, as decoded
    tensor: torch.Tensor
    geometry: Geometry

    def host_rgb(self) -> np.ndarray:
        """The decoded image as an ``(H, W, 3)`` array (a view on CPU), for overlays."""
        return host_rgb(self.pixels)


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

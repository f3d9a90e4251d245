"""One image's prediction → statistics and the response body in the requested format.

Pure numpy; the mask and confidence come from ``handler.preprocessing.logits_to_prediction``.

The ``json`` answer (compact: the mask travels as a base64 PNG, not per-pixel JSON)::

    {"model_name": "segmenter", "model_version": "1.0", "width": 640, "height": 480,
     "mean_confidence": 0.91,
     "classes": [{"id": 0, "name": "background", "color": [0, 0, 0],
                  "pixel_fraction": 0.7, "confidence": 0.95}, ...],
     "mask_format": "png/base64", "mask": "iVBORw0KGgo...",
     "confidence_map_format": "png/base64/uint8", "confidence_map": "iVBORw0KGgo..."}

``pixel_fraction`` sums to 1 over classes; ``confidence`` (mean softmax probability of the
winning class over that class's pixels) is ``null`` for a class with no pixels.
``confidence_map`` is that probability per pixel, at the image's size, as an 8-bit greyscale
PNG whose value ``v`` means ``v / 255`` (what a heat map needs, at a PNG's size).

Example:
    >>> mask = np.array([[0, 0], [1, 1]])
    >>> conf = np.array([[0.9, 0.7], [0.6, 0.8]], dtype=np.float32)
    >>> class_fractions(mask, 3).tolist()
    [0.5, 0.5, 0.0]
    >>> [round(float(c), 2) for c in class_confidences(mask, conf, 3)[:2]]
    [0.8, 0.7]
"""

from __future__ import annotations

import base64
import json
import math
from typing import Any

import numpy as np

from handler.artifact import ModelMetadata
from handler.errors import InputError
from handler.imaging import (
    JPEG_MAX_DIMENSION,
    encode_color_png,
    encode_confidence_png,
    encode_mask_png,
    encode_overlay,
)


def class_fractions(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """Fraction of the image's pixels per class, ``(num_classes,)`` float64 summing to 1."""
    counts = np.bincount(mask.reshape(-1), minlength=num_classes)[:num_classes]
    return counts.astype(np.float64) / max(int(mask.size), 1)


def class_confidences(mask: np.ndarray, confidence: np.ndarray, num_classes: int) -> np.ndarray:
    """Mean confidence per class over its pixels; NaN for classes absent from the mask."""
    flat = mask.reshape(-1)
    counts = np.bincount(flat, minlength=num_classes)[:num_classes]
    sums = np.bincount(
        flat, weights=confidence.reshape(-1).astype(np.float64), minlength=num_classes
    )
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums[:num_classes] / counts, np.nan)


def _finite_or_none(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


# The ``json`` answer's per-pixel confidence: an 8-bit greyscale PNG, base64, value/255.
CONFIDENCE_MAP_FORMAT = "png/base64/uint8"


def json_body(
    mask: np.ndarray, confidence: np.ndarray, meta: ModelMetadata, mask_png: bytes | None = None
) -> dict[str, Any]:
    """The ``json`` answer as a dict (see the module docstring)."""
    fractions = class_fractions(mask, meta.num_classes)
    confidences = class_confidences(mask, confidence, meta.num_classes)
    png = mask_png if mask_png is not None else encode_mask_png(mask, meta.num_classes)
    return {
        "model_name": meta.model_name,
        "model_version": meta.model_version,
        "width": int(mask.shape[1]),
        "height": int(mask.shape[0]),
        "mean_confidence": float(confidence.mean()) if confidence.size else None,
        "classes": [
            {
                "id": i,
                "name": meta.class_names[i],
                "color": list(meta.palette[i]),
                "pixel_fraction": float(fractions[i]),
                "confidence": _finite_or_none(float(confidences[i])),
            }
            for i in range(meta.num_classes)
        ],
        "mask_format": "png/base64",
        "mask": base64.b64encode(png).decode("ascii"),
        "confidence_map_format": CONFIDENCE_MAP_FORMAT,
        "confidence_map": base64.b64encode(encode_confidence_png(confidence)).decode("ascii"),
    }


# Formats whose body carries per-pixel confidence: only these pay for the full upsampling of
# every class's logits (handler.preprocessing.logits_to_prediction).
NEEDS_CONFIDENCE = frozenset({"json"})
# Formats drawn over the decoded image: only these need its pixels on the host.
NEEDS_IMAGE = frozenset({"overlay", "overlay_jpeg"})


def encode_output(
    output: str,
    rgb: np.ndarray | None,
    mask: np.ndarray,
    confidence: np.ndarray | None,
    meta: ModelMetadata,
) -> bytes:
    """The response body for one image in format ``output`` (see handler.request); only
    ``json`` reads ``confidence`` (see :data:`NEEDS_CONFIDENCE`), only the overlays ``rgb``
    (:data:`NEEDS_IMAGE`)."""
    if output in NEEDS_IMAGE and rgb is None:
        raise ValueError(f"output {output!r} needs the decoded image")
    if output == "mask":
        return encode_mask_png(mask, meta.num_classes)
    if output == "color":
        return encode_color_png(mask, meta.palette)
    if output == "overlay":
        return encode_overlay(rgb, mask, meta.palette, "PNG")
    if output == "overlay_jpeg":
        if max(mask.shape) > JPEG_MAX_DIMENSION:
            raise InputError(
                "unencodable",
                f"a JPEG cannot be {mask.shape[1]}x{mask.shape[0]} pixels (at most "
                f"{JPEG_MAX_DIMENSION} per side): ask for output=overlay (PNG) or mask",
            )
        return encode_overlay(rgb, mask, meta.palette, "JPEG")
    if output in NEEDS_CONFIDENCE:
        if confidence is None:
            raise ValueError(f"output {output!r} needs the per-pixel confidence")
        return json.dumps(json_body(mask, confidence, meta), separators=(",", ":")).encode()
    raise ValueError(f"unknown output format {output!r}")

"""Drift statistics: what the handler measures per image, and the validation baseline.

Per observed image (one per worker per ``drift_every_s``, see ``segmenter_handler``) the
handler records every class's share of the pixels (at the original
resolution) and the mean confidence over each present class's pixels (at the model's
resolution, no upsampling). The exporter measures the same two statistics on validation
images with the same functions, so the baseline in the metadata and the live histograms are
one statistic; Prometheus compares them (k8s/components/monitoring/prometheusrule.yaml).

Example:
    >>> import numpy as np
    >>> stats = [(np.array([0.75, 0.25]), np.array([0.9, np.nan])),
    ...          (np.array([0.25, 0.75]), np.array([0.7, 0.6]))]
    >>> ref = drift_reference(("sky", "road"), stats)
    >>> ref.class_pixel_fraction, ref.class_confidence, ref.images
    ({'sky': 0.5, 'road': 0.5}, {'sky': 0.8, 'road': 0.6}, 2)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from handler.artifact import DriftReference
from handler.postprocess import class_confidences, class_fractions
from handler.preprocessing import Geometry, model_resolution_prediction

# The per-class drift histograms observe one image per worker per this many seconds (handler
# option ``drift_every_s``; 0 = every image). Each observed image is a dozen metric lines the
# frontend parses: on every image they took 8 % of a 2-core machine's throughput, and a GPU
# pod at 1000 img/s would send 12000 lines/s. Which image is observed depends on time only,
# never on content, so the means the drift rules compare stay unbiased.
DRIFT_EVERY_S = 0.1


def drift_interval(options: Mapping[str, Any]) -> float:
    """The handler option ``drift_every_s`` (seconds, >= 0), named when it is not one.

    >>> drift_interval({}), drift_interval({"drift_every_s": 0})
    (0.1, 0.0)
    """
    value = options.get("drift_every_s", DRIFT_EVERY_S)
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = -1.0
    if not seconds >= 0:
        raise ValueError(
            f"handler option drift_every_s={value!r} in the archive's model-config.yaml must "
            "be a number of seconds >= 0 (0 = observe every image)"
        )
    return seconds


def image_statistics(
    mask: np.ndarray, logits: torch.Tensor, geometry: Geometry, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """(pixel fraction per class of the served ``mask``, mean confidence per class at the
    model's resolution, NaN where absent) for one image's ``logits`` ``(C, h, w)``."""
    ids, confidence = model_resolution_prediction(logits, geometry)
    return (
        class_fractions(mask, num_classes),
        class_confidences(ids.cpu().numpy(), confidence.cpu().numpy(), num_classes),
    )


def drift_reference(
    class_names: Sequence[str], statistics: Iterable[tuple[np.ndarray, np.ndarray]]
) -> DriftReference:
    """The means Prometheus computes from the histograms (sum / count), over ``statistics``:
    fractions over every image, confidences over the images where the class appears."""
    fractions, confidences = [], []
    for fraction, confidence in statistics:
        fractions.append(np.asarray(fraction, dtype=np.float64))
        confidences.append(np.asarray(confidence, dtype=np.float64))
    if not fractions:
        raise ValueError("a drift reference needs at least one image")
    mean_fraction = np.mean(fractions, axis=0)
    stacked = np.stack(confidences)
    present = ~np.isnan(stacked)
    return DriftReference(
        class_pixel_fraction={
            n: round(float(f), 6) for n, f in zip(class_names, mean_fraction, strict=True)
        },
        class_confidence={
            name: round(float(np.nanmean(stacked[:, i])), 6)
            for i, name in enumerate(class_names)
            if present[:, i].any()
        },
        images=len(fractions),
    )

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

from collections.abc import Iterable, Sequence

import numpy as np
import torch

from handler.artifact import DriftReference
from handler.postprocess import class_confidences, class_fractions
from handler.preprocessing import Geometry, model_resolution_prediction


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

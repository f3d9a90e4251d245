"""segserve's custom metrics, emitted through TorchServe's metrics cache (``context.metrics``).

Names, types and labels are the contract of docs/architecture.md and must match
``handler/metrics.yaml`` (a metric not declared there never reaches Prometheus). The worker
writes each observation as a ``[METRICS]`` log line that the frontend parses; ``ModelName`` and
``Level`` are appended by ``ts``, ``Hostname`` by the frontend.

Example (``context.metrics`` is a ``ts.metrics.metric_cache_yaml_impl.MetricsCacheYamlImpl``):
    >>> telemetry = Telemetry(context.metrics)          # doctest: +SKIP
    >>> telemetry.observe("segserve_batch_size", 4)    # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from ts.metrics.dimension import Dimension
from ts.metrics.metric_type_enum import MetricTypes

from handler.artifact import DriftReference

logger = logging.getLogger(__name__)

HISTOGRAMS = {
    "segserve_preprocess_seconds": "s",
    "segserve_inference_seconds": "s",
    "segserve_postprocess_seconds": "s",
    "segserve_batch_size": "count",
    "segserve_input_megapixels": "MP",
    "segserve_class_pixel_fraction": "fraction",
    "segserve_class_confidence": "probability",
}
REJECTED = "segserve_rejected_inputs_total"
# The validation baseline of the two per-class histograms (metadata.json "drift_reference").
REFERENCE_GAUGES = {
    "class_pixel_fraction": "segserve_reference_class_pixel_fraction",
    "class_confidence": "segserve_reference_class_confidence",
}


class Telemetry:
    """Thin typed wrapper: one method per kind of observation the handler makes."""

    def __init__(self, metrics_cache) -> None:
        self._cache = metrics_cache

    def observe(self, name: str, value: float, dimensions: Sequence[Dimension] = ()) -> None:
        """One histogram observation (``name`` must be in :data:`HISTOGRAMS`)."""
        if self._cache is None:
            return
        try:
            self._cache.add_metric(
                name,
                float(value),
                HISTOGRAMS[name],
                dimensions=list(dimensions),
                metric_type=MetricTypes.HISTOGRAM,
            )
        except Exception:  # noqa: BLE001 - a metrics hiccup must never fail a prediction
            logger.warning("could not emit metric %s", name, exc_info=True)

    def rejected(self, reason: str) -> None:
        """Count one refused input under its ``Reason`` label."""
        if self._cache is None:
            return
        try:
            self._cache.add_metric(
                REJECTED,
                1,
                "count",
                dimensions=[Dimension("Reason", reason)],
                metric_type=MetricTypes.COUNTER,
            )
        except Exception:  # noqa: BLE001
            logger.warning("could not emit metric %s", REJECTED, exc_info=True)

    def per_class(
        self,
        class_names: Sequence[str],
        fractions: np.ndarray,
        confidences: np.ndarray,
    ) -> None:
        """Drift inputs for one image: every class's pixel fraction, confidence if present."""
        for name, fraction, confidence in zip(class_names, fractions, confidences, strict=True):
            label = [Dimension("ClassName", name)]
            self.observe("segserve_class_pixel_fraction", float(fraction), label)
            if not np.isnan(confidence):
                self.observe("segserve_class_confidence", float(confidence), label)

    def reference(self, reference: DriftReference) -> None:
        """The validation baseline as gauges, one per class and statistic: Prometheus compares
        the live histograms' means with them (drift rules). Re-sent now and then, since a
        gauge lives in the frontend only once a worker has emitted it."""
        if self._cache is None:
            return
        for key, name in REFERENCE_GAUGES.items():
            for class_name, value in getattr(reference, key).items():
                try:
                    self._cache.add_metric(
                        name,
                        float(value),
                        "fraction",
                        dimensions=[Dimension("ClassName", class_name)],
                        metric_type=MetricTypes.GAUGE,
                    )
                except Exception:  # noqa: BLE001
                    logger.warning("could not emit metric %s", name, exc_info=True)

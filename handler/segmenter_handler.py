"""TorchServe entry point: a thin ``BaseHandler`` adapter over segserve's pure functions.

Per TorchServe batch (``handle``):

1. every item is parsed and decoded on its own; a bad item gets its own 4xx JSON error
   (``context.set_response_status(code, msg, idx)``) and never fails its batch-mates;
2. the accepted images go through the model in ONE forward (``handler.preprocessing.collate``);
3. each prediction is cropped/upsampled to its image's size, arg-maxed and encoded in the
   format that request asked for, with a per-request Content-Type.

TorchServe 0.12 facts this relies on (read from ts/ and the frontend source): per-index status
and Content-Type reach REST clients; a gRPC ``Predictions`` call has no status per item, so an
error arrives there as a successful call whose bytes are the JSON error body.

Switches (``handler:`` section of the archive's model-config.yaml, else metadata ``serving``):
``max_pixels`` (decode limit), ``cuda_half``, ``cuda_channels_last`` (CUDA only; CPU is exact fp32).

This module defines exactly one class: TorchServe's loader requires it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

# Inside an extracted .mar this file sits next to the archived ``handler/`` package: put that
# directory first on sys.path so ``handler.*`` resolves to the archived copy, never to a
# checkout or install that happens to be on PYTHONPATH (a version skew nobody would notice).
_HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.isdir(os.path.join(_HERE, "handler")) and sys.path[:1] != [_HERE]:
    sys.path.insert(0, _HERE)

import torch  # noqa: E402
from ts.torch_handler.base_handler import BaseHandler  # noqa: E402
from ts.utils.util import PredictionException  # noqa: E402

from handler.errors import InputError  # noqa: E402
from handler.imaging import decode_image  # noqa: E402
from handler.metadata import load_metadata  # noqa: E402
from handler.postprocess import class_confidences, class_fractions, encode_output  # noqa: E402
from handler.preprocessing import (  # noqa: E402
    collate,
    logits_to_prediction,
    prepare_image,
    rgb_array_to_tensor,
)
from handler.request import parse_request  # noqa: E402
from handler.runtime import load_scripted_model  # noqa: E402
from handler.telemetry import Telemetry  # noqa: E402

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 40_000_000  # 8K x 5K; a 64 MB request cap lets far bigger bombs through


def _asks_for_stream(item: Any) -> bool:
    """True when a request carries the ``stream`` input key (set by gRPC stream clients)."""
    value = item.get("stream") if isinstance(item, dict) else None
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8", "replace")
    return str(value).strip().lower() == "true"


class SegmenterHandler(BaseHandler):
    """Semantic segmentation: image bytes in, class mask (or colour/overlay/JSON) out."""

    def initialize(self, context) -> None:
        properties = context.system_properties
        model_dir = Path(properties["model_dir"])
        meta = load_metadata(model_dir / "metadata.json")
        # Answer under the name/version the archive is served as (what clients address).
        archived = context.manifest.get("model", {})
        self.meta = dataclasses.replace(
            meta,
            model_name=archived.get("modelName") or meta.model_name,
            model_version=archived.get("modelVersion") or meta.model_version,
        )
        options = dict((getattr(context, "model_yaml_config", None) or {}).get("handler") or {})
        self.max_pixels = int(options.get("max_pixels", DEFAULT_MAX_PIXELS))
        gpu_id = properties.get("gpu_id")
        if gpu_id is not None and torch.cuda.is_available():
            self.device = torch.device(f"cuda:{gpu_id}")
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        on_cuda = self.device.type == "cuda"
        self.half = on_cuda and bool(options.get("cuda_half", self.meta.serving.cuda_half))
        self.channels_last = on_cuda and bool(
            options.get("cuda_channels_last", self.meta.serving.cuda_channels_last)
        )
        serialized = context.manifest["model"].get("serializedFile", "model.pt")
        self.model = load_scripted_model(model_dir / serialized, self.device)
        if self.half:
            self.model = self.model.half()
        self.initialized = True
        logger.info(
            "segserve handler %s (handler package %s): model %s v%s, %d classes, device %s, "
            "half=%s, channels_last=%s, max_pixels=%d, batch_size=%s",
            Path(__file__).resolve(),
            Path(sys.modules["handler"].__file__).resolve().parent,
            self.meta.model_name,
            self.meta.model_version,
            self.meta.num_classes,
            self.device,
            self.half,
            self.channels_last,
            self.max_pixels,
            properties.get("batch_size"),
        )

    def _reject(self, context, idx: int, error: InputError, telemetry: Telemetry) -> bytes:
        telemetry.rejected(error.reason)
        context.set_response_status(error.status, error.message, idx)
        context.set_response_content_type(idx, "application/json")
        logger.info("request %s refused (%d %s): %s", idx, error.status, error.reason, error)
        return json.dumps(error.body()).encode()

    def _accept(self, context, data: list, telemetry: Telemetry) -> tuple[list, list]:
        """Parse + decode each item; returns (responses with errors filled, accepted items)."""
        responses: list[Any] = [None] * len(data)
        accepted = []
        for idx, item in enumerate(data):
            try:
                request = parse_request(item, context.get_all_request_header(idx))
                rgb = decode_image(request.image, self.max_pixels)
            except InputError as error:
                responses[idx] = self._reject(context, idx, error, telemetry)
                continue
            except Exception as exc:  # noqa: BLE001 - odd input must not kill the worker
                logger.warning("request %s: unexpected decode failure", idx, exc_info=True)
                error = InputError("bad_request", f"could not read the image: {exc}")
                responses[idx] = self._reject(context, idx, error, telemetry)
                continue
            accepted.append((idx, request, rgb))
            telemetry.observe("segserve_input_megapixels", rgb.shape[0] * rgb.shape[1] / 1e6)
        return responses, accepted

    @torch.inference_mode()
    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        if self.half:
            batch = batch.half()
        logits = self.model(batch)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # so the inference timer measures the forward
        return logits

    def handle(self, data: list, context) -> list:
        self.context = context
        telemetry = Telemetry(context.metrics)
        start = time.perf_counter()
        for idx, item in enumerate(data):
            if _asks_for_stream(item):
                # gRPC StreamPredictions: our one answer is the stream's last chunk. Without
                # this header TorchServe 0.12 waits for more chunks and kills the worker.
                context.set_response_header(idx, "ts_stream_next", "false")
        responses, accepted = self._accept(context, data, telemetry)
        if not accepted:
            return responses
        spec = self.meta.preprocess
        prepared = [
            prepare_image(rgb_array_to_tensor(rgb).to(self.device), spec) for *_, rgb in accepted
        ]
        batch = collate([x for x, _ in prepared], spec)
        preprocessed = time.perf_counter()
        try:
            logits = self._forward(batch)
        except Exception as exc:
            # A model bug is not overload: without this TorchServe answers 503 "Prediction
            # failed", which clients retry and dashboards read as "busy". CUDA errors keep
            # TorchServe's own mapping (507 Out of resources).
            if "CUDA" in str(exc):
                raise
            logger.error("model forward failed on %s", tuple(batch.shape), exc_info=True)
            # TorchScript puts its interpreter traceback first and the actual error last.
            last_line = (str(exc).strip().splitlines() or [""])[-1][:300]
            raise PredictionException(
                f"model forward failed ({type(exc).__name__}: {last_line}); the model in "
                f"archive {self.meta.model_name} v{self.meta.model_version} is broken, not the "
                "request: see the worker log",
                500,
            ) from exc
        inferred = time.perf_counter()
        for j, (idx, request, rgb) in enumerate(accepted):
            mask_t, confidence_t = logits_to_prediction(logits[j], prepared[j][1])
            mask, confidence = mask_t.cpu().numpy(), confidence_t.cpu().numpy()
            responses[idx] = encode_output(request.output, rgb, mask, confidence, self.meta)
            context.set_response_content_type(idx, request.content_type)
            telemetry.per_class(
                self.meta.class_names,
                class_fractions(mask, self.meta.num_classes),
                class_confidences(mask, confidence, self.meta.num_classes),
            )
        done = time.perf_counter()
        telemetry.observe("segserve_preprocess_seconds", preprocessed - start)
        telemetry.observe("segserve_inference_seconds", inferred - preprocessed)
        telemetry.observe("segserve_postprocess_seconds", done - inferred)
        telemetry.observe("segserve_batch_size", len(accepted))
        logger.info(
            "segserve batch: %d request(s), %d image(s) in one forward %s",
            len(data),
            len(accepted),
            tuple(batch.shape),
        )
        return responses

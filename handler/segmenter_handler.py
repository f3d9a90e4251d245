"""TorchServe entry point: a thin ``BaseHandler`` adapter over segserve's pure functions.

Per TorchServe batch (``handle``), every stage but the forward is per request:

1. every item is parsed, decoded and resized on its own; a bad item gets its own JSON error
   (``context.set_response_status(code, phrase, idx)``) and never fails its batch-mates;
2. the accepted images go through the model in ONE forward (``handler.preprocessing.collate``);
   a model that raises, or answers in a shape its metadata does not describe, fails every
   request of the batch with a 500 JSON of its own (the model is broken, not the requests);
3. each prediction is cropped/upsampled to its image's size, arg-maxed and encoded in the
   format that request asked for, with a per-request Content-Type; a format that cannot hold
   the image (JPEG past 65500 px) or an answer above the server's ``max_response_size`` is
   that request's own 400/413, any other failure its own 500.

What reaches TorchServe's wire protocol is short ASCII only (see ``handler.errors``): the
status phrase is the standard one for the code, and client input is quoted only inside the
JSON body, bounded and escaped. A non-ASCII phrase would kill the worker with its batch.

TorchServe 0.12 facts this relies on (read from ts/ and the frontend source): per-index status
and Content-Type reach REST clients; a gRPC ``Predictions`` call has no status per item, so an
error arrives there as a successful call whose bytes are the JSON error body.

Switches (``handler:`` section of the archive's model-config.yaml, else metadata ``serving``):
``max_pixels`` (decode limit), ``max_response_size`` (bytes; the environment variable
``TS_MAX_RESPONSE_SIZE`` wins, which ``serving.server`` sets from config.properties and the
worker inherits from the frontend), ``cuda_half``, ``cuda_channels_last`` (CUDA only; CPU is
exact fp32).

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

from handler.errors import InputError, quote_input  # noqa: E402
from handler.imaging import DEFAULT_MAX_PIXELS, decode_image  # noqa: E402
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

# The frontend's own default max_response_size: the safe bound when nothing else says more.
TORCHSERVE_MAX_RESPONSE_SIZE = 6_553_500
MAX_RESPONSE_SIZE_ENV = "TS_MAX_RESPONSE_SIZE"
# Request-level headers TorchServe itself adds to gRPC sequence requests (not HTTP headers).
_TS_SEQUENCE_HEADER_PREFIX = "ts_request_sequence"


def came_over_grpc(headers: Any) -> bool:
    """True for a gRPC request: it has no HTTP headers, only per-input ``{"content-type"}``.

    Every REST request carries HTTP headers (Host, Content-Length or Content-Type at least),
    which TorchServe passes as strings; gRPC inputs arrive as dicts keyed by input name.

    >>> came_over_grpc({"data": {"content-type": ""}}), came_over_grpc({"Host": "x"})
    (True, False)
    """
    return not any(
        isinstance(value, str) and not str(key).lower().startswith(_TS_SEQUENCE_HEADER_PREFIX)
        for key, value in (headers or {}).items()
    )


def _max_response_size(options: dict) -> int:
    value = os.environ.get(MAX_RESPONSE_SIZE_ENV) or options.get("max_response_size")
    try:
        return int(value) if value else TORCHSERVE_MAX_RESPONSE_SIZE
    except ValueError:
        logger.warning("ignoring %s=%r: not a number of bytes", MAX_RESPONSE_SIZE_ENV, value)
        return TORCHSERVE_MAX_RESPONSE_SIZE


def _unexpected(stage: str, exc: BaseException) -> InputError:
    """A per-request 500 for a failure no rule expected; the worker log has the traceback."""
    return InputError(
        "internal",
        f"could not {stage} this image ({type(exc).__name__} {quote_input(exc, 200)}); the "
        "other requests were answered: see the worker log",
    )


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
        self.max_response_size = _max_response_size(options)
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
            "half=%s, channels_last=%s, max_pixels=%d, max_response_size=%d, batch_size=%s",
            Path(__file__).resolve(),
            Path(sys.modules["handler"].__file__).resolve().parent,
            self.meta.model_name,
            self.meta.model_version,
            self.meta.num_classes,
            self.device,
            self.half,
            self.channels_last,
            self.max_pixels,
            self.max_response_size,
            properties.get("batch_size"),
        )

    def _reject(self, context, idx: int, error: InputError, telemetry: Telemetry) -> bytes:
        telemetry.rejected(error.reason)
        # The phrase is framed by character count but sent as UTF-8 (ts 0.12): ASCII only.
        context.set_response_status(error.status, error.phrase, idx)
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
                error = InputError("bad_request", f"could not read the image: {quote_input(exc)}")
                responses[idx] = self._reject(context, idx, error, telemetry)
                continue
            accepted.append((idx, request, rgb))
            telemetry.observe("segserve_input_megapixels", rgb.shape[0] * rgb.shape[1] / 1e6)
        return responses, accepted

    @torch.inference_mode()
    def _run_model(self, batch: torch.Tensor) -> Any:
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        if self.half:
            batch = batch.half()
        logits = self.model(batch)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # so the inference timer measures the forward
        return logits

    def _forward(self, batch: torch.Tensor) -> Any:
        try:
            return self._run_model(batch)
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

    def _prepare(self, context, accepted: list, responses: list, telemetry: Telemetry) -> list:
        """Resize/normalise each accepted image on its own: (idx, request, rgb, x, geometry)."""
        prepared = []
        for idx, request, rgb in accepted:
            try:
                x, geometry = prepare_image(
                    rgb_array_to_tensor(rgb).to(self.device), self.meta.preprocess
                )
            except Exception as exc:  # noqa: BLE001 - one image must not fail its batch
                logger.warning("request %s: preprocessing failed", idx, exc_info=True)
                responses[idx] = self._reject(context, idx, _unexpected("resize", exc), telemetry)
                continue
            prepared.append((idx, request, rgb, x, geometry))
        return prepared

    def _model_output_error(self, logits: Any, batch: torch.Tensor) -> InputError | None:
        """None when the logits are ``(N, num_classes, h, w)``, else the error for each request."""
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else None
        n, _, h, w = batch.shape
        if shape == (n, self.meta.num_classes, h, w):
            return None
        logger.error(
            "model output %s for input %s; metadata says %d classes",
            shape or type(logits).__name__,
            tuple(batch.shape),
            self.meta.num_classes,
        )
        return InputError(
            "model_output",
            f"the model answered {shape or type(logits).__name__} for a batch of shape "
            f"{tuple(batch.shape)}, but archive {self.meta.model_name} v"
            f"{self.meta.model_version} says (N, {self.meta.num_classes} classes, H, W): "
            "the model and its metadata disagree; re-export and re-archive it",
        )

    def _answer(self, request, rgb, logits: torch.Tensor, geometry) -> tuple[bytes, tuple]:
        """One request's body and its per-class statistics, or an :class:`InputError`."""
        mask_t, confidence_t = logits_to_prediction(logits, geometry)
        mask, confidence = mask_t.cpu().numpy(), confidence_t.cpu().numpy()
        body = encode_output(request.output, rgb, mask, confidence, self.meta)
        if len(body) > self.max_response_size:
            raise InputError(
                "response_too_large",
                f"the {request.output} answer is {len(body):,} bytes, above this server's "
                f"max_response_size of {self.max_response_size:,}: ask for output=mask "
                "(the smallest) or send a smaller image",
            )
        stats = (
            class_fractions(mask, self.meta.num_classes),
            class_confidences(mask, confidence, self.meta.num_classes),
        )
        return body, stats

    def _postprocess(self, context, prepared, logits, responses, telemetry: Telemetry) -> None:
        for j, (idx, request, rgb, _, geometry) in enumerate(prepared):
            try:
                body, (fractions, confidences) = self._answer(request, rgb, logits[j], geometry)
            except InputError as error:
                responses[idx] = self._reject(context, idx, error, telemetry)
                continue
            except Exception as exc:  # noqa: BLE001 - one answer must not fail its batch
                logger.warning("request %s: post-processing failed", idx, exc_info=True)
                error = _unexpected("encode the answer for", exc)
                responses[idx] = self._reject(context, idx, error, telemetry)
                continue
            responses[idx] = body
            context.set_response_content_type(idx, request.content_type)
            telemetry.per_class(self.meta.class_names, fractions, confidences)

    def handle(self, data: list, context) -> list:
        self.context = context
        telemetry = Telemetry(context.metrics)
        start = time.perf_counter()
        try:
            return self._handle(data, context, telemetry, start)
        finally:
            telemetry.handler_time(start)

    def _handle(self, data: list, context, telemetry: Telemetry, start: float) -> list:
        for idx in range(len(data)):
            if came_over_grpc(context.get_all_request_header(idx)):
                # gRPC StreamPredictions: our one answer is the stream's last chunk; without
                # this header TorchServe 0.12 waits for more and kills the worker. Predictions
                # ignores it. Never on REST: there it switches the reply to chunked streaming,
                # and "false" as the first chunk leaves the client waiting until its timeout.
                context.set_response_header(idx, "ts_stream_next", "false")
        responses, accepted = self._accept(context, data, telemetry)
        prepared = self._prepare(context, accepted, responses, telemetry)
        if not prepared:
            return responses
        batch = collate([x for *_, x, _ in prepared], self.meta.preprocess)
        preprocessed = time.perf_counter()
        logits = self._forward(batch)
        inferred = time.perf_counter()
        error = self._model_output_error(logits, batch)
        if error is not None:
            for idx, *_ in prepared:
                responses[idx] = self._reject(context, idx, error, telemetry)
            return responses
        self._postprocess(context, prepared, logits, responses, telemetry)
        done = time.perf_counter()
        telemetry.observe("segserve_preprocess_seconds", preprocessed - start)
        telemetry.observe("segserve_inference_seconds", inferred - preprocessed)
        telemetry.observe("segserve_postprocess_seconds", done - inferred)
        telemetry.observe("segserve_batch_size", len(prepared))
        logger.info(
            "segserve batch: %d request(s), %d image(s) in one forward %s",
            len(data),
            len(prepared),
            tuple(batch.shape),
        )
        return responses

"""TorchServe entry point: a thin ``BaseHandler`` adapter over segserve's pure functions.

TorchServe's own ``BaseHandler.handle`` drives each batch through ``preprocess → inference →
postprocess`` (and emits ``HandlerTime``); every stage but the forward is per request:

1. ``preprocess``: every item is parsed, decoded and resized on its own; a bad item gets its
   own JSON error (``context.set_response_status(code, phrase, idx)``) and never fails its
   batch-mates;
2. ``inference``: the accepted images go through the model in ONE forward
   (``handler.preprocessing.collate``); a model that raises, or answers in a shape its
   metadata does not describe, fails every request of the batch with a 500 JSON of its own
   (the model is broken, not the requests);
3. ``postprocess``: each prediction is cropped/upsampled to its image's size, arg-maxed and
   encoded in the format that request asked for, with a per-request Content-Type; a format
   that cannot hold the image (JPEG past 65500 px) or an answer above the server's
   ``max_response_size`` is that request's own 400/413, any other failure its own 500.

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
exact fp32), ``cuda_jpeg_decode`` (CUDA only, on unless false: plain JPEGs are decoded by
nvJPEG on the GPU, :mod:`handler.pixels`), ``drift_every_s`` (the per-class drift histograms
observe one image per worker per this many seconds, :data:`handler.drift.DRIFT_EVERY_S`;
0 = every image).

This module defines exactly one class: TorchServe's loader requires it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
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

from handler.artifact import METADATA_FILE, MODEL_FILE, TORCHSCRIPT, load_metadata  # noqa: E402
from handler.batch import Batch, PreparedImage  # noqa: E402
from handler.drift import drift_interval, image_statistics  # noqa: E402
from handler.errors import InputError, quote_input  # noqa: E402
from handler.imaging import DEFAULT_MAX_PIXELS  # noqa: E402
from handler.pixels import can_decode_jpegs_on_device, decode_to_device  # noqa: E402
from handler.postprocess import NEEDS_CONFIDENCE, NEEDS_IMAGE, encode_output  # noqa: E402
from handler.preprocessing import collate, logits_to_prediction, prepare_image  # noqa: E402
from handler.request import ParsedRequest, parse_request  # noqa: E402
from handler.runtime import CudaSwitched, load_model  # noqa: E402
from handler.sampling import LowConfidenceSampler, mean_confidence  # noqa: E402
from handler.sizing import worker_threads  # noqa: E402
from handler.telemetry import Telemetry  # noqa: E402

logger = logging.getLogger(__name__)
# How often a worker re-sends the drift baseline gauges (seconds; the first batch sends them).
REFERENCE_EVERY_S = 60.0

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
        self._reference_sent_at = -math.inf
        self._drift_observed_at = -math.inf
        # Off unless SEGSERVE_SAMPLE_DIR is set; a bad setting fails the model load, named.
        self.sampler = LowConfidenceSampler.from_environment()
        properties = context.system_properties
        model_dir = Path(properties["model_dir"])
        meta = load_metadata(model_dir / METADATA_FILE)
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
        self.drift_every_s = drift_interval(options)
        gpu_id = properties.get("gpu_id")
        if gpu_id is not None and torch.cuda.is_available():
            self.device = torch.device(f"cuda:{gpu_id}")
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        on_cuda = self.device.type == "cuda"
        # Workers x threads = the container's cores (handler.sizing): without this every worker
        # starts one thread per core, and N workers oversubscribe the CPU N times.
        pinned = (getattr(context, "model_yaml_config", None) or {}).get("minWorkers")
        self.threads = worker_threads(
            gpus=torch.cuda.device_count() if on_cuda else 0,
            workers=int(pinned) if pinned else None,
            threads=int(options["threads"]) if options.get("threads") else None,
        )
        torch.set_num_threads(self.threads)
        self.half = on_cuda and bool(options.get("cuda_half", self.meta.serving.cuda_half))
        self.channels_last = on_cuda and bool(
            options.get("cuda_channels_last", self.meta.serving.cuda_channels_last)
        )
        self.jpegs_on_device = (
            on_cuda and bool(options.get("cuda_jpeg_decode", True)) and can_decode_jpegs_on_device()
        )
        serialized = context.manifest["model"].get("serializedFile", MODEL_FILE)
        # The archive's runtime (model-config.yaml handler.runtime); half/channels_last are
        # TorchScript switches, so an ONNX Runtime model runs as exported.
        self.runtime = str(options.get("runtime", TORCHSCRIPT))
        if self.runtime != TORCHSCRIPT:
            self.half = self.channels_last = False
        self.model = load_model(model_dir / serialized, self.runtime, self.device, self.threads)
        if self.half or self.channels_last:
            self.model = CudaSwitched(self.model, self.half, self.channels_last)
        providers = getattr(self.model, "providers", ("torch.jit",))
        logger.info("segserve runtime %s on %s", self.runtime, ", ".join(providers))
        self.initialized = True
        logger.info(
            "segserve handler %s (handler package %s): model %s v%s, %d classes, device %s, "
            "half=%s, channels_last=%s, JPEGs decoded on the device=%s, max_pixels=%d, "
            "max_response_size=%d, batch_size=%s, "
            "torch threads %d",
            Path(__file__).resolve(),
            Path(sys.modules["handler"].__file__).resolve().parent,
            self.meta.model_name,
            self.meta.model_version,
            self.meta.num_classes,
            self.device,
            self.half,
            self.channels_last,
            self.jpegs_on_device,
            self.max_pixels,
            self.max_response_size,
            properties.get("batch_size"),
            torch.get_num_threads(),  # what torch really runs with, not what we asked for
        )

    # TorchServe's BaseHandler.handle runs preprocess → inference → postprocess and emits
    # HandlerTime. It would also switch to explain/describe modes on a request header of that
    # name, answering one item for a whole batch (which fails every batch-mate): a client's
    # header must never do that, and this model offers neither mode.
    def _is_explain(self) -> bool:
        return False

    def _is_describe(self) -> bool:
        return False

    def preprocess(self, data: list) -> Batch:
        """Parse, decode and resize each request on its own, then collate the accepted ones."""
        context = self.context
        batch = Batch([None] * len(data), Telemetry(context.metrics), time.perf_counter())
        for idx in range(len(data)):
            if came_over_grpc(context.get_all_request_header(idx)):
                # gRPC StreamPredictions: our one answer is the stream's last chunk; without
                # this header TorchServe 0.12 waits for more and kills the worker. Predictions
                # ignores it. Never on REST: there it switches the reply to chunked streaming,
                # and "false" as the first chunk leaves the client waiting until its timeout.
                context.set_response_header(idx, "ts_stream_next", "false")
        parsed = [(idx, self._parse(idx, item, batch)) for idx, item in enumerate(data)]
        parsed = [(idx, request) for idx, request in parsed if request is not None]
        decoded = decode_to_device(
            [request.image for _, request in parsed],
            self.max_pixels,
            self.device,
            jpegs_on_device=self.jpegs_on_device,
        )
        for (idx, request), pixels in zip(parsed, decoded, strict=True):
            if isinstance(pixels, InputError):
                batch.responses[idx] = self._reject(idx, pixels, batch)
                continue
            megapixels = pixels.shape[1] * pixels.shape[2] / 1e6
            batch.telemetry.observe("segserve_input_megapixels", megapixels)
            self._prepare(idx, request, pixels, batch)
        if batch.prepared:
            batch.inputs = collate([p.tensor for p in batch.prepared], self.meta.preprocess)
        batch.preprocessed_at = time.perf_counter()
        return batch

    def inference(self, batch: Batch, *args, **kwargs) -> Batch:
        """ONE forward for every accepted image; a broken model fails the batch with a 500."""
        if batch.inputs is not None:
            batch.logits = self._forward(batch.inputs)
        batch.inferred_at = time.perf_counter()
        return batch

    def postprocess(self, batch: Batch) -> list:
        """Each prediction back at its image's size, encoded as its request asked."""
        if batch.inputs is None:
            return batch.responses
        error = self._model_output_error(batch.logits, batch.inputs)
        for j, image in enumerate(batch.prepared):
            if error is not None:
                batch.responses[image.idx] = self._reject(image.idx, error, batch)
            else:
                self._answer(image, batch.logits[j], batch)
        if error is not None:
            return batch.responses
        done, telemetry = time.perf_counter(), batch.telemetry
        telemetry.observe("segserve_preprocess_seconds", batch.preprocessed_at - batch.start)
        telemetry.observe("segserve_inference_seconds", batch.inferred_at - batch.preprocessed_at)
        telemetry.observe("segserve_postprocess_seconds", done - batch.inferred_at)
        telemetry.observe("segserve_batch_size", len(batch.prepared))
        reference = self.meta.drift_reference
        if reference is not None and done - self._reference_sent_at >= REFERENCE_EVERY_S:
            telemetry.reference(reference)
            self._reference_sent_at = done
        logger.info(
            "segserve batch: %d request(s), %d image(s) in one forward %s",
            len(batch.responses),
            len(batch.prepared),
            tuple(batch.inputs.shape),
        )
        return batch.responses

    def _reject(self, idx: int, error: InputError, batch: Batch) -> bytes:
        batch.telemetry.rejected(error.reason)
        # The phrase is framed by character count but sent as UTF-8 (ts 0.12): ASCII only.
        self.context.set_response_status(error.status, error.phrase, idx)
        self.context.set_response_content_type(idx, "application/json")
        logger.info("request %s refused (%d %s): %s", idx, error.status, error.reason, error)
        return json.dumps(error.body()).encode()

    def _parse(self, idx: int, item: Any, batch: Batch) -> ParsedRequest | None:
        """The parsed request, else None with its error answer filled in."""
        try:
            return parse_request(item, self.context.get_all_request_header(idx))
        except InputError as error:
            batch.responses[idx] = self._reject(idx, error, batch)
        except Exception as exc:  # noqa: BLE001 - odd input must not kill the worker
            logger.warning("request %s: unexpected request failure", idx, exc_info=True)
            error = InputError("bad_request", f"could not read the request: {quote_input(exc)}")
            batch.responses[idx] = self._reject(idx, error, batch)
        return None

    def _prepare(
        self, idx: int, request: ParsedRequest, pixels: torch.Tensor, batch: Batch
    ) -> None:
        """Resize/normalise one decoded image into ``batch.prepared``."""
        try:
            x, geometry = prepare_image(pixels, self.meta.preprocess)
        except Exception as exc:  # noqa: BLE001 - one image must not fail its batch
            logger.warning("request %s: preprocessing failed", idx, exc_info=True)
            batch.responses[idx] = self._reject(idx, _unexpected("resize", exc), batch)
            return
        batch.prepared.append(PreparedImage(idx, request, pixels, x, geometry))

    @torch.inference_mode()
    def _run_model(self, inputs: torch.Tensor) -> Any:
        logits = self.model(inputs)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # so the inference timer measures the forward
        return logits

    def _forward(self, inputs: torch.Tensor) -> Any:
        try:
            return self._run_model(inputs)
        except Exception as exc:
            # A model bug is not overload: without this TorchServe answers 503 "Prediction
            # failed", which clients retry and dashboards read as "busy". CUDA errors keep
            # TorchServe's own mapping (507 Out of resources).
            if "CUDA" in str(exc):
                raise
            logger.error("model forward failed on %s", tuple(inputs.shape), exc_info=True)
            # TorchScript puts its interpreter traceback first and the actual error last.
            last_line = (str(exc).strip().splitlines() or [""])[-1][:300]
            raise PredictionException(
                f"model forward failed ({type(exc).__name__}: {last_line}); the model in "
                f"archive {self.meta.model_name} v{self.meta.model_version} is broken, not the "
                "request: see the worker log",
                500,
            ) from exc

    def _model_output_error(self, logits: Any, inputs: torch.Tensor) -> InputError | None:
        """None when the logits are ``(N, num_classes, h, w)``, else the error for each request."""
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else None
        n, _, h, w = inputs.shape
        if shape == (n, self.meta.num_classes, h, w):
            return None
        logger.error(
            "model output %s for input %s; metadata says %d classes",
            shape or type(logits).__name__,
            tuple(inputs.shape),
            self.meta.num_classes,
        )
        return InputError(
            "model_output",
            f"the model answered {shape or type(logits).__name__} for a batch of shape "
            f"{tuple(inputs.shape)}, but archive {self.meta.model_name} v"
            f"{self.meta.model_version} says (N, {self.meta.num_classes} classes, H, W): "
            "the model and its metadata disagree; re-export and re-archive it",
        )

    def _encode(self, image: PreparedImage, logits: torch.Tensor) -> tuple[bytes, Any]:
        """One request's body and its class mask (numpy), or an :class:`InputError`."""
        output = image.request.output
        mask_t, confidence_t = logits_to_prediction(
            logits, image.geometry, with_confidence=output in NEEDS_CONFIDENCE
        )
        mask = mask_t.cpu().numpy()
        confidence = confidence_t.cpu().numpy() if confidence_t is not None else None
        rgb = image.host_rgb() if output in NEEDS_IMAGE else None
        body = encode_output(output, rgb, mask, confidence, self.meta)
        if len(body) > self.max_response_size:
            raise InputError(
                "response_too_large",
                f"the {output} answer is {len(body):,} bytes, above this server's "
                f"max_response_size of {self.max_response_size:,}: ask for output=mask "
                "(the smallest) or send a smaller image",
            )
        return body, mask

    def _answer(self, image: PreparedImage, logits: torch.Tensor, batch: Batch) -> None:
        """Fill in one request's answer; its own failure is its own error answer."""
        try:
            body, mask = self._encode(image, logits)
        except InputError as error:
            batch.responses[image.idx] = self._reject(image.idx, error, batch)
            return
        except Exception as exc:  # noqa: BLE001 - one answer must not fail its batch
            logger.warning("request %s: post-processing failed", image.idx, exc_info=True)
            error = _unexpected("encode the answer for", exc)
            batch.responses[image.idx] = self._reject(image.idx, error, batch)
            return
        batch.responses[image.idx] = body
        self.context.set_response_content_type(image.idx, image.request.content_type)
        self._observe(image, logits, mask, batch)

    def _observe(self, image: PreparedImage, logits: torch.Tensor, mask: Any, batch: Batch) -> None:
        """Drift histograms (one image per ``drift_every_s``) and the low-confidence sampler:
        the per-class statistics are computed only when one of them takes this image."""
        now = time.perf_counter()
        observe = now - self._drift_observed_at >= self.drift_every_s
        if not observe and self.sampler is None:
            return
        try:
            # Per-class confidence at the model's resolution: the same statistic for every
            # output format, without upsampling every class's logits.
            fractions, confidences = image_statistics(
                mask, logits, image.geometry, self.meta.num_classes
            )
        except Exception:  # noqa: BLE001 - statistics must never fail an answer
            logger.warning("request %s: drift statistics failed", image.idx, exc_info=True)
            return
        if observe:
            batch.telemetry.per_class(self.meta.class_names, fractions, confidences)
            self._drift_observed_at = now
        if self.sampler is not None:
            self._offer_sample(image, fractions, confidences)

    def _offer_sample(self, image: PreparedImage, fractions, confidences) -> None:
        """The active-learning hook (handler.sampling); it never fails the answer."""
        try:
            self.sampler.offer(
                image.request.image,
                mean_confidence(fractions, confidences),
                {
                    "model_name": self.meta.model_name,
                    "model_version": self.meta.model_version,
                    "class_pixel_fraction": dict(
                        zip(self.meta.class_names, map(float, fractions), strict=True)
                    ),
                },
            )
        except Exception:  # noqa: BLE001
            logger.warning("low-confidence sampling failed", exc_info=True)

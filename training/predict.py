"""Offline prediction with an exported model: the same decode, preprocessing and postprocessing
as the TorchServe handler, so an offline mask equals a served one.

Images are decoded by :func:`handler.imaging.decode_image` (EXIF orientation applied), prepared
by :func:`handler.preprocessing.prepare_image`, batched by ``collate`` and turned back into
full-resolution masks by ``logits_to_prediction``. Pure torch; CPU unless told otherwise.

Example:
    >>> predictor = Predictor.from_export(Path("runs/default/export"))  # doctest: +SKIP
    >>> mask, confidence = predictor.predict_file(Path("street.jpg"))  # doctest: +SKIP
    >>> mask.shape == confidence.shape, mask.dtype, confidence.dtype  # doctest: +SKIP
    (True, dtype('uint8'), dtype('float32'))
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from handler.artifact import TORCHSCRIPT, MetadataError, ModelMetadata, runtime_export
from handler.errors import InputError
from handler.imaging import DEFAULT_MAX_PIXELS, decode_image
from handler.preprocessing import (
    PreprocessSpec,
    collate,
    logits_to_prediction,
    padded_size,
    prepare_image,
    rgb_array_to_tensor,
)
from handler.runtime import load_model
from training import export

Prediction = tuple[np.ndarray, np.ndarray]
Model = Callable[[torch.Tensor], torch.Tensor]


class PredictError(ValueError):
    """An image or export the predictor cannot use; the message names the file and the fix."""


@torch.inference_mode()
def segment(
    model: Model, images: Sequence[np.ndarray], spec: PreprocessSpec, device: str = "cpu"
) -> list[Prediction]:
    """RGB uint8 images → (class-id mask, confidence float32) at each image's own size.

    Images whose prepared tensors pad to the same size share one forward; others get their
    own, so every image is padded exactly as it would be alone (under the ``pad`` policy the
    padding changes what the network sees near the border). Under ``resize`` all images
    share one forward.

    Example:
        >>> spec = PreprocessSpec(input_size=(32, 32))
        >>> model = lambda x: torch.zeros(x.shape[0], 2, *x.shape[2:])
        >>> [m.shape for m, _ in segment(model, [np.zeros((5, 7, 3), np.uint8)], spec)]
        [(5, 7)]
    """
    # torch warns on read-only arrays (e.g. np.asarray of a PIL image); copy only those.
    writable = [rgb if rgb.flags.writeable else rgb.copy() for rgb in images]
    prepared = [prepare_image(rgb_array_to_tensor(rgb).to(device), spec) for rgb in writable]
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, (x, _) in enumerate(prepared):
        groups[padded_size([(int(x.shape[1]), int(x.shape[2]))], spec.size_divisor)].append(i)
    results: list[Prediction | None] = [None] * len(images)
    for indices in groups.values():
        logits = model(collate([prepared[i][0] for i in indices], spec))
        for row, i in enumerate(indices):
            mask, confidence = logits_to_prediction(logits[row], prepared[i][1])
            results[i] = (mask.cpu().numpy(), confidence.cpu().numpy())
    return results  # type: ignore[return-value]


class Predictor:
    """An exported model plus its metadata, ready to segment images.

    Example:
        >>> predictor = Predictor.from_export(Path("runs/default/export"))  # doctest: +SKIP
        >>> mask, conf = predictor.predict(np.zeros((61, 83, 3), np.uint8))  # doctest: +SKIP
        >>> mask.shape  # doctest: +SKIP
        (61, 83)
    """

    def __init__(
        self,
        model: Model,
        metadata: ModelMetadata,
        device: str = "cpu",
        max_pixels: int = DEFAULT_MAX_PIXELS,
        runtime: str = TORCHSCRIPT,
    ) -> None:
        self.model = model
        self.metadata = metadata
        self.spec = metadata.preprocess
        self.device = device
        self.max_pixels = max_pixels
        self.runtime = runtime

    @classmethod
    def from_export(
        cls,
        export_dir: Path,
        device: str = "cpu",
        max_pixels: int = DEFAULT_MAX_PIXELS,
        runtime: str = TORCHSCRIPT,
    ) -> Predictor:
        """Load ``export_dir``'s model for ``runtime`` (``handler.artifact.RUNTIMES``; default
        TorchScript, ``model.pt``) and its ``metadata.json``, through the loader the handler
        uses (``handler.runtime.load_model``): the offline reference of that runtime's archive.
        """
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise PredictError(f"device {device!r} requested but CUDA is not available; use cpu")
        export_dir = Path(export_dir)
        model, metadata = export.load_exported(export_dir, device)
        if runtime != TORCHSCRIPT:
            try:
                path = export_dir / runtime_export(metadata, runtime).file
            except MetadataError as exc:
                raise PredictError(f"{export_dir}: {exc}") from None
            if not path.is_file():
                raise PredictError(
                    f"{path} is missing although metadata.json lists it: re-run the export"
                )
            model = load_model(path, runtime, device, threads=torch.get_num_threads())
        return cls(model, metadata, device=device, max_pixels=max_pixels, runtime=runtime)

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.metadata.class_names

    def predict(self, image: np.ndarray) -> Prediction:
        """RGB uint8 ``(H, W, 3)`` → (mask ``(H, W)``, confidence ``(H, W)`` float32); the mask
        is uint8 up to 256 classes (``handler.preprocessing.mask_dtype``)."""
        return self.predict_batch([image])[0]

    def predict_batch(self, images: list[np.ndarray]) -> list[Prediction]:
        """Several images, each answered at its own size (see :func:`segment`)."""
        if not images:
            return []
        for i, image in enumerate(images):
            if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
                shape = getattr(image, "shape", type(image).__name__)
                raise PredictError(f"image {i}: expected an RGB (H, W, 3) array, got {shape}")
            if image.dtype != np.uint8:
                raise PredictError(
                    f"image {i}: expected uint8 pixels 0..255, got {image.dtype}; "
                    "convert with np.clip(x, 0, 255).astype(np.uint8)"
                )
        return segment(self.model, images, self.spec, self.device)

    def predict_file(self, path: Path) -> Prediction:
        """Decode an image file exactly as the handler decodes an upload, then predict."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise PredictError(f"{path}: cannot read the image ({exc.strerror})") from None
        try:
            rgb = decode_image(data, self.max_pixels)
        except InputError as exc:
            raise PredictError(f"{path}: {exc.message}") from None
        return self.predict(rgb)

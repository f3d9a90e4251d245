"""Offline prediction with an exported model: the same decode, preprocessing and postprocessing
as the TorchServe handler, so an offline mask equals a served one.

Image files are decoded by :func:`handler.pixels.decode_to_device` (EXIF orientation applied;
on a CUDA device plain JPEGs by nvJPEG, as the handler decodes them there), prepared
by :func:`handler.preprocessing.prepare_image`, batched by ``collate`` and turned back into
full-resolution masks by ``logits_to_prediction``. Pure torch; CPU unless told otherwise.
:func:`write_predictions` segments files or folders (``python -m training predict``) into
class-id mask PNGs and overlays; test-time augmentation and sliding windows
(:mod:`training.inference`) are opt-in there and never change :class:`Predictor`'s own path.

Example:
    >>> predictor = Predictor.from_export(Path("runs/default/export"))  # doctest: +SKIP
    >>> mask, confidence = predictor.predict_file(Path("street.jpg"))  # doctest: +SKIP
    >>> mask.shape == confidence.shape, mask.dtype, confidence.dtype  # doctest: +SKIP
    (True, dtype('uint8'), dtype('float32'))
"""

from __future__ import annotations

import io
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from handler.artifact import TORCHSCRIPT, MetadataError, ModelMetadata, runtime_export
from handler.errors import InputError
from handler.imaging import DEFAULT_MAX_PIXELS, encode_mask_png, encode_overlay
from handler.pixels import (
    can_decode_jpegs_on_device,
    decode_to_device,
    host_rgb,
    host_to_device,
)
from handler.preprocessing import (
    PreprocessSpec,
    collate,
    logits_to_prediction,
    padded_size,
    prepare_image,
)
from handler.runtime import load_model
from training import export

if TYPE_CHECKING:
    from training.inference import InferenceOptions

Prediction = tuple[np.ndarray, np.ndarray]
Model = Callable[[torch.Tensor], torch.Tensor]


class PredictError(ValueError):
    """An image or export the predictor cannot use; the message names the file and the fix."""


@torch.inference_mode()
def segment(
    model: Model,
    images: Sequence[np.ndarray | torch.Tensor],
    spec: PreprocessSpec,
    device: str = "cpu",
) -> list[Prediction]:
    """RGB uint8 images (``(H, W, 3)`` arrays, or ``(3, H, W)`` tensors on ``device`` as
    :func:`handler.pixels.decode_to_device` gives them) → (class-id mask, confidence float32)
    at each image's own size.

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
    on = torch.device(device)
    pixels = [rgb if isinstance(rgb, torch.Tensor) else host_to_device(rgb, on) for rgb in images]
    prepared = [prepare_image(x, spec) for x in pixels]
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
        jpegs_on_device: bool | None = None,
    ) -> None:
        self.model = model
        self.metadata = metadata
        self.spec = metadata.preprocess
        self.device = device
        self.max_pixels = max_pixels
        self.runtime = runtime
        # As the handler decodes: plain JPEGs on a CUDA device (its cuda_jpeg_decode option).
        if jpegs_on_device is None:
            jpegs_on_device = torch.device(device).type == "cuda" and can_decode_jpegs_on_device()
        self.jpegs_on_device = jpegs_on_device

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

    def read_pixels(self, path: Path) -> torch.Tensor:
        """Decode an image file exactly as the handler decodes an upload on this device:
        ``(3, H, W)`` uint8 there."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise PredictError(f"{path}: cannot read the image ({exc.strerror})") from None
        [pixels] = decode_to_device(
            [data], self.max_pixels, torch.device(self.device), self.jpegs_on_device
        )
        if isinstance(pixels, InputError):
            raise PredictError(f"{path}: {pixels.message}")
        return pixels

    def read_image(self, path: Path) -> np.ndarray:
        """:meth:`read_pixels` as an RGB uint8 ``(H, W, 3)`` array."""
        return host_rgb(self.read_pixels(path))

    def predict_pixels(self, pixels: torch.Tensor) -> Prediction:
        """:meth:`predict` for ``(3, H, W)`` uint8 pixels on this device (:meth:`read_pixels`)."""
        return segment(self.model, [pixels], self.spec, self.device)[0]

    def predict_file(self, path: Path) -> Prediction:
        """Decode an image file exactly as the handler decodes an upload, then predict."""
        return self.predict_pixels(self.read_pixels(path))


def list_images(inputs: Sequence[Path]) -> list[Path]:
    """Image files named by ``inputs``: files as given, folders' image files (by suffix, not
    recursive) sorted by name. A missing path or a folder without images is a PredictError.

    Example:
        >>> list_images([Path("no/such/dir")])  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        PredictError: no/such/dir: no such file or folder; ...
    """
    from training.datasets import IMAGE_SUFFIXES

    found: list[Path] = []
    for path in map(Path, inputs):
        if path.is_dir():
            images = sorted(
                p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
            if not images:
                raise PredictError(
                    f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder "
                    "(subfolders are not searched); pass the folder that holds them"
                )
            found += images
        elif path.is_file():
            found.append(path)
        else:
            raise PredictError(f"{path}: no such file or folder; check --input")
    return found


@dataclass(frozen=True)
class WrittenPrediction:
    """One image's outputs: the class-id mask PNG, the overlay PNG, the mean confidence."""

    source: Path
    mask: Path
    overlay: Path
    mean_confidence: float


def mask_png(mask: np.ndarray, palette: Sequence[Sequence[int]]) -> bytes:
    """Class ids as PNG: a palette PNG (ids as pixel values, the dataset's colours for people)
    up to 256 classes, else 16-bit greyscale as the server answers."""
    if len(palette) > 256:
        return encode_mask_png(mask, len(palette))
    img = Image.fromarray(np.ascontiguousarray(mask.astype(np.uint8)), mode="P")
    img.putpalette([c for rgb in palette for c in rgb])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_predictions(
    predictor: Predictor,
    images: Sequence[Path],
    out_dir: Path,
    options: InferenceOptions | None = None,
) -> list[WrittenPrediction]:
    """Segment ``images`` into ``out_dir``: ``<stem>.png`` (class ids, see :func:`mask_png`)
    and ``<stem>_overlay.png`` (the served ``overlay`` output's bytes for the same mask).

    ``options`` (TTA, sliding window; :mod:`training.inference`) is opt-in: without it every
    mask is ``predictor.predict_file``'s, the served mask bit for bit.
    """
    out_dir = Path(out_dir)
    names: dict[str, Path] = {}
    for path in images:
        for name in (f"{path.stem}.png", f"{path.stem}_overlay.png"):
            if name in names:
                raise PredictError(
                    f"{path}: its output {name} would overwrite that of {names[name]}; rename "
                    "one of them or predict them into separate --out folders"
                )
            names[name] = path
    if any(Path(p).parent.resolve() == out_dir.resolve() for p in images):
        raise PredictError(f"{out_dir}: --out is the input folder itself; choose another folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    palette = predictor.metadata.palette
    written = []
    for path in map(Path, images):
        pixels = predictor.read_pixels(path)
        rgb = host_rgb(pixels)
        if options is None or options.is_plain:
            mask, confidence = predictor.predict_pixels(pixels)
        else:
            from training.inference import segment_with_options

            mask, confidence = segment_with_options(
                predictor.model, [rgb], predictor.spec, options, predictor.device
            )[0]
        mask_path, overlay_path = out_dir / f"{path.stem}.png", out_dir / f"{path.stem}_overlay.png"
        mask_path.write_bytes(mask_png(mask, palette))
        overlay_path.write_bytes(encode_overlay(rgb, mask, palette, "PNG"))
        written.append(WrittenPrediction(path, mask_path, overlay_path, float(confidence.mean())))
    return written

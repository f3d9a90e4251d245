"""What the handler can return, and how a prediction is decoded and saved.

Output formats (chosen per request by the gRPC field ``output``; REST sends the header
:data:`OUTPUT_HEADER`, the handler's ``handler.request.OUTPUT_HEADER``):

========  ==================  =====================================================
format    file written        content
========  ==================  =====================================================
mask      ``<stem>.mask.png``     8-bit PNG of class ids (default, most compact)
color     ``<stem>.color.png``    the mask coloured with the model's palette
overlay   ``<stem>.overlay.png``  palette blended over the input image
overlay_jpeg ``<stem>.overlay.jpg`` same as overlay, JPEG (smaller, lossy)
json      ``<stem>.json``         class ids as JSON (debugging; large)
========  ==================  =====================================================

Example:
    >>> output_path(Path("out"), Path("imgs/cat.jpg"), "mask").as_posix()
    'out/cat.mask.png'
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from client.errors import ConfigurationError

OUTPUT_FORMATS = ("mask", "color", "overlay", "overlay_jpeg", "json")
# The REST header that names the output format of a raw-body request (the handler reads it
# case-insensitively; tests/clients/test_live.py serves every format through it).
OUTPUT_HEADER = "X-Segserve-Output"
SUFFIXES = {
    "mask": ".mask.png",
    "color": ".color.png",
    "overlay": ".overlay.png",
    "overlay_jpeg": ".overlay.jpg",
    "json": ".json",
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def check_output(output: str) -> str:
    """``output`` if it is a known format, else a ConfigurationError listing the valid ones."""
    if output not in OUTPUT_FORMATS:
        raise ConfigurationError(f"output {output!r} is not one of {list(OUTPUT_FORMATS)}")
    return output


@dataclass(frozen=True)
class Prediction:
    """One answer: raw bytes as sent by the server, plus how to read them."""

    content: bytes
    output: str
    content_type: str = ""

    def mask(self) -> np.ndarray:
        """The class-id mask ``(H, W)`` uint8 (``output`` must be ``mask`` or ``json``)."""
        if self.output == "json":
            return json_mask(self.json())
        if self.output != "mask":
            raise ConfigurationError(f"a {self.output!r} prediction holds no class-id mask")
        return decode_png(self.content)

    def json(self) -> Any:
        return json.loads(self.content)


def json_mask(payload: Any) -> np.ndarray:
    """Class ids from a JSON answer.

    segserve's handler sends ``{"mask_format": "png/base64", "mask": "<base64 PNG>", ...}``;
    a stock-TorchServe-style answer is the per-pixel list of rows itself.
    """
    if isinstance(payload, list):
        return np.asarray(payload, dtype=np.uint8)
    if not isinstance(payload, dict) or "mask" not in payload:
        keys = sorted(payload) if isinstance(payload, dict) else type(payload).__name__
        raise ConfigurationError(f"JSON answer has no 'mask' field ({keys})")
    if payload.get("mask_format") == "png/base64":
        return decode_png(base64.b64decode(payload["mask"]))
    return np.asarray(payload["mask"], dtype=np.uint8)


def decode_png(content: bytes) -> np.ndarray:
    """PNG bytes → numpy array, with an error that says the bytes were not an image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(content)) as img:
            return np.asarray(img)
    except UnidentifiedImageError:
        head = content[:80].decode("utf-8", "replace")
        raise ConfigurationError(f"server answer is not an image: {head!r}") from None


def output_path(out_dir: Path, image_path: Path, output: str) -> Path:
    """Where the prediction for ``image_path`` goes inside ``out_dir``."""
    return out_dir / f"{image_path.stem}{SUFFIXES[check_output(output)]}"


def save_prediction(out_dir: Path, image_path: Path, prediction: Prediction) -> Path:
    """Write ``prediction`` next to its siblings in ``out_dir``; returns the file written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = output_path(out_dir, image_path, prediction.output)
    path.write_bytes(prediction.content)
    return path


def list_images(path: Path) -> list[Path]:
    """``path`` itself if it is a file, else the images directly inside the folder, sorted."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ConfigurationError(f"{path} is neither an image file nor a folder")
    images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ConfigurationError(f"folder {path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return images

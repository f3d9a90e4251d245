"""Images for load tests: a folder of real images, else the embedded synthetic scenes.

The synthetic scenes come from ``training.synthetic.write_samples`` (what the default model is
trained on, so the load resembles real use); if that module is unavailable, plain random-shape
PNGs are drawn here so a load test never depends on the training package.

Example:
    >>> images = load_images(None, n=2, size=(64, 64))
    >>> len(images), images[0][:8] == b"\\x89PNG\\r\\n\\x1a\\n"
    (2, True)
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class ImageSourceError(ValueError):
    """The image folder option points at nothing usable."""


def folder_images(folder: Path, limit: int | None = None) -> list[bytes]:
    """Encoded bytes of the images directly inside ``folder``, sorted by name."""
    if not folder.is_dir():
        raise ImageSourceError(f"--images {folder} is not a folder; give a folder of PNG/JPEG")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ImageSourceError(f"--images {folder} holds no {'/'.join(IMAGE_SUFFIXES)} files")
    return [p.read_bytes() for p in paths[:limit]]


def synthetic_images(n: int, size: tuple[int, int], seed: int = 0) -> list[bytes]:
    """``n`` validation scenes as PNG bytes (training's generator, else a local fallback)."""
    try:
        from training.synthetic import write_samples
    except ImportError:
        return [_fallback_png(i, size, seed) for i in range(n)]
    with tempfile.TemporaryDirectory() as tmp:
        return [p.read_bytes() for p in write_samples(tmp, n, seed=seed, size=size, split="val")]


def _fallback_png(index: int, size: tuple[int, int], seed: int) -> bytes:
    from PIL import Image, ImageDraw

    rng = np.random.default_rng([seed, index])
    h, w = size
    img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(3):
        x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
        box = (x0, y0, x0 + w // 3, y0 + h // 3)
        draw.ellipse(box, fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def load_images(
    folder: Path | None, n: int = 16, size: tuple[int, int] = (128, 128)
) -> list[bytes]:
    """The load test's image pool: up to ``n`` from ``folder``, else ``n`` synthetic scenes."""
    if n < 1:
        raise ImageSourceError(f"--num-images must be >= 1, got {n}")
    if folder is not None:
        return folder_images(folder, limit=n)
    return synthetic_images(n, size)

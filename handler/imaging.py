"""Bytes in, pixels out: decode an uploaded image safely, encode masks and overlays.

Pure functions, no TorchServe import, so they are unit-tested on synthetic bytes.

Decoding rules (:func:`decode_image`):

* Formats: JPEG (incl. CMYK, multi-picture MPO), PNG, WebP, BMP, TIFF, GIF; else a 415.
* The pixel limit is checked on the header's size *before* any pixel is decoded, so a
  decompression bomb costs a few hundred bytes of parsing, not gigabytes of memory.
* EXIF orientation is applied: a phone photo is segmented the way it is displayed.
* Multi-frame files (GIF, TIFF, MPO): the first frame.
* Decode work is bounded too: a JPEG with more than ``MAX_JPEG_SCANS`` scans (progressive
  files have about 10; thousands make libjpeg re-decode the whole picture each time) is
  refused from its markers, before decoding.
* Transparency is composited onto white (``ALPHA_BACKGROUND``); 16-bit grey keeps its top
  8 bits (Pillow's own conversion clips everything above 255 to white).

Example:
    >>> import io
    >>> from PIL import Image
    >>> buf = io.BytesIO()
    >>> Image.new("RGB", (40, 30), (255, 0, 0)).save(buf, format="PNG")
    >>> rgb = decode_image(buf.getvalue(), max_pixels=10_000)
    >>> rgb.shape, rgb.dtype.name, rgb[0, 0].tolist()
    ((30, 40, 3), 'uint8', [255, 0, 0])
"""

from __future__ import annotations

import io
import struct
import warnings
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from handler.errors import InputError

# Pillow plugins we let parse untrusted bytes (JPEG also opens MPO, what many phones write).
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")
ALPHA_BACKGROUND = (255, 255, 255)
# The default decode limit (width x height, from the header): 8K x 5K. A 32 MiB request cap
# alone lets far bigger images through; the archive's max_pixels can lower or raise it.
DEFAULT_MAX_PIXELS = 40_000_000
# libjpeg's JPEG_MAX_DIMENSION: no JPEG can be wider or taller (PNG has no such limit).
JPEG_MAX_DIMENSION = 65500
# Scans (SOS segments) a JPEG may have. Baseline files have 1, progressive ones about 10 (up
# to ~20 for odd encoders); each scan makes a progressive decode pass over the whole picture.
MAX_JPEG_SCANS = 100
_JPEG_STANDALONE_MARKERS = frozenset([0x01, *range(0xD0, 0xD9)])  # TEM, RSTn, SOI, EOI
# Errors Pillow raises on a file whose header parses but whose pixel data is cut or corrupt.
_CORRUPT_DATA_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError)
# Signatures of things people upload by mistake, for a message better than "cannot identify".
_NON_IMAGE_SIGNATURES = (
    (b"%PDF", "a PDF document"),
    (b"PK\x03\x04", "a zip archive"),
    (b"<svg", "an SVG drawing (vector images are not supported: rasterise it to PNG)"),
    (b"<?xml", "an XML document"),
    (b"<!doctype html", "an HTML page"),
    (b"<html", "an HTML page"),
    (b"{", "JSON text"),
)


def _describe_non_image(data: bytes) -> str:
    head = data[:256].lstrip().lower()
    for signature, what in _NON_IMAGE_SIGNATURES:
        if head.startswith(signature.lower()):
            return what
    if b"<svg" in head:
        return "an SVG drawing (vector images are not supported: rasterise it to PNG)"
    try:
        data[:256].decode("utf-8")
    except UnicodeDecodeError:
        return "not a recognised image format"
    return "text, not image bytes"


def jpeg_scan_count(data: bytes, stop_after: int = MAX_JPEG_SCANS) -> int:
    """How many scans (SOS markers) a JPEG stream has, counting at most ``stop_after + 1``.

    Walks the marker segments and skips entropy-coded data; cost is linear in the file size.
    A stream that is not JPEG, or ends early, counts the scans seen so far.

    >>> jpeg_scan_count(b"\\xff\\xd8" + b"\\xff\\xda\\x00\\x02" * 3 + b"\\xff\\xd9")
    3
    """
    if not data.startswith(b"\xff\xd8"):
        return 0
    scans, pos, size = 0, 2, len(data)
    while pos + 4 <= size and scans <= stop_after:
        if data[pos] != 0xFF:
            # Entropy-coded data: jump to the next marker (0xFF not followed by 0x00/RSTn/0xFF).
            pos = data.find(b"\xff", pos + 1)
            if pos < 0:
                break
            continue
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
        elif marker == 0x00 or marker in _JPEG_STANDALONE_MARKERS:
            if marker == 0xD9:  # EOI
                break
            pos += 2
        else:
            length = int.from_bytes(data[pos + 2 : pos + 4], "big")
            scans += marker == 0xDA
            pos += 2 + max(length, 2)
    return scans


def _check_decode_cost(data: bytes, image_format: str | None) -> None:
    if image_format in ("JPEG", "MPO"):
        scans = jpeg_scan_count(data)
        if scans > MAX_JPEG_SCANS:
            raise InputError(
                "decode_limit",
                f"the JPEG has more than {MAX_JPEG_SCANS} scans (progressive JPEGs have about "
                "10); each scan re-decodes the whole picture: re-encode it as a baseline JPEG",
            )


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Parse only the header; refuse empty bodies, and bombs before a single pixel is
    decoded."""
    if not data:
        raise InputError("empty", "the request body is empty: send the image file's bytes")
    Image.init()  # register every plugin, else `formats=` may not know WEBP/TIFF yet
    with warnings.catch_warnings():
        # Pillow's own bomb check is global state; ours is per call (max_pixels) and stricter.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
        except Image.DecompressionBombError as exc:
            raise InputError(
                "too_many_pixels", f"image is too large to decode: {exc}; resize it first"
            ) from None
        except UnidentifiedImageError:
            raise InputError(
                "not_an_image",
                f"the request body is {_describe_non_image(data)}; send the bytes of a "
                f"{'/'.join(ACCEPTED_FORMATS)} image",
            ) from None
        except _CORRUPT_DATA_ERRORS as exc:
            raise InputError(
                "truncated", f"image header is corrupt ({exc}); re-encode the image"
            ) from None
    _check_decode_cost(data, image.format)
    width, height = image.size
    if width <= 0 or height <= 0:
        raise InputError("bad_request", f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise InputError(
            "too_many_pixels",
            f"image is {width}x{height} = {width * height:,} pixels, above the limit of "
            f"{max_pixels:,}; downscale it before sending",
        )
    return image


def _to_rgb(image: Image.Image) -> np.ndarray:
    """Any Pillow mode → RGB uint8, compositing transparency and keeping 16-bit contrast."""
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        # 16-bit grey: keep the top byte. ("I" is how Pillow may hold a 16-bit PNG.)
        grey = np.asarray(image).astype(np.int64)
        grey = (np.clip(grey, 0, 65535) >> 8).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode == "F":
        grey = np.asarray(image, dtype=np.float64)
        scale = 255.0 if grey.size and float(np.nanmax(grey)) <= 1.0 else 1.0
        grey = np.clip(np.nan_to_num(grey) * scale, 0, 255).round().astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        image = Image.alpha_composite(background, rgba)
    rgb = image.convert("RGB") if image.mode != "RGB" else image
    # np.array copies: np.asarray of a Pillow image is read-only, which torch warns about.
    return np.array(rgb, dtype=np.uint8, order="C")


def plain_jpeg(data: bytes, max_pixels: int) -> bool:
    """Whether any JPEG decoder gives ``decode_image``'s picture for these bytes (so a GPU's
    nvJPEG may decode them): one JPEG frame, YCbCr colour, no EXIF rotation, nothing after its
    end marker. The header is checked as ``decode_image`` checks it (an
    :class:`InputError` for a refused file); no pixel is decoded.

    CMYK and Adobe-RGB files, grey ones, multi-picture (MPO) files, rotated phone photos and
    files cut short or with trailing bytes are not plain: Pillow decodes those.

    >>> import io
    >>> from PIL import Image
    >>> buf = io.BytesIO()
    >>> Image.new("RGB", (40, 30), (255, 0, 0)).save(buf, format="JPEG")
    >>> plain_jpeg(buf.getvalue(), 10_000), plain_jpeg(buf.getvalue()[:-2], 10_000)
    (True, False)
    """
    data = bytes(data or b"")
    image = _open(data, max_pixels)
    if image.format != "JPEG" or image.mode != "RGB" or not data.endswith(b"\xff\xd9"):
        return False
    if "adobe" in image.info and image.info.get("adobe_transform") != 1:
        return False  # an Adobe marker without the YCbCr transform: RGB stored as is
    try:
        orientation = image.getexif().get(0x0112, 1)  # EXIF Orientation
    except _CORRUPT_DATA_ERRORS + (KeyError, TypeError):
        return False  # let decode_image deal with a malformed EXIF block, as it always has
    return orientation == 1


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Image file bytes → RGB ``(H, W, 3)`` uint8, EXIF-rotated, or an :class:`InputError`.

    ``max_pixels`` bounds width × height as stored in the file (checked before decoding).
    """
    image = _open(bytes(data or b""), max_pixels)
    try:
        image.seek(0)
        image.load()
    except _CORRUPT_DATA_ERRORS as exc:
        raise InputError(
            "truncated",
            f"image data is truncated or corrupt ({exc}); re-send the complete file",
        ) from None
    try:
        image = ImageOps.exif_transpose(image)
    except _CORRUPT_DATA_ERRORS + (KeyError, TypeError):
        pass  # a malformed EXIF block must not cost the user the prediction
    return _to_rgb(image)


def palette_array(palette: Sequence[Sequence[int]]) -> np.ndarray:
    """``[[r, g, b], ...]`` → ``(C, 3)`` uint8 lookup table."""
    table = np.asarray(palette, dtype=np.int64)
    if table.ndim != 2 or table.shape[1] != 3 or table.min() < 0 or table.max() > 255:
        raise ValueError(f"palette must be a list of [r, g, b] in 0..255, got shape {table.shape}")
    return table.astype(np.uint8)


def encode_mask_png(mask: np.ndarray, num_classes: int, compress_level: int = 3) -> bytes:
    """Class-id mask ``(H, W)`` → greyscale PNG: 8-bit, or 16-bit past 256 classes.

    Example:
        >>> png = encode_mask_png(np.array([[0, 1], [2, 3]]), num_classes=4)
        >>> png[:4]
        b'\\x89PNG'
    """
    if mask.ndim != 2:
        raise ValueError(f"mask must be (H, W), got {mask.shape}")
    dtype = np.uint8 if num_classes <= 256 else np.uint16
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(mask.astype(dtype))).save(
        buf, format="PNG", compress_level=compress_level
    )
    return buf.getvalue()


def encode_confidence_png(confidence: np.ndarray) -> bytes:
    """Per-pixel confidence ``(H, W)`` in [0, 1] → 8-bit greyscale PNG of ``round(255 * c)``.

    A heat map's worth of precision (1/255) at a PNG's size, where float JSON would be ~10x more.

    Example:
        >>> png = encode_confidence_png(np.array([[0.0, 0.5], [0.999, 1.0]], dtype=np.float32))
        >>> np.asarray(Image.open(io.BytesIO(png))).tolist()
        [[0, 128], [255, 255]]
    """
    if confidence.ndim != 2:
        raise ValueError(f"confidence must be (H, W), got {confidence.shape}")
    levels = np.clip(np.rint(confidence.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(levels)).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def encode_color_png(mask: np.ndarray, palette: Sequence[Sequence[int]]) -> bytes:
    """Class-id mask → colour PNG: a palette PNG (1 byte/pixel) when classes fit in 256."""
    table = palette_array(palette)
    buf = io.BytesIO()
    if len(table) <= 256:
        image = Image.fromarray(np.ascontiguousarray(mask.astype(np.uint8)))
        image.putpalette(table.reshape(-1).tolist())
    else:
        image = Image.fromarray(table[mask])
    image.save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def blend_overlay(
    rgb: np.ndarray, mask: np.ndarray, palette: Sequence[Sequence[int]], alpha: float = 0.5
) -> np.ndarray:
    """Paint each pixel's class colour over the image with opacity ``alpha``."""
    if rgb.shape[:2] != mask.shape:
        raise ValueError(f"image {rgb.shape[:2]} and mask {mask.shape} differ in size")
    colours = palette_array(palette)[mask].astype(np.float32)
    blended = rgb.astype(np.float32) * (1.0 - alpha) + colours * alpha
    return np.clip(blended.round(), 0, 255).astype(np.uint8)


def encode_overlay(
    rgb: np.ndarray,
    mask: np.ndarray,
    palette: Sequence[Sequence[int]],
    image_format: str = "PNG",
    alpha: float = 0.5,
    jpeg_quality: int = 90,
) -> bytes:
    """Overlay of the mask on the image, as PNG (lossless) or JPEG (much smaller)."""
    image_format = image_format.upper()
    if image_format not in ("PNG", "JPEG"):
        raise ValueError(f"overlay format must be PNG or JPEG, got {image_format!r}")
    image = Image.fromarray(blend_overlay(rgb, mask, palette, alpha))
    buf = io.BytesIO()
    if image_format == "JPEG":
        image.save(buf, format="JPEG", quality=jpeg_quality)
    else:
        image.save(buf, format="PNG", compress_level=3)
    return buf.getvalue()

"""The handler's ``json`` answer → what the page shows: pure functions, no Gradio, no network.

The page asks TorchServe for one ``json`` answer per image (handler/postprocess.py): it holds
the mask, the per-class fractions and confidences, the palette and class names from the
model's own metadata, and the per-pixel confidence. Everything the page draws derives from
that answer, so nothing here knows a class, a colour or a size.

Example:
    >>> import base64, io
    >>> from PIL import Image
    >>> def b64png(a):
    ...     buf = io.BytesIO(); Image.fromarray(a).save(buf, format="PNG")
    ...     return base64.b64encode(buf.getvalue()).decode()
    >>> payload = {"model_name": "m", "model_version": "1", "width": 2, "height": 1,
    ...     "mean_confidence": 0.75, "mask_format": "png/base64",
    ...     "mask": b64png(np.array([[0, 1]], np.uint8)),
    ...     "confidence_map_format": "png/base64/uint8",
    ...     "confidence_map": b64png(np.array([[255, 128]], np.uint8)),
    ...     "classes": [{"id": 0, "name": "sky", "color": [0, 0, 255], "pixel_fraction": 0.5,
    ...                  "confidence": 1.0},
    ...                 {"id": 1, "name": "road", "color": [128, 64, 128],
    ...                  "pixel_fraction": 0.5, "confidence": 0.5}]}
    >>> seg = parse_answer(payload)
    >>> seg.mask.tolist(), [c.name for c in seg.classes], seg.palette
    ([[0, 1]], ['sky', 'road'], [(0, 0, 255), (128, 64, 128)])
    >>> colour_mask(seg).tolist()
    [[[0, 0, 255], [128, 64, 128]]]
"""

from __future__ import annotations

import base64
import binascii
import html
import io
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from handler.imaging import blend_overlay, palette_array


class AnswerError(ValueError):
    """The server's answer is not the handler's ``json`` output (wrong server or version)."""


@dataclass(frozen=True)
class ClassShare:
    """One class of the answer: its metadata and how much of the image it covers."""

    id: int
    name: str
    color: tuple[int, int, int]
    pixel_fraction: float
    confidence: float | None


@dataclass(frozen=True)
class Segmentation:
    """One decoded ``json`` answer."""

    model_name: str
    model_version: str
    width: int
    height: int
    mean_confidence: float | None
    classes: tuple[ClassShare, ...]
    mask: np.ndarray
    mask_png: bytes
    confidence_map: np.ndarray | None

    @property
    def palette(self) -> list[tuple[int, int, int]]:
        return [c.color for c in self.classes]


def _png(payload: dict[str, Any], key: str) -> tuple[bytes, np.ndarray]:
    try:
        data = base64.b64decode(payload[key], validate=True)
        with Image.open(io.BytesIO(data)) as image:
            return data, np.asarray(image)
    except (KeyError, TypeError, binascii.Error, UnidentifiedImageError, OSError) as exc:
        raise AnswerError(f"the answer's {key!r} is not a base64 PNG ({exc})") from None


def _class_share(entry: Any) -> ClassShare:
    try:
        color = tuple(int(v) for v in entry["color"])
        confidence = entry.get("confidence")
        share = ClassShare(
            id=int(entry["id"]),
            name=str(entry["name"]),
            color=(color[0], color[1], color[2]),
            pixel_fraction=float(entry["pixel_fraction"]),
            confidence=None if confidence is None else float(confidence),
        )
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise AnswerError(f"a class entry of the answer is malformed: {entry!r} ({exc})") from None
    return share


def parse_answer(payload: Any) -> Segmentation:
    """A :class:`Segmentation` from the handler's ``json`` answer, or an :class:`AnswerError`."""
    if not isinstance(payload, dict) or payload.get("mask_format") != "png/base64":
        keys = sorted(payload) if isinstance(payload, dict) else type(payload).__name__
        raise AnswerError(
            f"the server's answer is not segserve's json output (fields: {keys}); is the "
            "model served with segserve's handler?"
        )
    mask_png, mask = _png(payload, "mask")
    classes = tuple(_class_share(e) for e in payload.get("classes") or [])
    if not classes or [c.id for c in classes] != list(range(len(classes))):
        raise AnswerError("the answer's classes are missing or not numbered 0..N-1")
    width, height = int(payload.get("width", -1)), int(payload.get("height", -1))
    if mask.shape != (height, width):
        raise AnswerError(f"the mask is {mask.shape[::-1]}, the answer says {width}x{height}")
    confidence_map = None
    if payload.get("confidence_map_format") == "png/base64/uint8":
        confidence_map = _png(payload, "confidence_map")[1].astype(np.float32) / 255.0
    mean = payload.get("mean_confidence")
    return Segmentation(
        model_name=str(payload.get("model_name", "")),
        model_version=str(payload.get("model_version", "")),
        width=width,
        height=height,
        mean_confidence=None if mean is None else float(mean),
        classes=classes,
        mask=mask,
        mask_png=mask_png,
        confidence_map=confidence_map,
    )


def colour_mask(seg: Segmentation) -> np.ndarray:
    """The mask painted with the model's palette, ``(H, W, 3)`` uint8."""
    return palette_array(seg.palette)[seg.mask]


def overlay(rgb: np.ndarray, seg: Segmentation, opacity: float) -> np.ndarray:
    """The palette over the input at ``opacity`` (0: the photo, 1: the colour mask).

    The same blend as the server's ``overlay`` output (handler.imaging.blend_overlay).
    """
    return blend_overlay(rgb, seg.mask, seg.palette, float(np.clip(opacity, 0.0, 1.0)))


# Heat-map colours from low to high confidence: dark blue, teal, yellow (viridis' end points
# and middle, which stay apart for the colour-blind and in greyscale print).
HEAT_STOPS = np.array([[68, 1, 84], [33, 145, 140], [253, 231, 37]], dtype=np.float32)


def heat_map(confidence: np.ndarray) -> np.ndarray:
    """Confidence ``(H, W)`` in [0, 1] → ``(H, W, 3)`` uint8 through :data:`HEAT_STOPS`.

    >>> heat_map(np.array([[0.0, 1.0]])).tolist()
    [[[68, 1, 84], [253, 231, 37]]]
    """
    positions = np.linspace(0.0, 1.0, len(HEAT_STOPS))
    values = np.clip(confidence, 0.0, 1.0)
    channels = [np.interp(values, positions, HEAT_STOPS[:, c]) for c in range(3)]
    return np.stack(channels, axis=-1).round().astype(np.uint8)


def _css_rgb(color: tuple[int, int, int]) -> str:
    return f"rgb({color[0]}, {color[1]}, {color[2]})"


def legend_html(seg: Segmentation) -> str:
    """Every class of the model, with its colour, share of the image and mean confidence.

    The rows carry the exact values as ``data-`` attributes (the text is rounded) so a test
    or a script can read them back from the page.

    >>> row = legend_html(_tiny()).splitlines()[2]
    >>> row.split("><td>")[0]
    '<tr data-class-id="0" data-class-name="a&lt;b" data-fraction="1.0"'
    >>> row.split("</span></td>")[1]
    '<td>a&lt;b</td><td>100.0%</td><td>0.90</td></tr>'
    """
    rows = []
    for c in seg.classes:
        name = html.escape(c.name)
        confidence = "–" if c.confidence is None else f"{c.confidence:.2f}"
        rows.append(
            f'<tr data-class-id="{c.id}" data-class-name="{name}" '
            f'data-fraction="{c.pixel_fraction!r}"><td><span class="swatch" '
            f'style="background: {_css_rgb(c.color)}"></span></td><td>{name}</td>'
            f"<td>{100 * c.pixel_fraction:.1f}%</td><td>{confidence}</td></tr>"
        )
    return "\n".join(
        [
            '<table id="segserve-legend">',
            "<tr><th></th><th>class</th><th>pixels</th><th>confidence</th></tr>",
            *rows,
            "</table>",
        ]
    )


def summary_html(seg: Segmentation, latency_ms: float, protocol: str) -> str:
    """Model name/version, mean confidence and the round trip, with exact values as data-.

    >>> summary_html(_tiny(), 12.34, "rest")  # doctest: +NORMALIZE_WHITESPACE
    '<div id="segserve-summary" data-model="m" data-version="1" data-latency-ms="12.3"
    data-mean-confidence="0.9"><b>m</b> v1 · mean confidence 0.90 · 12 ms round trip
    (REST) · 1x1 px</div>'
    """
    mean = "–" if seg.mean_confidence is None else f"{seg.mean_confidence:.2f}"
    name, version = html.escape(seg.model_name), html.escape(seg.model_version)
    return (
        f'<div id="segserve-summary" data-model="{name}" data-version="{version}" '
        f'data-latency-ms="{latency_ms:.1f}" data-mean-confidence="{seg.mean_confidence!r}">'
        f"<b>{name}</b> v{version} · mean confidence {mean} · {latency_ms:.0f} ms round trip "
        f"({protocol.upper()}) · {seg.width}x{seg.height} px</div>"
    )


def fraction_rows(seg: Segmentation) -> dict[str, list[Any]]:
    """Columns of the per-class bar chart: class name, pixel fraction, CSS colour."""
    return {
        "class": [c.name for c in seg.classes],
        "pixel fraction": [c.pixel_fraction for c in seg.classes],
        "color": [_css_rgb(c.color) for c in seg.classes],
    }


def _tiny() -> Segmentation:
    """A 1x1 answer for the doctests."""
    share = ClassShare(0, "a<b", (1, 2, 3), 1.0, 0.9)
    mask = np.zeros((1, 1), np.uint8)
    return Segmentation("m", "1", 1, 1, 0.9, (share,), mask, b"", None)

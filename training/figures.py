"""Pictures people read: panels with column titles, legends of class names and colours, small
images upscaled with nearest neighbour, grids of samples.

Pure numpy + PIL (text in PIL's bundled FreeType font), so a figure's pixels are exact: a mask
panel is the mask's colours repeated ``factor`` times, never blurred, and tests can compare the
panels of a figure pixel for pixel with what they show. Evaluation overlays, the check-data
sample grid and its legend are built here.

Example:
    >>> import numpy as np
    >>> panel = np.zeros((40, 50, 3), np.uint8)
    >>> pixels, boxes = compose_row([panel, panel], ["image", "truth"])
    >>> boxes[0][2:], pixels.shape[0] >= MIN_PANEL_HEIGHT
    ((320, 400), True)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# A person reads a panel at about this height or more; smaller model inputs are upscaled.
MIN_PANEL_HEIGHT = 320
BACKGROUND = (255, 255, 255)
TEXT = (0, 0, 0)
OUTLINE = (128, 128, 128)  # around swatches, so white and black classes show on white
GAP = 6

Box = tuple[int, int, int, int]  # top, left, height, width


@dataclass(frozen=True)
class LegendEntry:
    """One swatch of a legend: its label and colour."""

    label: str
    colour: tuple[int, int, int]


def get_font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """PIL's bundled font at ``size`` pixels (FreeType), else its fixed bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except (ImportError, OSError, TypeError):  # a Pillow without FreeType
        return ImageFont.load_default()


def font_size_for(panel_height: int) -> int:
    """Text size that suits panels ``panel_height`` pixels tall: 14 to 28 px.

    Example:
        >>> font_size_for(320), font_size_for(2000)
        (17, 28)
    """
    return max(14, min(28, panel_height // 18))


def readable_factor(height: int, min_height: int = MIN_PANEL_HEIGHT) -> int:
    """The integer factor that brings ``height`` to at least ``min_height`` (1 when it is).

    Example:
        >>> readable_factor(64), readable_factor(100), readable_factor(512)
        (5, 4, 1)
    """
    if height <= 0:
        raise ValueError(f"height must be positive, got {height}")
    return max(1, math.ceil(min_height / height))


def upscale_nearest(image: np.ndarray, factor: int) -> np.ndarray:
    """Repeat every pixel ``factor`` times down and across: label colours stay exact.

    Example:
        >>> upscale_nearest(np.array([[1, 2]]), 2).tolist()
        [[1, 1, 2, 2], [1, 1, 2, 2]]
    """
    if factor < 1:
        raise ValueError(f"factor must be >= 1, got {factor}")
    if factor == 1:
        return image
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def fit_text(text: str, width: int, font: ImageFont.ImageFont, keep: str = "end") -> str:
    """``text`` shortened with "…" until it fits ``width`` pixels; ``keep`` "end" keeps the end
    (file names), "start" the beginning (titles)."""
    if font.getlength(text) <= width:
        return text
    for cut in range(1, len(text)):
        short = "…" + text[cut:] if keep == "end" else text[: len(text) - cut] + "…"
        if font.getlength(short) <= width:
            return short
    return "…"


def _text_height(font: ImageFont.ImageFont) -> int:
    """Pixels from the drawing origin to the bottom of the lowest glyph."""
    return int(math.ceil(font.getbbox("Ag|")[3]))


def text_strip(
    texts: Sequence[str], spans: Sequence[tuple[int, int]], width: int, font_size: int
) -> np.ndarray:
    """A white strip ``width`` wide with each text centred over its ``(left, span width)``."""
    font = get_font(font_size)
    height = _text_height(font) + 2 * GAP
    strip = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(strip)
    for text, (left, span) in zip(texts, spans, strict=True):
        shown = fit_text(text, max(span - 4, 1), font, keep="start")
        x = left + (span - font.getlength(shown)) / 2
        draw.text((x, GAP), shown, fill=TEXT, font=font)
    return np.asarray(strip).copy()


def legend(entries: Sequence[LegendEntry], width: int, font_size: int) -> np.ndarray:
    """Swatches with their labels, wrapped into as many rows as ``width`` needs."""
    font = get_font(font_size)
    line = _text_height(font) + GAP
    swatch = max(8, _text_height(font))
    items = [(e, swatch + GAP // 2 + int(font.getlength(e.label)) + 2 * GAP) for e in entries]
    rows: list[list[tuple[LegendEntry, int]]] = [[]]
    used = GAP
    for entry, item_width in items:
        if rows[-1] and used + item_width > width:
            rows.append([])
            used = GAP
        rows[-1].append((entry, item_width))
        used += item_width
    image = Image.new("RGB", (width, GAP + line * len(rows)), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for r, row in enumerate(rows):
        x, y = GAP, GAP + r * line
        for entry, item_width in row:
            draw.rectangle(
                [x, y, x + swatch - 1, y + swatch - 1], fill=entry.colour, outline=OUTLINE
            )
            label = fit_text(entry.label, max(width - x - swatch - GAP, 1), font, keep="start")
            draw.text((x + swatch + GAP // 2, y), label, fill=TEXT, font=font)
            x += item_width
    return np.asarray(image).copy()


def class_legend(
    class_names: Sequence[str],
    palette: Sequence[Sequence[int]],
    class_ids: Sequence[int] | None = None,
) -> list[LegendEntry]:
    """Entries ``"<id> <name>"`` for ``class_ids`` (default: every class), in id order.

    Example:
        >>> class_legend(["bg", "car"], [(0, 0, 0), (0, 0, 142)], [1])
        [LegendEntry(label='1 car', colour=(0, 0, 142))]
    """
    ids = range(len(class_names)) if class_ids is None else sorted(set(int(i) for i in class_ids))
    return [LegendEntry(f"{i} {class_names[i]}", tuple(int(c) for c in palette[i])) for i in ids]


def pad_to(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """``image`` on a white canvas ``height x width`` (top left), for grid cells."""
    canvas = np.full((height, width, 3), BACKGROUND, dtype=np.uint8)
    canvas[: image.shape[0], : image.shape[1]] = image
    return canvas


def stack(parts: Sequence[np.ndarray]) -> np.ndarray:
    """Parts one under the other, padded white to the widest."""
    width = max(p.shape[1] for p in parts)
    return np.concatenate([pad_to(p, p.shape[0], width) for p in parts], axis=0)


def compose_row(
    panels: Sequence[np.ndarray],
    titles: Sequence[str],
    entries: Sequence[LegendEntry] = (),
    min_height: int = MIN_PANEL_HEIGHT,
) -> tuple[np.ndarray, list[Box]]:
    """Equal-height RGB panels side by side, upscaled (nearest) to at least ``min_height``,
    a title over each and a legend under them; (figure, each panel's box in the figure).
    """
    if len(panels) != len(titles) or not panels:
        raise ValueError(f"need one title per panel, got {len(panels)} panels, {len(titles)}")
    if len({p.shape[0] for p in panels}) != 1:
        raise ValueError(f"panels differ in height: {[p.shape[0] for p in panels]}")
    factor = readable_factor(panels[0].shape[0], min_height)
    scaled = [upscale_nearest(p, factor) for p in panels]
    height = scaled[0].shape[0]
    width = sum(p.shape[1] for p in scaled) + GAP * (len(scaled) - 1)
    row = np.full((height, width, 3), BACKGROUND, dtype=np.uint8)
    spans, left = [], 0
    for p in scaled:
        row[:, left : left + p.shape[1]] = p
        spans.append((left, p.shape[1]))
        left += p.shape[1] + GAP
    size = font_size_for(height)
    header = text_strip(titles, spans, width, size)
    parts = [header, row] + ([legend(entries, width, size)] if entries else [])
    boxes = [(header.shape[0], x, height, w) for x, w in spans]
    return stack(parts), boxes


def grid(cells: Sequence[np.ndarray], columns: int) -> np.ndarray:
    """Cells left to right, top to bottom, ``columns`` per row, each padded to the largest."""
    if not cells:
        raise ValueError("a grid needs at least one cell")
    columns = max(1, min(columns, len(cells)))
    h = max(c.shape[0] for c in cells)
    w = max(c.shape[1] for c in cells)
    rows = math.ceil(len(cells) / columns)
    out = np.full(
        (rows * h + (rows - 1) * GAP, columns * w + (columns - 1) * GAP, 3), 255, np.uint8
    )
    for i, cell in enumerate(cells):
        top, left = (i // columns) * (h + GAP), (i % columns) * (w + GAP)
        out[top : top + cell.shape[0], left : left + cell.shape[1]] = cell
    return out


def resize_to_height(image: np.ndarray, height: int, nearest: bool) -> np.ndarray:
    """``image`` at ``height`` rows, aspect kept: nearest for masks, area-like for photos."""
    h, w = image.shape[:2]
    if h == height:
        return image
    width = max(1, round(w * height / h))
    method = Image.NEAREST if nearest or height > h else Image.BILINEAR
    return np.asarray(Image.fromarray(image).resize((width, height), method)).copy()


def save_png(pixels: np.ndarray, path) -> None:
    """Write an RGB uint8 figure as PNG."""
    Image.fromarray(np.ascontiguousarray(pixels)).save(path, format="PNG", compress_level=6)

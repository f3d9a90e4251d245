"""LabelMe JSON polygons: one ``<name>.json`` per image, painted into a mask when loaded.

A LabelMe file holds ``shapes`` (``label``, ``points``, ``shape_type``), ``imagePath``
(relative to the JSON), optionally the image itself (``imageData``, base64) and its
``imageHeight`` / ``imageWidth``. Shapes are painted in file order, exactly as ``labelme2voc``
does, so **where shapes overlap, the one later in the file wins** (reorder the shapes, or the
JSON, to change it). Pixels no shape covers get class 0 (the first class name, the
background); a shape labelled ``__ignore__`` paints ``data.ignore_index``. Line, linestrip
and point shapes are painted 10 px wide / as a 5 px radius disc, as labelme2voc paints them.

Class names come from ``classes.yaml`` (as the folder kind: ``names``, optional ``colors``)
or labelme2voc's ``labels.txt`` (one name a line; ``__ignore__`` first, then
``_background_``, then the classes). A label in a JSON that is not a class is an error naming
the JSON and the label.

Example:
    >>> shape = {"label": "cat", "points": [[1, 1], [4, 1], [4, 3], [1, 3]]}
    >>> shape_mask(shape, (5, 6), Path("a.json"), 0).astype(int)
    array([[0, 0, 0, 0, 0, 0],
           [0, 1, 1, 1, 1, 0],
           [0, 1, 1, 1, 1, 0],
           [0, 1, 1, 1, 1, 0],
           [0, 0, 0, 0, 0, 0]])
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, UnidentifiedImageError

from training.datasets import (
    DataError,
    FileDataset,
    Sample,
    _non_empty,
    _open_image,
    read_classes_yaml,
)

IGNORE_LABEL = "__ignore__"  # labelme2voc's "paint ignore here" label
LINE_WIDTH = 10  # labelme's shape_to_mask defaults for the shapes without an area
POINT_RADIUS = 5
SHAPE_TYPES = ("polygon", "rectangle", "circle", "line", "linestrip", "point")


def labelme_classes(
    root: Path,
) -> tuple[tuple[str, ...], tuple[tuple[int, int, int], ...] | None, Path]:
    """(class names, colours or None, the file they came from): ``classes.yaml``, else
    ``labels.txt``.

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> _ = (root / "labels.txt").write_text("__ignore__\\n_background_\\ncat\\n")
        >>> labelme_classes(root)[:2]
        (('_background_', 'cat'), None)
    """
    if (root / "classes.yaml").is_file():
        classes = read_classes_yaml(root)
        if IGNORE_LABEL in classes.names:
            raise DataError(
                f"{root / 'classes.yaml'}: {IGNORE_LABEL!r} is LabelMe's ignore label, not a "
                "class; remove it from 'names'"
            )
        return classes.names, classes.colours, root / "classes.yaml"
    path = root / "labels.txt"
    if not path.is_file():
        raise DataError(
            f"{root}: no classes.yaml or labels.txt; LabelMe data needs one: labels.txt as "
            "labelme2voc reads it (__ignore__, _background_, then one class a line) or "
            "classes.yaml with 'names: [...]'"
        )
    names = [n.strip() for n in path.read_text(encoding="utf-8-sig").splitlines()]
    names = [n for n in names if n and n != IGNORE_LABEL]
    if not names:
        raise DataError(f"{path}: no class names; write one a line, background first")
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise DataError(f"{path}: {dup!r} is listed twice; each class once")
    return tuple(names), None, path


def read_labelme_json(path: Path) -> dict[str, Any]:
    """The parsed LabelMe file; anything that is not one is a DataError naming it."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise DataError(f"{path}: file not found (was it moved or deleted?)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc}); re-save it in LabelMe") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("shapes"), list):
        raise DataError(f"{path}: not a LabelMe file (no 'shapes' list); remove it or fix it")
    return doc


def image_of(path: Path, doc: dict[str, Any]) -> Path:
    """The image a LabelMe file annotates: ``imagePath`` relative to the JSON, else the file
    of that name next to the JSON (an absolute path from another machine), else the JSON
    itself when the image is embedded (``imageData``)."""
    raw = doc.get("imagePath")
    looked: list[Path] = []
    if isinstance(raw, str) and raw:
        posix = raw.replace("\\", "/")
        looked = [path.parent / posix, path.parent / PurePosixPath(posix).name]
        for candidate in looked:
            if candidate.is_file():
                return candidate
    if doc.get("imageData"):
        return path
    where = f" (looked for {', '.join(map(str, dict.fromkeys(looked)))})" if looked else ""
    raise DataError(
        f"{path}: its image {raw!r} is not found{where} and the JSON embeds no imageData; put "
        "the image next to the JSON or fix imagePath"
    )


def labelme_samples(root: Path, split: str | None) -> list[Sample]:
    """``root/<split>/*.json`` (``split=None``: ``root/*.json``), each with its image."""
    folder = root if split is None else root / split
    if not folder.is_dir():
        raise DataError(
            f"{folder}: not found; put the LabelMe files in {split}/ (and the other split's "
            "folder), or, for JSONs directly under data.root, add data.split: {val: 0.15}"
        )
    samples = []
    for path in sorted(folder.glob("*.json")):
        samples.append(Sample(image_of(path, read_labelme_json(path)), path))
    return _non_empty(samples, folder, split or "all")


def load_image(sample: Sample, doc: dict[str, Any]) -> np.ndarray:
    """The RGB image of a LabelMe sample (its file, or the embedded ``imageData``)."""
    if sample.image != sample.mask:
        with _open_image(sample.image) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    try:
        img = Image.open(io.BytesIO(base64.b64decode(doc["imageData"], validate=True)))
        img.load()
    except (binascii.Error, UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(
            f"{sample.mask}: its imageData is not a readable image ({exc}); re-save it in LabelMe"
        ) from None
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def shape_mask(shape: dict[str, Any], size: tuple[int, int], path: Path, k: int) -> np.ndarray:
    """The pixels (bool (H, W)) one shape covers, drawn as labelme's ``shape_to_mask``."""
    kind = shape.get("shape_type") or "polygon"
    what = f"{path}: shape {k} ({shape.get('label')!r}, {kind})"
    try:
        xy = [(float(x), float(y)) for x, y in shape.get("points") or []]
    except (TypeError, ValueError):
        raise DataError(f"{what}: points must be [[x, y], ...]; fix the file") from None
    need = {"circle": 2, "rectangle": 2, "line": 2, "point": 1}
    if kind not in SHAPE_TYPES:
        raise DataError(
            f"{what}: shape_type {kind!r} is not one of {list(SHAPE_TYPES)}; redraw it as a "
            "polygon in LabelMe"
        )
    if (kind in need and len(xy) != need[kind]) or (kind == "polygon" and len(xy) < 3):
        wanted = need.get(kind, "3 or more")
        raise DataError(f"{what}: has {len(xy)} points, a {kind} needs {wanted}; fix the shape")
    h, w = size
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    if kind == "circle":
        (cx, cy), (px, py) = xy
        r = math.hypot(cx - px, cy - py)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=1, fill=1)
    elif kind == "rectangle":
        (x0, y0), (x1, y1) = xy
        draw.rectangle([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)], outline=1, fill=1)
    elif kind in ("line", "linestrip"):
        draw.line(xy, fill=1, width=LINE_WIDTH)
    elif kind == "point":
        (cx, cy), r = xy[0], POINT_RADIUS
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=1, fill=1)
    else:
        draw.polygon(xy, outline=1, fill=1)
    return np.asarray(canvas, dtype=bool)


def labelme_painter(
    root: Path, ignore_index: int
) -> Callable[[dict[str, Any], Path, tuple[int, int]], np.ndarray]:
    """``paint(doc, path, (H, W)) -> mask`` (int64 class ids) for ``root``'s class names."""
    names, _, source = labelme_classes(root)
    ids = {name: i for i, name in enumerate(names)}

    def paint(doc: dict[str, Any], path: Path, size: tuple[int, int]) -> np.ndarray:
        declared = (doc.get("imageHeight"), doc.get("imageWidth"))
        if all(isinstance(v, int) for v in declared) and declared != tuple(size):
            raise DataError(
                f"{path}: imageHeight x imageWidth is {declared[0]}x{declared[1]} but its image "
                f"is {size[0]}x{size[1]}; the shapes were drawn on another image (open and save "
                "it again in LabelMe)"
            )
        mask = np.zeros(size, dtype=np.int64)  # not covered by any shape: class 0, background
        for k, shape in enumerate(doc["shapes"]):
            label = shape.get("label") if isinstance(shape, dict) else None
            if label == IGNORE_LABEL:
                value = ignore_index
            elif label in ids:
                value = ids[label]
            else:
                raise DataError(
                    f"{path}: shape {k} has the label {label!r}, which is not a class in "
                    f"{source} {list(names)}; add it there or relabel the shape"
                )
            mask[shape_mask(shape, size, path, k)] = value  # later shapes paint over earlier
        return mask

    return paint


class LabelMeDataset(FileDataset):
    """:class:`~training.datasets.FileDataset` whose ``Sample.mask`` is the LabelMe JSON and
    whose ``decode_mask`` is :func:`labelme_painter`'s ``paint``."""

    def load_raw(self, i: int) -> tuple[np.ndarray, np.ndarray, str]:
        sample = self.samples[i]
        doc = read_labelme_json(sample.mask)
        rgb = load_image(sample, doc)
        mask = self.decode_mask(doc, sample.mask, rgb.shape[:2])
        return rgb, mask, str(sample.image)

    def load_mask(self, i: int) -> np.ndarray:
        """The painted mask alone; the image is decoded only when the JSON lacks its size."""
        sample = self.samples[i]
        doc = read_labelme_json(sample.mask)
        size = (doc.get("imageHeight"), doc.get("imageWidth"))
        if not all(isinstance(v, int) and v > 0 for v in size):
            size = load_image(sample, doc).shape[:2]
        return self.decode_mask(doc, sample.mask, size)

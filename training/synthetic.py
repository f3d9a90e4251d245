"""The embedded default dataset: procedurally drawn scenes of textured, overlapping shapes.

Each class has its own shape, texture and *hue family*, as real classes do (sky is blue-ish,
vegetation green-ish): colour is a strong but imperfect cue. Hues are jittered, saturation and
brightness vary widely, and background clutter draws strokes in the objects' hues, so exact
masks still need shape and edges. Scenes add what makes real data hard: cloudy low-saturation
backgrounds, objects occluding each other (a ring's hole shows what lies beneath), per-image
lighting gradients, contrast changes and sensor noise.

Calibration (why hue families): with fully random object colours, a Unet trained from scratch
on 2 CPU cores was still predicting background only (val mIoU 0.13) after 1,600 images, far
outside the 10-minute budget of ``make demo``.

The ``imbalanced`` mode (recipe ``data.synthetic.mode: imbalanced``) draws the same scenes and
adds what real datasets' weak classes look like: thin ``pole`` s (2-3 px wide) and ``cable`` s
(1-2 px, easily confused with the background's strokes) in some scenes, and a small ``beacon``
in about 5 % of the scenes (well under 0.1 % of the pixels); see :func:`class_names`. The
default mode's output is unchanged by it (same random stream, nothing extra drawn).

Everything is a pure function of ``(seed, index)``: the same arrays on every call, in any
process, in any order. Train, validation and test scenes come from disjoint index ranges
(:func:`scene_index`), so validation never sees a training scene. :func:`write_folder_dataset`
writes them as a folder dataset (``images/<split>``, ``masks/<split>``, ``classes.yaml``), the
layout a user's own data has, to try recipes through the folder reader.

Example:
    >>> rgb, mask = generate_scene(seed=0, index=3, size=(64, 96))
    >>> rgb.shape, rgb.dtype, mask.shape, int(mask.max()) < len(CLASS_NAMES)
    ((64, 96, 3), dtype('uint8'), (64, 96), True)
"""

from __future__ import annotations

import colorsys
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

CLASS_NAMES: tuple[str, ...] = ("background", "disc", "box", "triangle", "ring", "bar")
PALETTE: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0),
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
)
# The imbalanced mode's extra classes: thin, thin and confusable, rare and small.
IMBALANCED_EXTRA: tuple[str, ...] = ("pole", "cable", "beacon")
IMBALANCED_EXTRA_PALETTE: tuple[tuple[int, int, int], ...] = (
    (70, 240, 240),
    (170, 110, 40),
    (240, 50, 230),
)
MODES = ("default", "imbalanced")
SPLITS = ("train", "val", "test")
# Validation scenes start here and test scenes at twice this, so no two splits share a scene.
VAL_INDEX_OFFSET = 1_000_000

_Grid = tuple[np.ndarray, np.ndarray]


def scene_index(split: str, i: int) -> int:
    """Global scene index of the ``i``-th sample of ``split`` ("train", "val" or "test").

    Example:
        >>> scene_index("train", 5), scene_index("val", 5), scene_index("test", 5)
        (5, 1000005, 2000005)
    """
    if split not in SPLITS:
        raise ValueError(f"synthetic split {split!r} is not one of {list(SPLITS)}")
    if not 0 <= i < VAL_INDEX_OFFSET:
        raise ValueError(f"synthetic sample index {i} must be in [0, {VAL_INDEX_OFFSET})")
    return SPLITS.index(split) * VAL_INDEX_OFFSET + i


def class_names(mode: str = "default") -> tuple[str, ...]:
    """The class names of ``mode``'s scenes (class id = position).

    Example:
        >>> class_names("imbalanced")[len(CLASS_NAMES):]
        ('pole', 'cable', 'beacon')
    """
    _check_mode(mode)
    return CLASS_NAMES + (IMBALANCED_EXTRA if mode == "imbalanced" else ())


def palette(mode: str = "default") -> tuple[tuple[int, int, int], ...]:
    """One colour per class of :func:`class_names`."""
    _check_mode(mode)
    return PALETTE + (IMBALANCED_EXTRA_PALETTE if mode == "imbalanced" else ())


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"synthetic mode {mode!r} is not one of {list(MODES)}")


def generate_scene(
    seed: int, index: int, size: tuple[int, int], mode: str = "default"
) -> tuple[np.ndarray, np.ndarray]:
    """Draw scene ``index`` of dataset ``seed``: (rgb uint8 ``(H, W, 3)``, mask uint8 ``(H, W)``).

    Example:
        >>> a, _ = generate_scene(1, 0, (32, 32))
        >>> b, _ = generate_scene(1, 0, (32, 32))
        >>> bool((a == b).all())
        True
    """
    _check_mode(mode)
    h, w = int(size[0]), int(size[1])
    if h < 16 or w < 16:
        raise ValueError(f"synthetic image size {[h, w]} is too small; use at least [16, 16]")
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed} index={index}")
    # A SeedSequence over (seed, index) makes each scene independent of every other one.
    rng = np.random.default_rng([seed, index])
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    grid = (yy, xx)
    image = _background(rng, grid)
    mask = np.zeros((h, w), dtype=np.uint8)
    scale = min(h, w) / 128.0
    for _ in range(int(rng.integers(4, 9))):
        cls = int(rng.integers(1, len(CLASS_NAMES)))
        region = _SHAPES[cls](rng, grid, scale)
        if not region.any():
            continue
        texture = _TEXTURES[cls](rng, grid, scale)
        c0, c1 = _class_colour_pair(rng, cls)
        layer = c0 + (c1 - c0) * texture[..., None]
        image[region] = layer[region]
        mask[region] = cls
    if mode == "imbalanced":
        _draw_imbalanced(rng, grid, scale, image, mask)
    return _camera(rng, image, grid), mask


# --- the imbalanced mode's thin and rare classes ----------------------------------------------

POLE, CABLE, BEACON = (len(CLASS_NAMES) + k for k in range(3))
# Scene fractions: poles in 60 % of the scenes, cables in 40 %, a beacon in 5 %.
POLE_SCENES, CABLE_SCENES, BEACON_SCENES = 0.6, 0.4, 0.05
_EXTRA_HUES = {POLE: 180.0, CABLE: 90.0, BEACON: 330.0}


def _draw_imbalanced(
    rng: np.random.Generator, grid: _Grid, scale: float, image: np.ndarray, mask: np.ndarray
) -> None:
    """Poles, cables and (rarely) a beacon over the scene's objects, in place."""
    h, w = mask.shape
    width = max(scale, 1.0)  # thin in pixels at any image size
    regions: list[tuple[int, np.ndarray]] = []
    if rng.random() < POLE_SCENES:
        for _ in range(int(rng.integers(1, 4))):
            top = np.array([rng.uniform(0.0, 0.4) * h, rng.uniform(0.05, 0.95) * w])
            length = rng.uniform(0.4, 0.9) * h
            lean = rng.uniform(-0.17, 0.17)  # within ~10 degrees of vertical
            bottom = top + length * np.array([np.cos(lean), np.sin(lean)])
            half = rng.uniform(1.0, 1.6) * width
            regions.append((POLE, _segment_distance(grid, top, bottom) <= half))
    if rng.random() < CABLE_SCENES:
        for _ in range(int(rng.integers(1, 3))):
            regions.append((CABLE, _cable(rng, grid, width)))
    if rng.random() < BEACON_SCENES:
        cy, cx = _centre(rng, grid)
        u, v = _rotated(grid, cy, cx, rng.uniform(0, np.pi / 2))
        regions.append((BEACON, np.abs(u) + np.abs(v) <= rng.uniform(4.0, 7.0) * scale))
    for cls, region in regions:
        hue = _EXTRA_HUES[cls] + rng.uniform(-15.0, 15.0)
        c0 = _hsv(hue, rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0))
        c1 = c0 * rng.uniform(0.5, 0.8)
        layer = c0 + (c1 - c0) * _gradient(rng, grid, scale)[..., None]
        image[region] = layer[region]
        mask[region] = cls


def _cable(rng: np.random.Generator, grid: _Grid, width: float) -> np.ndarray:
    """A sagging 1-2 px line from one side of the image to the other (a quadratic curve)."""
    h, w = grid[0].shape
    left = np.array([rng.uniform(0.05, 0.6) * h, 0.0])
    right = np.array([rng.uniform(0.05, 0.6) * h, w - 1.0])
    sag = (left + right) / 2 + np.array([rng.uniform(0.05, 0.25) * h, 0.0])
    t = np.linspace(0.0, 1.0, 9)[:, None]
    points = (1 - t) ** 2 * left + 2 * (1 - t) * t * sag + t**2 * right
    half = rng.uniform(0.5, 0.9) * width
    region = np.zeros((h, w), dtype=bool)
    for p0, p1 in zip(points[:-1], points[1:], strict=True):
        region |= _segment_distance(grid, p0, p1) <= half
    return region


# --- background -----------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a coarse random grid upsampled bilinearly."""
    coarse = rng.random((cells, cells)).astype(np.float32)
    up = Image.fromarray(coarse, mode="F").resize((shape[1], shape[0]), Image.BILINEAR)
    return np.asarray(up, dtype=np.float32)


def _background(rng: np.random.Generator, grid: _Grid) -> np.ndarray:
    """Two-colour cloudy texture plus thin distractor strokes (still class 0)."""
    yy, xx = grid
    h, w = yy.shape
    c0, c1 = _colour_pair(rng)
    # Low saturation: pull both colours towards their grey level.
    c0, c1 = (0.35 * c + 0.65 * c.mean() for c in (c0, c1))
    blend = _smooth_noise(rng, (h, w), int(rng.integers(3, 9)))
    image = c0 + (c1 - c0) * blend[..., None]
    scale = min(h, w) / 128.0
    for _ in range(int(rng.integers(2, 7))):
        # Thin (1-2 px) strokes: hard negatives for the thick "bar" class.
        p0 = rng.random(2) * (h, w)
        p1 = p0 + rng.normal(0, 30 * scale, 2)
        stroke = _segment_distance(grid, p0, p1) <= rng.uniform(0.5, 1.2) * max(scale, 1.0)
        hue = float(rng.choice(list(_CLASS_HUES.values())) + rng.uniform(-20, 20))
        image[stroke] = _hsv(hue, rng.uniform(0.5, 1.0), rng.uniform(0.5, 1.0))
    return image


# --- shapes: each returns a boolean region ------------------------------------------------


def _centre(rng: np.random.Generator, grid: _Grid) -> tuple[float, float]:
    h, w = grid[0].shape
    return float(rng.uniform(0.05, 0.95) * h), float(rng.uniform(0.05, 0.95) * w)


def _rotated(grid: _Grid, cy: float, cx: float, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates ``(u, v)`` of every pixel in a frame centred at (cy, cx), rotated by angle."""
    dy, dx = grid[0] - cy, grid[1] - cx
    c, s = np.cos(angle), np.sin(angle)
    return c * dx + s * dy, -s * dx + c * dy


def _disc(rng: np.random.Generator, grid: _Grid, scale: float) -> np.ndarray:
    cy, cx = _centre(rng, grid)
    u, v = _rotated(grid, cy, cx, rng.uniform(0, np.pi))
    a = rng.uniform(9, 24) * scale
    b = a * rng.uniform(0.6, 1.0)
    return (u / a) ** 2 + (v / b) ** 2 <= 1.0


def _box(rng: np.random.Generator, grid: _Grid, scale: float) -> np.ndarray:
    cy, cx = _centre(rng, grid)
    u, v = _rotated(grid, cy, cx, rng.uniform(0, np.pi))
    a, b = rng.uniform(8, 22, 2) * scale
    return (np.abs(u) <= a) & (np.abs(v) <= b)


def _triangle(rng: np.random.Generator, grid: _Grid, scale: float) -> np.ndarray:
    cy, cx = _centre(rng, grid)
    r = rng.uniform(11, 28) * scale
    angles = rng.uniform(0, 2 * np.pi) + np.array([0, 2, 4]) * np.pi / 3 + rng.normal(0, 0.2, 3)
    pts = np.stack([cy + r * np.sin(angles), cx + r * np.cos(angles)], axis=1)
    orient = _orientation(pts)
    inside = np.ones(grid[0].shape, dtype=bool)
    for k in range(3):
        (y0, x0), (y1, x1) = pts[k], pts[(k + 1) % 3]
        # Cross product sign: which side of edge k a pixel lies on, relative to the winding.
        inside &= ((x1 - x0) * (grid[0] - y0) - (y1 - y0) * (grid[1] - x0)) * orient >= 0
    return inside


def _orientation(pts: np.ndarray) -> float:
    (y0, x0), (y1, x1), (y2, x2) = pts
    return float(np.sign((x1 - x0) * (y2 - y0) - (y1 - y0) * (x2 - x0)) or 1.0)


def _ring(rng: np.random.Generator, grid: _Grid, scale: float) -> np.ndarray:
    cy, cx = _centre(rng, grid)
    u, v = _rotated(grid, cy, cx, rng.uniform(0, np.pi))
    a = rng.uniform(12, 26) * scale
    b = a * rng.uniform(0.75, 1.0)
    d = (u / a) ** 2 + (v / b) ** 2
    return (d <= 1.0) & (d >= rng.uniform(0.3, 0.55))


def _bar(rng: np.random.Generator, grid: _Grid, scale: float) -> np.ndarray:
    cy, cx = _centre(rng, grid)
    half = rng.uniform(18, 45) * scale
    angle = rng.uniform(0, np.pi)
    d = np.array([np.sin(angle), np.cos(angle)]) * half
    p = np.array([cy, cx])
    return _segment_distance(grid, p - d, p + d) <= rng.uniform(3.0, 6.0) * scale


def _segment_distance(grid: _Grid, p0: np.ndarray, p1: np.ndarray) -> np.ndarray:
    """Distance of every pixel to the segment p0-p1 ((y, x) points)."""
    dy, dx = p1[0] - p0[0], p1[1] - p0[1]
    length2 = max(dy * dy + dx * dx, 1e-6)
    t = np.clip(((grid[0] - p0[0]) * dy + (grid[1] - p0[1]) * dx) / length2, 0.0, 1.0)
    return np.hypot(grid[0] - (p0[0] + t * dy), grid[1] - (p0[1] + t * dx))


# --- textures: each returns a blend factor in [0, 1] between an object's two colours ----------


def _spots(rng: np.random.Generator, grid: _Grid, scale: float) -> np.ndarray:
    u, v = _rotated(grid, *rng.uniform(0, 50, 2), rng.uniform(0, np.pi))
    f = 2 * np.pi / (rng.uniform(5, 8) * scale)
    return ((np.cos(u * f) * np.cos(v * f)) > 0.4).astype(np.float32)


def _stripes(rng: np.random.Generator, grid: _Grid, scale: float) -> np.ndarray:
    u, _ = _rotated(grid, 0.0, 0.0, rng.uniform(0, np.pi))
    f = 2 * np.pi / (rng.uniform(4, 8) * scale)
    return (np.sin(u * f + rng.uniform(0, 2 * np.pi)) > 0).astype(np.float32)


def _checker(rng: np.random.Generator, grid: _Grid, scale: float) -> np.ndarray:
    u, v = _rotated(grid, *rng.uniform(0, 50, 2), rng.uniform(0, np.pi))
    cell = rng.uniform(3, 6) * scale
    return ((np.floor(u / cell) + np.floor(v / cell)) % 2).astype(np.float32)


def _gradient(rng: np.random.Generator, grid: _Grid, scale: float) -> np.ndarray:
    h, w = grid[0].shape
    u, _ = _rotated(grid, h / 2, w / 2, rng.uniform(0, 2 * np.pi))
    return np.clip(u / (rng.uniform(20, 40) * scale) * 0.5 + 0.5, 0.0, 1.0).astype(np.float32)


def _grain(rng: np.random.Generator, grid: _Grid, scale: float) -> np.ndarray:
    return rng.random(grid[0].shape, dtype=np.float32)


_SHAPES: dict[int, Callable[[np.random.Generator, _Grid, float], np.ndarray]] = {
    1: _disc,
    2: _box,
    3: _triangle,
    4: _ring,
    5: _bar,
}
_TEXTURES: dict[int, Callable[[np.random.Generator, _Grid, float], np.ndarray]] = {
    1: _spots,
    2: _stripes,
    3: _checker,
    4: _gradient,
    5: _grain,
}


# --- colour and camera ---------------------------------------------------------------------


def _colour_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two random colours with a guaranteed brightness gap, so textures stay visible."""
    c0 = rng.uniform(0, 255, 3).astype(np.float32)
    shift = rng.uniform(50, 110) * rng.choice([-1.0, 1.0])
    c1 = np.clip(c0 + shift + rng.normal(0, 30, 3), 0, 255).astype(np.float32)
    return c0, c1


# Centre hue (degrees) of each object class's colour family.
_CLASS_HUES = {1: 0.0, 2: 120.0, 3: 55.0, 4: 215.0, 5: 290.0}


def _hsv(hue: float, saturation: float, value: float) -> np.ndarray:
    """HSV (hue in degrees, s and v in [0, 1]) → float32 RGB in [0, 255]."""
    rgb = colorsys.hsv_to_rgb((hue % 360.0) / 360.0, saturation, value)
    return np.array(rgb, dtype=np.float32) * 255.0


def _class_colour_pair(rng: np.random.Generator, cls: int) -> tuple[np.ndarray, np.ndarray]:
    """Two colours of the class's hue family (±20°), the second paler and darker (texture)."""
    hue = _CLASS_HUES[cls] + rng.uniform(-20.0, 20.0)
    saturation, value = rng.uniform(0.5, 1.0), rng.uniform(0.55, 1.0)
    c0 = _hsv(hue, saturation, value)
    c1 = _hsv(hue, saturation * rng.uniform(0.3, 0.7), value * rng.uniform(0.4, 0.7))
    return c0, c1


def _camera(rng: np.random.Generator, image: np.ndarray, grid: _Grid) -> np.ndarray:
    """Per-image lighting gradient, contrast and Gaussian sensor noise; returns uint8."""
    h, w = grid[0].shape
    u, _ = _rotated(grid, h / 2, w / 2, rng.uniform(0, 2 * np.pi))
    light = 1.0 + rng.uniform(0.0, 0.35) * u / max(h, w)
    image = image * light[..., None] * rng.uniform(0.7, 1.15)
    image = image + rng.normal(0.0, rng.uniform(2.0, 12.0), image.shape).astype(np.float32)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


# --- files ---------------------------------------------------------------------------------


def write_samples(
    out_dir: str | Path,
    n: int,
    seed: int = 0,
    size: tuple[int, int] = (128, 128),
    split: str = "val",
    with_masks: bool = False,
    mode: str = "default",
) -> list[Path]:
    """Write ``n`` scenes of ``split`` as ``<split>_0000.png``... into ``out_dir``; return them.

    With ``with_masks`` the class masks go to ``out_dir/masks/`` as palette PNGs (same names,
    pixel value = class id), i.e. ``out_dir`` becomes an images/masks pair for quick checks.

    Example:
        >>> import tempfile
        >>> paths = write_samples(tempfile.mkdtemp(), 2, size=(32, 32))
        >>> [p.name for p in paths]
        ['val_0000.png', 'val_0001.png']
    """
    if n < 0:
        raise ValueError(f"number of samples must be >= 0, got {n}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if with_masks:
        (out / "masks").mkdir(exist_ok=True)
    flat_palette = [c for rgb in palette(mode) for c in rgb]
    paths = []
    for i in range(n):
        rgb, mask = generate_scene(seed, scene_index(split, i), size, mode)
        path = out / f"{split}_{i:04d}.png"
        Image.fromarray(rgb, mode="RGB").save(path)
        if with_masks:
            indexed = Image.fromarray(mask, mode="P")
            indexed.putpalette(flat_palette)
            indexed.save(out / "masks" / path.name)
        paths.append(path)
    return paths


def write_folder_dataset(
    root: str | Path,
    counts: dict[str, int],
    seed: int = 0,
    size: tuple[int, int] = (128, 128),
    mode: str = "default",
) -> dict[str, int]:
    """Write ``counts[split]`` scenes per split as the folder layout ``data.kind: folder`` reads.

    ``images/<split>/<split>_0000.png`` + ``masks/<split>/<same name>`` (palette PNGs, value =
    class id) + ``classes.yaml`` (names, colours). Returns the counts written.

    Example:
        >>> import tempfile, yaml
        >>> root = Path(tempfile.mkdtemp())
        >>> write_folder_dataset(root, {"train": 2, "test": 1}, size=(32, 32), mode="imbalanced")
        {'train': 2, 'test': 1}
        >>> sorted(p.name for p in (root / "masks" / "test").iterdir())
        ['test_0000.png']
        >>> yaml.safe_load((root / "classes.yaml").read_text())["names"][-1]
        'beacon'
    """
    import yaml  # only the dataset writer needs it

    root = Path(root)
    for split, n in counts.items():
        images, masks = root / "images" / split, root / "masks" / split
        for folder in (images, masks):  # a rewrite replaces the split, leaving no stale pairs
            shutil.rmtree(folder, ignore_errors=True)
        write_samples(images, n, seed=seed, size=size, split=split, with_masks=True, mode=mode)
        masks.parent.mkdir(parents=True, exist_ok=True)
        (images / "masks").replace(masks)
    classes = {"names": list(class_names(mode)), "colors": [list(c) for c in palette(mode)]}
    (root / "classes.yaml").write_text(yaml.safe_dump(classes, default_flow_style=None))
    return dict(counts)

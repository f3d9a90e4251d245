"""Resize/normalise images into a model batch, and turn logits back into masks.

This is the single definition of what the model sees. Training's validation transform and
the serving handler both call :func:`prepare_image`, so a served mask equals an offline one.

Resize policies (``PreprocessSpec.resize_policy``):

* ``resize`` — every image is resized (bilinear, antialiased) to ``input_size``; a batch of
  images of any sizes is one tensor of shape ``(N, 3, *input_size)``.
* ``pad`` — images keep their native resolution; a batch is padded at the bottom/right to the
  largest height/width rounded up to ``size_divisor`` (smp models silently return wrong-sized
  maps otherwise), and each prediction is cropped back before upsampling.

Example:
    >>> spec = PreprocessSpec(input_size=(64, 64))
    >>> rgb = torch.zeros(3, 30, 50, dtype=torch.uint8)
    >>> x, geometry = prepare_image(rgb, spec)
    >>> tuple(x.shape), geometry.original_size
    ((3, 64, 64), (30, 50))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

RESIZE_POLICIES = ("resize", "pad")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# smp encoders downsample 5 times: H and W must be multiples of 32, or a traced model silently
# returns wrong-sized maps. The one definition; a metadata's preprocess.size_divisor may differ.
SIZE_DIVISOR = 32


@dataclass(frozen=True)
class PreprocessSpec:
    """What the model expects: resolved once by training, stored in the model metadata."""

    input_size: tuple[int, int]
    resize_policy: str = "resize"
    size_divisor: int = SIZE_DIVISOR
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        h, w = self.input_size
        if self.resize_policy not in RESIZE_POLICIES:
            raise ValueError(
                f"resize_policy {self.resize_policy!r} is not one of {list(RESIZE_POLICIES)}"
            )
        if self.size_divisor < 1:
            raise ValueError(f"size_divisor must be >= 1, got {self.size_divisor}")
        if h % self.size_divisor or w % self.size_divisor or h <= 0 or w <= 0:
            raise ValueError(
                f"input_size {list(self.input_size)} must be positive multiples of "
                f"size_divisor={self.size_divisor}"
            )
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("mean and std need 3 values each, std > 0")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PreprocessSpec:
        """Build from the metadata's ``preprocess`` section, naming a missing key."""
        if "input_size" not in data:
            raise ValueError("preprocess metadata lacks 'input_size'")
        known = {"input_size", "resize_policy", "size_divisor", "mean", "std"}
        kwargs = {k: data[k] for k in known if k in data}
        kwargs["input_size"] = tuple(int(v) for v in kwargs["input_size"])
        for key in ("mean", "std"):
            if key in kwargs:
                kwargs[key] = tuple(float(v) for v in kwargs[key])
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_size": list(self.input_size),
            "resize_policy": self.resize_policy,
            "size_divisor": self.size_divisor,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": "bilinear-antialias",
        }


@dataclass(frozen=True)
class Geometry:
    """Where one image sits inside the model tensor, to map predictions back."""

    original_size: tuple[int, int]
    content_size: tuple[int, int]


def rgb_array_to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """``(H, W, 3)`` uint8 array → ``(3, H, W)`` uint8 tensor (a view when the array allows it)."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 array, got {rgb.shape} {rgb.dtype}")
    if not rgb.flags.writeable:
        # torch.from_numpy warns on read-only memory (e.g. np.asarray of a PIL image).
        rgb = rgb.copy()
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)


def prepare_image(image: torch.Tensor, spec: PreprocessSpec) -> tuple[torch.Tensor, Geometry]:
    """``(3, H, W)`` uint8 → normalised float ``(3, h, w)`` on the image's device.

    Resizing happens in float32 so CPU and GPU agree closely and CPU is exactly repeatable.
    """
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) tensor, got {tuple(image.shape)}")
    original = (int(image.shape[1]), int(image.shape[2]))
    x = image.to(torch.float32)
    if spec.resize_policy == "resize" and original != spec.input_size:
        x = F.interpolate(
            x[None], size=spec.input_size, mode="bilinear", align_corners=False, antialias=True
        )[0]
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=x.device).view(3, 1, 1) * 255.0
    std = torch.tensor(spec.std, dtype=torch.float32, device=x.device).view(3, 1, 1) * 255.0
    x = (x - mean) / std
    return x, Geometry(original_size=original, content_size=(int(x.shape[1]), int(x.shape[2])))


def padded_size(sizes: Sequence[tuple[int, int]], divisor: int) -> tuple[int, int]:
    """Smallest ``(H, W)`` that holds every size and is a multiple of ``divisor``."""
    h = max(s[0] for s in sizes)
    w = max(s[1] for s in sizes)
    return (-(-h // divisor) * divisor, -(-w // divisor) * divisor)


def collate(images: Sequence[torch.Tensor], spec: PreprocessSpec) -> torch.Tensor:
    """Stack prepared images into one batch, zero-padding (= the mean colour) bottom/right."""
    if not images:
        raise ValueError("cannot collate an empty batch")
    target = padded_size([(int(x.shape[1]), int(x.shape[2])) for x in images], spec.size_divisor)
    batch = images[0].new_zeros((len(images), 3, *target))
    for i, x in enumerate(images):
        batch[i, :, : x.shape[1], : x.shape[2]] = x
    return batch


# Elements of one float32 tile of full-resolution logits (16 MiB): post-processing never holds
# num_classes x H x W floats, whatever the image size.
TILE_ELEMENTS = 1 << 22


def mask_dtype(num_classes: int) -> torch.dtype:
    """The smallest integer dtype that holds every class id (uint8 up to 256 classes).

    >>> mask_dtype(21), mask_dtype(300)
    (torch.uint8, torch.int16)
    """
    if num_classes <= 256:
        return torch.uint8
    return torch.int16 if num_classes <= 32768 else torch.int32


def _bilinear_taps(
    in_size: int, out_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indices and weights of bilinear resampling (``align_corners=False``, like
    ``F.interpolate``): output ``i`` = ``w0[i] * x[i0[i]] + w1[i] * x[i1[i]]``."""
    scale = in_size / out_size
    src = (torch.arange(out_size, device=device, dtype=torch.float32) + 0.5) * scale - 0.5
    src = src.clamp(min=0.0)
    i0 = src.floor().to(torch.int64).clamp(max=in_size - 1)
    i1 = (i0 + 1).clamp(max=in_size - 1)
    w1 = src - i0.to(torch.float32)
    return i0, i1, 1.0 - w1, w1


def _argmax_and_confidence(x: torch.Tensor, mask: torch.Tensor, confidence: torch.Tensor) -> None:
    """``(C, h, w)`` logits → ``mask`` (first index of the largest logit) and ``confidence``
    (its softmax probability), written in place. A loop over classes of whole-plane
    operations: several times faster on CPU than reductions across the class dimension."""
    top = x[0].clone()
    mask.zero_()
    for c in range(1, x.shape[0]):
        mask.masked_fill_(x[c] > top, c)  # strictly greater: ties keep the first class
        torch.maximum(top, x[c], out=top)
    total = torch.zeros_like(top)
    for c in range(x.shape[0]):
        total.add_(torch.exp(x[c] - top))
    torch.reciprocal(total, out=confidence)


def _resample_rows(
    x: torch.Tensor, dim: int, taps: tuple[torch.Tensor, ...], shape: tuple[int, ...]
) -> torch.Tensor:
    """``w0 * x[i0] + w1 * x[i1]`` along ``dim``: separate multiplies and adds (no fused
    multiply-add), so each value is the same IEEE arithmetic in whichever strip or vector
    lane it is computed."""
    i0, i1, w0, w1 = taps
    near = torch.index_select(x, dim, i0).mul_(w0.view(shape))
    return near.add_(torch.index_select(x, dim, i1).mul_(w1.view(shape)))


def _first_argmax(x: torch.Tensor) -> torch.Tensor:
    """Class ids of ``(C, ...)`` logits: the first index of the largest value (ties keep the
    lower class), the rule :func:`_argmax_and_confidence` applies."""
    top = x[0].clone()
    ids = torch.zeros(x.shape[1:], dtype=torch.int64, device=x.device)
    for c in range(1, x.shape[0]):
        ids.masked_fill_(x[c] > top, c)
        torch.maximum(top, x[c], out=top)
    return ids


def _spread(cells: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``cells[rows][:, cols]`` for sorted ``rows``/``cols`` (bilinear taps always are): on CPU
    numpy's repeat, several times faster there than two index_selects; the same values."""
    if cells.device.type != "cpu":
        return cells.index_select(0, rows).index_select(1, cols)
    down = np.bincount(rows.numpy(), minlength=cells.shape[0])
    across = np.bincount(cols.numpy(), minlength=cells.shape[1])
    return torch.from_numpy(np.repeat(np.repeat(cells.numpy(), down, 0), across, 1))


def _neighbour_classes(
    low: torch.Tensor, y0: torch.Tensor, x0: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(class of each output pixel's top-left low-resolution neighbour, where its four
    neighbours disagree), both at the output size. The other neighbours are row/column
    ``i + 1`` clamped to the edge, as :func:`_bilinear_taps` makes them, so the test runs
    once per low-resolution cell and is then spread to the pixels that cell covers."""
    h, w = low.shape
    below = torch.arange(1, h + 1, device=low.device).clamp_(max=h - 1)
    right = torch.arange(1, w + 1, device=low.device).clamp_(max=w - 1)
    down = low.index_select(0, below)
    mixed = (low != low.index_select(1, right)) | (low != down)
    mixed |= low != down.index_select(1, right)
    return _spread(low, y0, x0), _spread(mixed, y0, x0)


def _fill_boundary(
    mask: torch.Tensor,
    boundary: torch.Tensor,
    x: torch.Tensor,
    y_taps: tuple[torch.Tensor, ...],
    x_taps: tuple[torch.Tensor, ...],
    tile_elements: int,
) -> None:
    """Write the class of every ``boundary`` pixel into ``mask`` from its four low-resolution
    neighbours' logits, with the arithmetic of the full upsampling (:func:`_resample_rows`
    across, then down: the same IEEE operations in the same order, so the same bits), in
    strips of output rows of at most ``tile_elements`` floats per tap."""
    y0, y1, wy0, wy1 = y_taps
    x0, x1, wx0, wx1 = x_taps
    num_classes, (height, width) = x.shape[0], mask.shape
    flat, stride = x.reshape(num_classes, -1), x.shape[2]
    out = mask.view(-1)
    step = max(1, tile_elements // max(num_classes * width, 1))
    for r0 in range(0, height, step):
        rows, cols = torch.nonzero(boundary[r0 : r0 + step], as_tuple=True)
        if rows.numel() == 0:
            continue
        rows = rows + r0
        upper, lower = y0[rows] * stride, y1[rows] * stride
        left, right, w_left, w_right = x0[cols], x1[cols], wx0[cols], wx1[cols]
        top = flat.index_select(1, upper + left).mul_(w_left)
        top.add_(flat.index_select(1, upper + right).mul_(w_right))
        bottom = flat.index_select(1, lower + left).mul_(w_left)
        bottom.add_(flat.index_select(1, lower + right).mul_(w_right))
        value = top.mul_(wy0[rows]).add_(bottom.mul_(wy1[rows]))
        out[rows * width + cols] = _first_argmax(value).to(mask.dtype)


def logits_to_prediction(
    logits: torch.Tensor,
    geometry: Geometry,
    tile_elements: int = TILE_ELEMENTS,
    with_confidence: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One image's ``(C, H', W')`` logits → (class mask ``(H, W)``, confidence float32 or None).

    The mask is the argmax of the logits cropped to the image's content and upsampled
    (bilinear) to the original size: upsampling a class mask instead loses edges. Where the
    four low-resolution neighbours of an output pixel share one argmax, interpolation cannot
    change it (a convex combination keeps the winner; ties keep the first class either way),
    so only pixels near a class boundary get their upsampled logits computed; elsewhere the
    neighbours' class is the answer. This is the one definition of a mask: the handler and
    ``training.predict`` both call it.

    ``with_confidence`` also returns the winner's softmax probability at every pixel, which
    needs the full upsampling; it runs in strips of output rows of at most ``tile_elements``
    floats, so a 40-megapixel answer costs tens of megabytes, not gigabytes. The result does
    not depend on ``tile_elements`` (tested bit for bit). The mask's dtype is
    :func:`mask_dtype` of the class count.
    """
    ch, cw = geometry.content_size
    num_classes = int(logits.shape[0])
    x = logits[:, :ch, :cw].to(torch.float32)
    height, width = geometry.original_size
    dtype = mask_dtype(num_classes)
    rows = max(1, tile_elements // max(num_classes * width, 1))
    confidence = None
    if with_confidence:
        confidence = torch.empty((height, width), dtype=torch.float32, device=x.device)
    if (ch, cw) == (height, width):
        mask = torch.empty((height, width), dtype=dtype, device=x.device)
        if confidence is None:
            return _first_argmax(x).to(dtype), None
        for r0 in range(0, height, rows):
            r1 = min(r0 + rows, height)
            _argmax_and_confidence(x[:, r0:r1], mask[r0:r1], confidence[r0:r1])
        return mask, confidence
    y_taps = _bilinear_taps(ch, height, x.device)
    x_taps = _bilinear_taps(cw, width, x.device)
    mask, boundary = _neighbour_classes(_first_argmax(x).to(dtype), y_taps[0], x_taps[0])
    # Sparse boundaries (a real model's masks): only those pixels' logits. Dense ones (noise),
    # or a per-pixel confidence: the full upsampling in strips costs less per pixel.
    if confidence is None and 2 * int(boundary.sum()) <= boundary.numel():
        _fill_boundary(mask, boundary, x, y_taps, x_taps, tile_elements)
        return mask, None
    full = torch.empty((height, width), dtype=dtype, device=x.device)
    y0, y1, wy0, wy1 = y_taps
    for r0 in range(0, height, rows):
        r1 = min(r0 + rows, height)
        lo, hi = int(y0[r0]), int(y1[r1 - 1]) + 1
        # Width first, then height: the order F.interpolate's bilinear kernel uses.
        across = _resample_rows(x[:, lo:hi], 2, x_taps, (1, 1, -1))
        down_taps = (y0[r0:r1] - lo, y1[r0:r1] - lo, wy0[r0:r1], wy1[r0:r1])
        strip = _resample_rows(across, 1, down_taps, (1, -1, 1))
        if confidence is None:
            full[r0:r1] = _first_argmax(strip).to(dtype)
        else:
            _argmax_and_confidence(strip, full[r0:r1], confidence[r0:r1])
    # Boundary pixels from the full upsampling (the same arithmetic as _fill_boundary), the
    # rest from their neighbours: one mask whether or not the confidence was asked for.
    torch.where(boundary, full, mask, out=mask)
    return mask, confidence


def model_resolution_prediction(
    logits: torch.Tensor, geometry: Geometry
) -> tuple[torch.Tensor, torch.Tensor]:
    """(class ids, winner's softmax probability) at the model's resolution, cropped to the
    content: cheap per-class statistics (telemetry) without upsampling anything.

    >>> ids, conf = model_resolution_prediction(torch.zeros(3, 4, 4), Geometry((8, 8), (2, 2)))
    >>> ids.shape, round(float(conf[0, 0]), 3)
    (torch.Size([2, 2]), 0.333)
    """
    ch, cw = geometry.content_size
    x = logits[:, :ch, :cw].to(torch.float32)
    ids = torch.empty((ch, cw), dtype=mask_dtype(int(logits.shape[0])), device=x.device)
    confidence = torch.empty((ch, cw), dtype=torch.float32, device=x.device)
    _argmax_and_confidence(x, ids, confidence)
    return ids, confidence

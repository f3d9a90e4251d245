"""Opt-in inference modes for evaluation and offline prediction: test-time augmentation
(horizontal flip, several scales) and sliding-window inference.

None of this is on the default path: ``training.predict.segment`` (the served masks' offline
reference) is untouched, and :func:`segment_with_options` is called only when
:class:`InferenceOptions` asks for something. The model still sees what serving feeds it
(``handler.preprocessing.prepare_image``); then

* every variant (each scale, flipped or not) is run, its logits turned into softmax
  probabilities, flipped back and resized (bilinear) to the image's *original* size, and the
  probabilities are averaged there; the mask is their argmax (ties: the lower class), the
  confidence their maximum;
* with a window, each variant is tiled by windows of ``window`` pixels (a multiple of the
  model's ``size_divisor``) every ``stride`` pixels, the last window of a row or column moved
  in to end at the border, and overlapping probabilities are averaged. Windows tile the
  tensor the model would see: under ``resize_policy: pad`` that is the native resolution (the
  case windows are for: images larger than the training crop); under ``resize`` it is
  ``input_size`` already.

Example:
    >>> model = lambda x: torch.zeros(x.shape[0], 2, *x.shape[2:])
    >>> spec = PreprocessSpec(input_size=(32, 32), resize_policy="pad")
    >>> options = InferenceOptions(flip=True, scales=(0.5, 1.0), window=(32, 32))
    >>> [m.shape for m, _ in segment_with_options(model, [np.zeros((40, 70, 3), np.uint8)],
    ...                                           spec, options)]
    [(40, 70)]
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from handler.pixels import host_to_device
from handler.preprocessing import PreprocessSpec, mask_dtype, padded_size, prepare_image

Model = Callable[[torch.Tensor], torch.Tensor]
Prediction = tuple[np.ndarray, np.ndarray]
# Output pixels per forward group: probabilities are held at the original size (C floats per
# pixel, twice), so two 2048x1024 images share a forward, sixteen would need gigabytes.
GROUP_PIXELS = 1 << 22


class InferenceError(ValueError):
    """Inference options that cannot be used; the message names the flag and the fix."""


@dataclass(frozen=True)
class InferenceOptions:
    """What to average: ``flip`` (also the mirror image), ``scales`` (the model input resized
    by each factor), ``window``/``stride`` ((H, W) pixels; stride default: half the window).

    Example:
        >>> InferenceOptions().is_plain, InferenceOptions(flip=True).tag
        (True, 'flip')
        >>> InferenceOptions(scales=(0.75, 1.0), window=(64, 64)).tag
        'scales0.75_1-window64x64-stride32x32'
    """

    flip: bool = False
    scales: tuple[float, ...] = (1.0,)
    window: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if not self.scales or any(not (0.05 <= s <= 8.0) for s in self.scales):
            raise InferenceError(
                f"--scales: factors in [0.05, 8], e.g. 0.75,1,1.25; got {list(self.scales)}"
            )
        if self.window is not None and min(self.window) < 1:
            raise InferenceError(f"--window: positive sizes, got {self.window}")
        if self.stride is not None:
            if self.window is None:
                raise InferenceError("--stride needs --window (the window it moves)")
            if min(self.stride) < 1 or any(
                s > w for s, w in zip(self.stride, self.window, strict=True)
            ):
                raise InferenceError(
                    f"--stride {self.stride[0]}x{self.stride[1]}: each side in 1..the window's "
                    f"({self.window[0]}x{self.window[1]}); a larger stride would skip pixels"
                )

    @property
    def is_plain(self) -> bool:
        """True when nothing is asked for: callers use the default path instead."""
        return not self.flip and tuple(self.scales) == (1.0,) and self.window is None

    @property
    def resolved_stride(self) -> tuple[int, int] | None:
        if self.window is None:
            return None
        return self.stride or (max(1, self.window[0] // 2), max(1, self.window[1] // 2))

    @property
    def tag(self) -> str:
        """A short name for output folders; "" when plain."""
        parts = ["flip"] if self.flip else []
        if tuple(self.scales) != (1.0,):
            parts.append("scales" + "_".join(f"{s:g}" for s in self.scales))
        if self.window is not None:
            (wh, ww), (sh, sw) = self.window, self.resolved_stride
            parts.append(f"window{wh}x{ww}-stride{sh}x{sw}")
        return "-".join(parts)

    def describe(self) -> dict[str, Any]:
        """JSON-ready settings, written next to the metrics they produced."""
        stride = self.resolved_stride
        return {
            "flip": self.flip,
            "scales": list(self.scales),
            "window": list(self.window) if self.window else None,
            "stride": list(stride) if stride else None,
        }

    def check_for(self, spec: PreprocessSpec) -> None:
        """Windows must be multiples of the model's ``size_divisor`` (smp models need it)."""
        if self.window is not None and any(w % spec.size_divisor for w in self.window):
            d = spec.size_divisor
            fixed = "x".join(str(max(d, round(w / d) * d)) for w in self.window)
            raise InferenceError(
                f"--window {self.window[0]}x{self.window[1]}: each side must be a multiple of "
                f"{d} (the model's size_divisor), e.g. --window {fixed}"
            )


def parse_size(text: str, flag: str) -> tuple[int, int]:
    """``"256x512"`` (H x W) or ``"256"`` (square) → ``(H, W)``; a bad value names ``flag``.

    Example:
        >>> parse_size("256x512", "--window"), parse_size("96", "--stride")
        ((256, 512), (96, 96))
    """
    match = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?", text)
    if not match or int(match.group(1)) < 1 or int(match.group(2) or 1) < 1:
        raise InferenceError(f"{flag} {text!r}: expected HxW in pixels, e.g. 512x512 (or 512)")
    h = int(match.group(1))
    return h, int(match.group(2) or h)


def parse_scales(text: str) -> tuple[float, ...]:
    """``"0.75,1,1.25"`` → ``(0.75, 1.0, 1.25)``; a bad value names ``--scales``.

    Example:
        >>> parse_scales("0.75, 1,1.25")
        (0.75, 1.0, 1.25)
    """
    try:
        scales = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise InferenceError(
            f"--scales {text!r}: expected comma-separated factors, e.g. 0.75,1,1.25"
        ) from None
    return scales


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Where windows start along a side of ``length``: every ``stride``, the last one moved in
    to end at the border (no window hangs over the edge; a side shorter than the window gets
    one window, padded).

    Example:
        >>> window_starts(10, 4, 3), window_starts(11, 4, 3), window_starts(3, 4, 2)
        ([0, 3, 6], [0, 3, 6, 7], [0])
    """
    if length <= window:
        return [0]
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] != length - window:
        starts.append(length - window)
    return starts


def _pad(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Zero-pad bottom/right (0 is the mean colour after normalisation, as ``collate`` pads)."""
    return F.pad(x, (0, width - x.shape[-1], 0, height - x.shape[-2]))


def padded_forward(fn: Model, x: torch.Tensor, size_divisor: int) -> torch.Tensor:
    """``fn`` on ``x`` padded to a multiple of ``size_divisor``, cropped back to ``x``'s size."""
    h, w = x.shape[-2:]
    ph, pw = padded_size([(h, w)], size_divisor)
    out = fn(_pad(x, ph, pw) if (ph, pw) != (h, w) else x)
    return out[..., :h, :w]


def sliding_window(
    fn: Model, x: torch.Tensor, window: tuple[int, int], stride: tuple[int, int]
) -> torch.Tensor:
    """``fn`` over windows of ``x`` ``(N, 3, H, W)``, overlaps averaged: ``(N, C, H, W)``.

    A side shorter than the window is padded (the mean colour) to the window, and cropped
    after. ``fn`` must return maps of its input's size (a segmentation model does).
    """
    h, w = int(x.shape[-2]), int(x.shape[-1])
    (wh, ww), (sh, sw) = window, stride
    ph, pw = max(h, wh), max(w, ww)
    xp = _pad(x, ph, pw) if (ph, pw) != (h, w) else x
    total: torch.Tensor | None = None
    count = torch.zeros((1, 1, ph, pw), dtype=torch.float32, device=x.device)
    for top in window_starts(ph, wh, sh):
        for left in window_starts(pw, ww, sw):
            out = fn(xp[..., top : top + wh, left : left + ww]).to(torch.float32)
            if tuple(out.shape[-2:]) != (wh, ww):
                raise InferenceError(
                    f"--window {wh}x{ww}: the model answered a {wh}x{ww} window with a "
                    f"{out.shape[-2]}x{out.shape[-1]} map; use a window it accepts"
                )
            if total is None:
                total = out.new_zeros((out.shape[0], out.shape[1], ph, pw))
            total[..., top : top + wh, left : left + ww] += out
            count[..., top : top + wh, left : left + ww] += 1
    assert total is not None  # at least one window
    return (total / count)[..., :h, :w]


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)


@torch.inference_mode()
def tta_probabilities(
    model: Model,
    x: torch.Tensor,
    out_size: tuple[int, int],
    options: InferenceOptions,
    size_divisor: int,
) -> torch.Tensor:
    """Softmax probabilities of prepared images ``x`` ``(N, 3, h, w)``, averaged over the
    variants of ``options``, at ``out_size`` (the images' original size): ``(N, C, *out_size)``.
    """

    def probabilities(t: torch.Tensor) -> torch.Tensor:
        return model(t).to(torch.float32).softmax(dim=1)

    h, w = int(x.shape[-2]), int(x.shape[-1])
    total: torch.Tensor | None = None
    variants = 0
    for scale in options.scales:
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        scaled = _resize(x, size)
        for flipped in (False, True) if options.flip else (False,):
            t = scaled.flip(-1) if flipped else scaled
            if options.window is not None:
                probs = sliding_window(probabilities, t, options.window, options.resolved_stride)
            else:
                probs = padded_forward(probabilities, t, size_divisor)
            if flipped:
                probs = probs.flip(-1)
            probs = _resize(probs, out_size)
            total = probs if total is None else total + probs
            variants += 1
    assert total is not None
    return total / variants


def segment_with_options(
    model: Model,
    images: Sequence[np.ndarray],
    spec: PreprocessSpec,
    options: InferenceOptions,
    device: str = "cpu",
) -> list[Prediction]:
    """RGB uint8 images → (class-id mask, confidence float32) at each image's size, through
    :func:`tta_probabilities`. Images with the same prepared and original size share forwards,
    up to :data:`GROUP_PIXELS` output pixels at a time.
    """
    options.check_for(spec)
    on = torch.device(device)
    prepared = [prepare_image(host_to_device(rgb, on), spec) for rgb in images]
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, (x, geometry) in enumerate(prepared):
        groups[(tuple(x.shape), geometry.original_size)].append(i)
    results: list[Prediction | None] = [None] * len(images)
    for (_, original), same in groups.items():
        step = max(1, GROUP_PIXELS // (original[0] * original[1]))
        for start in range(0, len(same), step):
            indices = same[start : start + step]
            batch = torch.stack([prepared[i][0] for i in indices])
            probs = tta_probabilities(model, batch, original, options, spec.size_divisor)
            confidence, ids = probs.max(dim=1)  # ties: the first (lower) class, as plain
            dtype = mask_dtype(int(probs.shape[1]))
            for row, i in enumerate(indices):
                results[i] = (ids[row].to(dtype).cpu().numpy(), confidence[row].cpu().numpy())
    return results  # type: ignore[return-value]


def add_arguments(parser: Any) -> None:
    """The ``--tta``, ``--scales``, ``--window`` and ``--stride`` flags of evaluate and predict."""
    group = parser.add_argument_group(
        "test-time augmentation / sliding window (opt-in; the default is the served path)"
    )
    group.add_argument(
        "--tta",
        choices=["flip"],
        help="flip: also run the mirror image and average the softmax probabilities",
    )
    group.add_argument(
        "--scales", help="run the model input at each factor and average, e.g. 0.75,1,1.25"
    )
    group.add_argument(
        "--window",
        help="sliding-window inference with HxW windows (multiples of 32), e.g. 512x512",
    )
    group.add_argument("--stride", help="HxW step between windows (default: half the window)")


def options_from_args(args: Any) -> InferenceOptions | None:
    """The options the flags of :func:`add_arguments` ask for; None when none is given."""
    if not (args.tta or args.scales or args.window or args.stride):
        return None
    return InferenceOptions(
        flip=args.tta == "flip",
        scales=parse_scales(args.scales) if args.scales else (1.0,),
        window=parse_size(args.window, "--window") if args.window else None,
        stride=parse_size(args.stride, "--stride") if args.stride else None,
    )

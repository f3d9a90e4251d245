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


@dataclass(frozen=True)
class PreprocessSpec:
    """What the model expects: resolved once by training, stored in the model metadata."""

    input_size: tuple[int, int]
    resize_policy: str = "resize"
    size_divisor: int = 32
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


def logits_to_prediction(
    logits: torch.Tensor, geometry: Geometry
) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's ``(C, H', W')`` logits → (class mask ``(H, W)`` int64, confidence float32).

    Logits are cropped to the image's content, upsampled (bilinear) to the original size,
    and only then soft-maxed and arg-maxed: upsampling a class mask instead loses edges.
    """
    ch, cw = geometry.content_size
    x = logits[:, :ch, :cw].to(torch.float32)
    if (ch, cw) != geometry.original_size:
        x = F.interpolate(
            x[None], size=geometry.original_size, mode="bilinear", align_corners=False
        )[0]
    confidence, mask = torch.softmax(x, dim=0).max(dim=0)
    return mask, confidence

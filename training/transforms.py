"""Training and validation transforms: ``(rgb uint8 (H,W,3), mask (H,W))`` → tensors.

Both derive from one :class:`~handler.preprocessing.PreprocessSpec`, so what training feeds
the model and what serving feeds it cannot drift apart:

* :func:`build_val_transform` *is* the serving preprocessing: it calls
  :func:`handler.preprocessing.prepare_image` on the image and resizes the mask with nearest
  neighbour to the same size (``resize`` policy) or leaves it alone (``pad`` policy).
* :func:`build_train_transform` is an albumentations 2.x pipeline: random scale, pad-if-needed
  (image 0, mask ``ignore_index``), random crop to ``input_size``, flips, rotation (border =
  ``ignore_index``), colour jitter, Gaussian noise, then the same normalisation. Masks are only
  ever moved with nearest neighbour, so they keep exactly the label values they had.

Example:
    >>> import numpy as np
    >>> from handler.preprocessing import PreprocessSpec
    >>> from training.config import AugmentConfig
    >>> spec = PreprocessSpec(input_size=(64, 64))
    >>> rgb, mask = np.zeros((40, 50, 3), np.uint8), np.ones((40, 50), np.int64)
    >>> x, y = build_train_transform(AugmentConfig(), spec, seed=0)(rgb, mask)
    >>> tuple(x.shape), x.dtype, tuple(y.shape), y.dtype
    ((3, 64, 64), torch.float32, (64, 64), torch.int64)
    >>> x, y = build_val_transform(spec)(rgb, mask)
    >>> tuple(x.shape), sorted(y.unique().tolist())
    ((3, 64, 64), [1])
"""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np
import torch
import torch.nn.functional as F

from handler.preprocessing import PreprocessSpec, prepare_image, rgb_array_to_tensor
from training.config import AugmentConfig


def _check_pair(rgb: np.ndarray, mask: np.ndarray) -> None:
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {rgb.shape} {rgb.dtype}")
    if mask.shape != rgb.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} differs from image shape {rgb.shape[:2]}")


def _mask_dtype(ignore_index: int) -> type:
    """Smallest dtype OpenCV warps with nearest neighbour that still holds ``ignore_index``."""
    if 0 <= ignore_index <= 255:
        return np.uint8
    if 0 <= ignore_index <= 65535:
        return np.uint16
    raise ValueError(
        f"ignore_index={ignore_index} cannot be carried through augmentation; use a value in "
        "[0, 65535] (255 is the convention)"
    )


class TrainTransform:
    """Random augmentation + normalisation; deterministic given ``seed`` (see :meth:`reseed`)."""

    def __init__(self, pipeline: A.Compose, ignore_index: int) -> None:
        self.pipeline = pipeline
        self.ignore_index = ignore_index
        self._mask_dtype = _mask_dtype(ignore_index)

    def reseed(self, seed: int) -> None:
        """Restart the random stream (DataLoader workers call this with their own seed)."""
        self.pipeline.set_random_seed(int(seed) % 2**32)

    def __call__(self, rgb: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        _check_pair(rgb, mask)
        limit = np.iinfo(self._mask_dtype).max
        if mask.size and (int(mask.min()) < 0 or int(mask.max()) > limit):
            raise ValueError(f"mask values must lie in [0, {limit}] for augmentation")
        out = self.pipeline(image=rgb, mask=mask.astype(self._mask_dtype, copy=False))
        image = torch.from_numpy(np.ascontiguousarray(out["image"].transpose(2, 0, 1)))
        return image.to(torch.float32), torch.from_numpy(out["mask"].astype(np.int64))


def build_train_transform(
    augment: AugmentConfig,
    spec: PreprocessSpec,
    ignore_index: int = 255,
    seed: int | None = None,
) -> TrainTransform:
    """The training pipeline for ``spec``'s resize policy.

    ``augment`` fields: ``hflip``/``vflip`` are probabilities; ``scale`` is the (min, max)
    zoom factor; ``rotate`` the maximum angle in degrees (0 = off); ``color_jitter`` the
    brightness/contrast/saturation strength (hue gets a quarter of it), applied with p=0.8;
    ``noise`` the maximum Gaussian noise std as a fraction of 255, applied with p=0.5.

    ``seed=None`` draws the seed from torch's global generator, so ``torch.manual_seed``
    (set by the training loop from the recipe seed) makes augmentation reproducible too.

    Example:
        >>> from training.config import AugmentConfig
        >>> t = build_train_transform(AugmentConfig(rotate=10), PreprocessSpec((32, 32)), seed=1)
        >>> type(t).__name__
        'TrainTransform'
    """
    lo, hi = augment.scale
    if not 0 < lo <= hi:
        raise ValueError(f"data.augment.scale: need 0 < min <= max, got {[lo, hi]}")
    for name in ("hflip", "vflip"):
        if not 0.0 <= getattr(augment, name) <= 1.0:
            raise ValueError(
                f"data.augment.{name}: a probability in [0, 1], got {getattr(augment, name)}"
            )
    h, w = spec.input_size
    steps: list[A.BasicTransform] = []
    if spec.resize_policy == "resize":
        # INTER_AREA when shrinking, close to the antialiased resize serving uses.
        steps.append(
            A.Resize(h, w, area_for_downscale="image", mask_interpolation=cv2.INTER_NEAREST)
        )
    if (lo, hi) != (1.0, 1.0):
        steps.append(
            A.RandomScale(
                scale_limit=(lo - 1.0, hi - 1.0),
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=cv2.INTER_NEAREST,
                p=1.0,
            )
        )
    steps += [
        A.PadIfNeeded(h, w, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=ignore_index),
        A.RandomCrop(h, w),
    ]
    steps += _geometric(augment, ignore_index)
    steps += _photometric(augment)
    steps.append(A.Normalize(mean=spec.mean, std=spec.std, max_pixel_value=255.0))
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, ()).item())
    return TrainTransform(A.Compose(steps, seed=seed), ignore_index)


def _geometric(augment: AugmentConfig, ignore_index: int) -> list:
    steps: list = []
    if augment.hflip > 0:
        steps.append(A.HorizontalFlip(p=augment.hflip))
    if augment.vflip > 0:
        steps.append(A.VerticalFlip(p=augment.vflip))
    if augment.rotate > 0:
        steps.append(
            A.Rotate(
                limit=(-augment.rotate, augment.rotate),
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=cv2.INTER_NEAREST,
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                fill_mask=ignore_index,
                p=1.0,
            )
        )
    return steps


def _photometric(augment: AugmentConfig) -> list:
    steps: list = []
    cj = augment.color_jitter
    if cj > 0:
        steps.append(
            A.ColorJitter(
                brightness=(max(0.0, 1 - cj), 1 + cj),
                contrast=(max(0.0, 1 - cj), 1 + cj),
                saturation=(max(0.0, 1 - cj), 1 + cj),
                hue=(-min(cj / 4, 0.5), min(cj / 4, 0.5)),
                p=0.8,
            )
        )
    if augment.noise > 0:
        steps.append(_noise(augment.noise))
    return steps


def _noise(max_std: float) -> A.GaussNoise:
    """Gaussian noise with std uniformly in ``[0, max_std]`` (fraction of 255)."""
    if not 0 < max_std <= 1:
        raise ValueError(f"data.augment.noise: max noise std in (0, 1], got {max_std}")
    return A.GaussNoise(std_range=(0.0, max_std), mean_range=(0.0, 0.0), p=0.5)


class ValTransform:
    """Exactly the serving preprocessing for the image; nearest-neighbour resize for the mask."""

    def __init__(self, spec: PreprocessSpec) -> None:
        self.spec = spec

    def __call__(self, rgb: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        _check_pair(rgb, mask)
        image, _ = prepare_image(rgb_array_to_tensor(rgb), self.spec)
        target = torch.from_numpy(np.ascontiguousarray(mask)).to(torch.int64)
        if self.spec.resize_policy == "resize" and tuple(target.shape) != self.spec.input_size:
            target = resize_mask(target, self.spec.input_size)
        return image, target


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of an ``(H, W)`` label mask; values are never blended.

    "nearest-exact" samples pixel centres, the same geometry as the bilinear
    ``align_corners=False`` resize applied to the image.

    Example:
        >>> resize_mask(torch.tensor([[0, 1], [2, 3]]), (4, 4))[0].tolist()
        [0, 0, 1, 1]
    """
    # float64 holds every int32 label exactly; interpolate has no integer kernel.
    x = mask.to(torch.float64)[None, None]
    return F.interpolate(x, size=size, mode="nearest-exact")[0, 0].to(torch.int64)


def build_val_transform(spec: PreprocessSpec) -> ValTransform:
    """Validation/evaluation transform: the serving preprocessing. Nothing is padded here;
    :func:`training.datasets.segmentation_collate` pads batches (``pad`` policy).

    Example:
        >>> build_val_transform(PreprocessSpec((32, 32))).spec.input_size
        (32, 32)
    """
    return ValTransform(spec)

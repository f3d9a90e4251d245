"""Class weights computed from the training split's pixel counts (``loss.class_weights``).

Counted once when a run starts, over every training mask as stored (before augmentation), with
``ignore_index`` pixels left out. Two methods:

* ``inverse``: ``w_c = N / (K * n_c)``, with ``n_c`` the pixels of class c, ``N`` all labelled
  pixels and ``K`` the classes present; the average weight per labelled pixel is then 1, so the
  loss keeps its scale.
* ``median_frequency`` (Eigen & Fergus 2015): ``w_c = median(f) / f_c`` with
  ``f_c = n_c / (labelled pixels of the images that contain c)``, the median over the classes
  present; a class of median frequency weighs 1.

Both are then capped at ``loss.class_weight_cap`` (default 10; null: no cap), since a class
seen in a handful of pixels would otherwise weigh thousands and its few pixels would dominate
every gradient. A class absent from the training split gets weight **0**: it has no training
pixel for a weight to act on, and 0 says so plainly in ``class_weights.json`` (it is listed
under ``absent`` there, and the run prints a warning).

Example:
    >>> counts = PixelCounts(np.array([600, 300, 100, 0]), np.array([1000, 1000, 1000, 0]),
    ...                      np.array([10, 10, 10, 0]), num_images=10)
    >>> weights_from_counts(counts, "inverse", cap=None).round(3).tolist()
    [0.556, 1.111, 3.333, 0.0]
    >>> weights_from_counts(counts, "median_frequency", cap=2.0).round(3).tolist()
    [0.5, 1.0, 2.0, 0.0]
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.config import CLASS_WEIGHT_METHODS, ConfigError, LossConfig


@dataclass(frozen=True)
class PixelCounts:
    """Per-class statistics of a split's masks (ignored pixels left out)."""

    pixels: np.ndarray  # (C,) labelled pixels of each class
    image_pixels: np.ndarray  # (C,) labelled pixels of the images that contain the class
    images: np.ndarray  # (C,) images that contain the class
    num_images: int


def count_pixels(
    dataset: Any,
    num_classes: int,
    ignore_index: int,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
) -> PixelCounts:
    """Count every mask of ``dataset`` (``load_mask``, else ``load_raw``; a ``Subset`` is
    followed to its dataset). Under DDP each rank counts its share and the sums are reduced.

    Example:
        >>> from handler.preprocessing import PreprocessSpec
        >>> from training.config import DataConfig, SyntheticConfig
        >>> from training.datasets import build_dataset
        >>> cfg = DataConfig(synthetic=SyntheticConfig(num_train=3, num_val=1, image_size=(32, 32)))
        >>> ds = build_dataset(cfg, "train", PreprocessSpec((32, 32)), train=True)
        >>> counts = count_pixels(ds, 6, 255)
        >>> int(counts.pixels.sum()), counts.num_images
        (3072, 3)
    """
    totals = np.zeros((3, num_classes), dtype=np.int64)
    for hist, labelled in _histograms(dataset, num_classes, ignore_index, rank, world_size):
        present = hist > 0
        totals[0] += hist
        totals[1] += present * labelled
        totals[2] += present
    if world_size > 1:
        import torch.distributed as dist

        reduced = torch.from_numpy(totals).to(device)
        dist.all_reduce(reduced)
        totals = reduced.cpu().numpy()
    return PixelCounts(totals[0], totals[1], totals[2], num_images=len(dataset))


def class_presence(dataset: Any, num_classes: int, ignore_index: int) -> np.ndarray:
    """``(images, classes)``: which classes each mask of ``dataset`` holds (every image, in
    order, on every rank: ``data.rare_repeat`` needs the same list everywhere)."""
    rows = [hist > 0 for hist, _ in _histograms(dataset, num_classes, ignore_index, 0, 1)]
    return np.stack(rows) if rows else np.zeros((0, num_classes), dtype=bool)


def _histograms(
    dataset: Any, num_classes: int, ignore_index: int, rank: int, world_size: int
) -> Iterator[tuple[np.ndarray, int]]:
    """(class histogram, labelled pixels) of each mask of this rank's share of ``dataset``."""
    from training.datasets import unwrap_subsets  # the readers' module, loaded by training

    base, indices = unwrap_subsets(dataset)
    load = getattr(base, "load_mask", None) or (lambda i: base.load_raw(i)[1])
    for i in indices[rank::world_size]:
        mask = np.asarray(load(i))
        labelled = mask[mask != ignore_index].astype(np.int64)
        outside = (labelled < 0) | (labelled >= num_classes)
        if outside.any():
            bad = np.unique(labelled[outside])[:10].tolist()
            raise ValueError(f"sample {i}: mask values {bad} outside 0..{num_classes - 1}")
        yield np.bincount(labelled, minlength=num_classes), int(labelled.size)


def weights_from_counts(counts: PixelCounts, method: str, cap: float | None) -> np.ndarray:
    """``method``'s weights (see the module docstring), capped; 0 for absent classes."""
    if method not in CLASS_WEIGHT_METHODS:
        raise ConfigError(
            f"loss.class_weights: {method!r} is not one of {list(CLASS_WEIGHT_METHODS)}"
        )
    pixels = counts.pixels.astype(np.float64)
    present = pixels > 0
    weights = np.zeros_like(pixels)
    if not present.any():
        raise ValueError("the training split has no labelled pixel: no class weights to compute")
    if method == "inverse":
        weights[present] = pixels.sum() / (present.sum() * pixels[present])
    else:
        freq = pixels[present] / counts.image_pixels[present]
        weights[present] = np.median(freq) / freq
    if cap is not None:
        weights = np.minimum(weights, cap)
    return weights


def weights_report(
    counts: PixelCounts,
    weights: Sequence[float],
    class_names: Sequence[str],
    method: str,
    cap: float | None,
) -> dict[str, Any]:
    """What ``class_weights.json`` holds: the method, each class's weight and counts."""
    total = max(int(counts.pixels.sum()), 1)
    classes = {
        name: {
            "weight": float(w),
            "pixels": int(n),
            "pixel_fraction": int(n) / total,
            "images": int(k),
        }
        for name, w, n, k in zip(class_names, weights, counts.pixels, counts.images, strict=True)
    }
    return {
        "method": method,
        "cap": cap,
        "num_images": counts.num_images,
        "labelled_pixels": int(counts.pixels.sum()),
        "classes": classes,
        "absent": [n for n, c in classes.items() if c["pixels"] == 0],
        "capped": [n for n, c in classes.items() if cap is not None and c["weight"] >= cap],
    }


def resolve_class_weights(
    cfg: LossConfig,
    train_dataset: Any,
    class_names: Sequence[str],
    ignore_index: int,
    run_dir: Path | None = None,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
) -> list[float] | None:
    """The loss's class weights: the recipe's list (or None) as given, or a method's weights
    counted on ``train_dataset``, written to ``run_dir/class_weights.json`` by rank 0."""
    if not isinstance(cfg.class_weights, str):
        return None if cfg.class_weights is None else list(cfg.class_weights)
    method, cap = cfg.class_weights, cfg.class_weight_cap
    counts = count_pixels(train_dataset, len(class_names), ignore_index, rank, world_size, device)
    weights = weights_from_counts(counts, method, cap)
    report = weights_report(counts, weights.tolist(), class_names, method, cap)
    if run_dir is not None and rank == 0:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        (Path(run_dir) / "class_weights.json").write_text(json.dumps(report, indent=2) + "\n")
        shown = ", ".join(f"{n} {w:.3g}" for n, w in zip(class_names, weights, strict=True))
        print(f"class weights ({method}, cap {cap}): {shown}")
        if report["absent"]:
            print(f"warning: no training pixel of {report['absent']}; their weight is 0")
    return weights.tolist()

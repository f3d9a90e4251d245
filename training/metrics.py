"""Dataset-level segmentation metrics, accumulated batch by batch and reduced across ranks.

Every score here is computed once from counts summed over the whole dataset (a confusion
matrix, boundary-pixel counts), never as an average of per-image scores: a per-image mean
over-weights small images and makes a class that is absent from one image score 1.0 or 0.0
there depending on a convention.

Absent-class rule: a class that appears neither in the ground truth nor in the prediction has
no IoU / Dice (``nan``) and is left out of the means. It is *not* scored 1.0, which is what
``smp.metrics.iou_score``'s default ``zero_division=1.0`` would do and which inflates mIoU on
datasets where most images hold few classes. Per-class accuracy is ``nan`` for a class absent
from the ground truth. Use :func:`jsonable` before writing a metrics dict to JSON (``nan`` →
``null``).

Example:
    >>> cm = ConfusionMatrix(num_classes=3)
    >>> cm.update(torch.tensor([[0, 1], [1, 1]]), torch.tensor([[0, 1], [255, 0]]))
    >>> m = cm.compute()
    >>> round(m["miou"], 3), m["per_class_iou"][2]
    (0.5, nan)
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

__all__ = ["BoundaryF1", "ConfusionMatrix", "jsonable"]


def _check_pair(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int) -> None:
    """Raise a ValueError naming what is wrong with a (prediction, target) pair."""
    if pred.shape != target.shape:
        raise ValueError(
            f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}; "
            "pass class indices (argmax of the logits), not logits"
        )
    if pred.dim() not in (2, 3):
        raise ValueError(f"expected (H, W) or (N, H, W) class maps, got shape {tuple(pred.shape)}")
    if pred.is_floating_point() or target.is_floating_point():
        raise ValueError("prediction and target must be integer class maps, got floating point")
    if pred.numel() == 0:
        return
    if int(pred.min()) < 0 or int(pred.max()) >= num_classes:
        raise ValueError(
            f"prediction values must be in [0, {num_classes}), "
            f"got range [{int(pred.min())}, {int(pred.max())}]"
        )
    valid = target[target != ignore_index]
    if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= num_classes):
        raise ValueError(
            f"target values must be in [0, {num_classes}) or ignore_index={ignore_index}, "
            f"got range [{int(valid.min())}, {int(valid.max())}]; check the dataset's label mapping"
        )


def _nanmean(values: Tensor) -> float:
    kept = values[~torch.isnan(values)]
    return float(kept.mean()) if kept.numel() else math.nan


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` in float64, ``nan`` where ``den == 0`` (undefined, not perfect)."""
    num, den = num.double(), den.double()
    return torch.where(den > 0, num / den.clamp(min=1), torch.full_like(num, math.nan))


class _Reducible:
    """Sum a counts tensor across ``torch.distributed`` ranks, exactly once."""

    _counts_attr: str
    _reduced: bool = False

    def all_reduce(self) -> None:
        """Sum the counts over all ranks (no-op without an initialised process group).

        Call once, after the last ``update`` and before ``compute``; a second call would
        multiply the totals by the world size, so it raises instead.
        """
        if self._reduced:
            raise RuntimeError(f"{type(self).__name__}.all_reduce() called twice; call reset()")
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(getattr(self, self._counts_attr), op=dist.ReduceOp.SUM)
        self._reduced = True

    def _before_update(self) -> None:
        if self._reduced:
            raise RuntimeError(
                f"{type(self).__name__}.update() after all_reduce(); call reset() first"
            )


class ConfusionMatrix(_Reducible):
    """Pixel confusion matrix over a dataset; rows = target class, columns = predicted class.

    Example:
        >>> cm = ConfusionMatrix(num_classes=2)
        >>> cm.update(torch.tensor([0, 1, 1]).view(1, 3), torch.tensor([0, 1, 0]).view(1, 3))
        >>> cm.matrix.tolist()
        [[1, 1], [0, 1]]
    """

    _counts_attr = "matrix"

    def __init__(
        self, num_classes: int, ignore_index: int = 255, device: torch.device | str | None = None
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros((num_classes, num_classes), dtype=torch.int64, device=device)

    def reset(self) -> None:
        self.matrix.zero_()
        self._reduced = False

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add a batch: ``(N, H, W)`` or ``(H, W)`` integer maps; ignore_index pixels skipped."""
        self._before_update()
        _check_pair(pred, target, self.num_classes, self.ignore_index)
        keep = target != self.ignore_index
        t = target[keep].to(device=self.matrix.device, dtype=torch.int64)
        p = pred[keep].to(device=self.matrix.device, dtype=torch.int64)
        c = self.num_classes
        self.matrix += torch.bincount(t * c + p, minlength=c * c).view(c, c)

    def compute(self) -> dict[str, Any]:
        """Scores from the accumulated matrix; ``nan`` marks an undefined (absent) class.

        Keys: miou, pixel_accuracy, mean_accuracy, mean_dice (floats) and per_class_iou,
        per_class_accuracy, per_class_dice (lists of ``num_classes`` floats).
        """
        m = self.matrix.detach().cpu()
        tp = m.diagonal()
        target_count = m.sum(dim=1)  # tp + fn
        pred_count = m.sum(dim=0)  # tp + fp
        iou = _ratio(tp, target_count + pred_count - tp)
        dice = _ratio(2 * tp, target_count + pred_count)
        acc = _ratio(tp, target_count)
        total = m.sum()
        return {
            "miou": _nanmean(iou),
            "pixel_accuracy": float(tp.sum()) / float(total) if total > 0 else math.nan,
            "mean_accuracy": _nanmean(acc),
            "mean_dice": _nanmean(dice),
            "per_class_iou": iou.tolist(),
            "per_class_accuracy": acc.tolist(),
            "per_class_dice": dice.tolist(),
        }

    def pixels_per_class(self) -> list[int]:
        """Ground-truth pixel count per class (rows of the matrix)."""
        return self.matrix.sum(dim=1).tolist()


def _edges(labels: Tensor) -> Tensor:
    """Pixels with a 4-neighbour of a different label; the image border makes no edge."""
    x = labels[:, None].float()
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")[:, 0]
    centre = padded[:, 1:-1, 1:-1]
    return (
        (padded[:, :-2, 1:-1] != centre)
        | (padded[:, 2:, 1:-1] != centre)
        | (padded[:, 1:-1, :-2] != centre)
        | (padded[:, 1:-1, 2:] != centre)
    )


def _dilate(mask: Tensor, radius: int) -> Tensor:
    """Grow a boolean ``(N, H, W)`` map by ``radius`` pixels (square, Chebyshev distance)."""
    if radius == 0:
        return mask
    x = F.max_pool2d(mask[:, None].float(), kernel_size=2 * radius + 1, stride=1, padding=radius)
    return x[:, 0] > 0


class BoundaryF1(_Reducible):
    """Boundary F1 (BF score) per class with a pixel tolerance, accumulated over the dataset.

    Definitions:

    * A boundary pixel of class ``c`` has label ``c`` and a 4-neighbour with another label
      (the image border is not a boundary). In the target, ``ignore_index`` counts as another
      label, so a void band (VOC) still outlines its objects.
    * A predicted boundary pixel is matched when a target boundary pixel of the same class lies
      within ``tolerance`` pixels (Chebyshev distance, a ``(2t+1)²`` square), and vice versa.
      Predicted boundary pixels on ignored target pixels are not counted in the precision.
    * Per class, precision and recall come from counts summed over the dataset;
      ``F1 = 2PR / (P + R)``; a class with no boundary in target nor prediction is ``nan``
      and left out of the mean; a class with boundaries on one side only scores 0.

    Example:
        >>> bf = BoundaryF1(num_classes=2, tolerance=1)
        >>> t = torch.zeros(1, 6, 6, dtype=torch.long); t[:, :, 3:] = 1
        >>> p = torch.zeros(1, 6, 6, dtype=torch.long); p[:, :, 4:] = 1
        >>> bf.update(p, t)
        >>> bf.compute()
        1.0
    """

    _counts_attr = "counts"

    def __init__(self, num_classes: int, ignore_index: int = 255, tolerance: int = 2) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if tolerance < 0:
            raise ValueError(f"tolerance must be >= 0 pixels, got {tolerance}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.tolerance = tolerance
        # Rows: matched predicted, predicted, matched target, target boundary pixels.
        self.counts = torch.zeros((4, num_classes), dtype=torch.int64)

    def reset(self) -> None:
        self.counts.zero_()
        self._reduced = False

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add a batch of ``(N, H, W)`` or ``(H, W)`` integer maps."""
        self._before_update()
        _check_pair(pred, target, self.num_classes, self.ignore_index)
        if pred.dim() == 2:
            pred, target = pred[None], target[None]
        pred, target = pred.long(), target.long()
        valid = target != self.ignore_index
        pred_edges, target_edges = _edges(pred), _edges(target)
        classes = torch.unique(torch.cat([pred.flatten(), target[valid].flatten()]))
        counts = torch.zeros_like(self.counts, device=pred.device)
        for c in classes.tolist():
            pb = pred_edges & (pred == c)
            tb = target_edges & (target == c)
            pb_counted = pb & valid
            counts[0, c] = (pb_counted & _dilate(tb, self.tolerance)).sum()
            counts[1, c] = pb_counted.sum()
            counts[2, c] = (tb & _dilate(pb, self.tolerance)).sum()
            counts[3, c] = tb.sum()
        self.counts += counts.to(self.counts.device)

    def to(self, device: torch.device | str) -> BoundaryF1:
        """Move the counts (e.g. to the GPU that NCCL reduces on)."""
        self.counts = self.counts.to(device)
        return self

    def per_class(self) -> list[float]:
        """F1 per class; ``nan`` for a class with no boundary pixels on either side."""
        matched_pred, n_pred, matched_target, n_target = self.counts.detach().cpu().double()
        # No predicted boundary = no false positive (precision 1); no target boundary = nothing
        # missed (recall 1). A class with boundaries on one side only still scores F1 = 0.
        precision = torch.where(n_pred > 0, matched_pred / n_pred.clamp(min=1), 1.0)
        recall = torch.where(n_target > 0, matched_target / n_target.clamp(min=1), 1.0)
        denom = precision + recall
        f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-12), 0.0)
        absent = (n_pred == 0) & (n_target == 0)
        return torch.where(absent, math.nan, f1).tolist()

    def compute(self) -> float:
        """Mean boundary F1 over classes that have a boundary in target or prediction."""
        return _nanmean(torch.tensor(self.per_class(), dtype=torch.float64))


def jsonable(value: Any) -> Any:
    """Replace ``nan``/``inf`` floats by ``None`` (JSON has no NaN), recursively.

    Example:
        >>> jsonable({"miou": float("nan"), "per_class_iou": [0.5, float("nan")]})
        {'miou': None, 'per_class_iou': [0.5, None]}
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value

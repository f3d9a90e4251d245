"""The training loss: ``L = ce * CrossEntropy + dice * Dice + focal * Focal``.

Every term ignores pixels labelled ``ignore_index`` (void borders, padding): smp's Dice and
Focal losses only do so when ``ignore_index`` is passed, otherwise Dice crashes on the
one-hot of 255 and Focal silently counts those pixels as background.

Example:
    >>> from training.config import LossConfig
    >>> loss_fn = build_loss(LossConfig(ce=1.0, dice=0.5), num_classes=3, ignore_index=255)
    >>> logits = torch.zeros(1, 3, 4, 4, requires_grad=True)
    >>> target = torch.full((1, 4, 4), 255)
    >>> target[0, 0, 0] = 1
    >>> loss = loss_fn(logits, target)  # only pixel (0, 0) counts
    >>> loss.item() > 0, loss.requires_grad
    (True, True)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.losses import DiceLoss, FocalLoss
from torch import nn

from training.config import ConfigError, LossConfig


class SegmentationLoss(nn.Module):
    """Weighted sum of cross-entropy, Dice and focal loss over the non-ignored pixels."""

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        ce: float = 1.0,
        dice: float = 0.0,
        focal: float = 0.0,
        class_weights: list[float] | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.weights = {"ce": ce, "dice": dice, "focal": focal}
        self.label_smoothing = label_smoothing
        weight = None if class_weights is None else torch.tensor(class_weights, dtype=torch.float32)
        # A buffer follows .to(device) and is not a trainable parameter.
        self.register_buffer("class_weight", weight, persistent=False)
        self.dice = DiceLoss("multiclass", ignore_index=ignore_index, class_weights=class_weights)
        self.focal = FocalLoss("multiclass", ignore_index=ignore_index, class_weights=class_weights)

    def terms(self, logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each weighted term separately (only those with a weight > 0), for logging."""
        # Losses in float32: Dice's sums and focal's powers lose too much in bf16/fp16.
        logits = logits.float()
        target = target.long()
        if not bool((target != self.ignore_index).any()):
            # Every reduction below would be 0/0 = NaN; an all-void crop teaches nothing.
            return {name: logits.sum() * 0.0 for name, w in self.weights.items() if w > 0}
        out: dict[str, torch.Tensor] = {}
        if self.weights["ce"] > 0:
            ce = F.cross_entropy(
                logits,
                target,
                weight=self.class_weight,
                ignore_index=self.ignore_index,
                label_smoothing=self.label_smoothing,
            )
            out["ce"] = self.weights["ce"] * ce
        if self.weights["dice"] > 0:
            out["dice"] = self.weights["dice"] * self.dice(logits, target)
        if self.weights["focal"] > 0:
            out["focal"] = self.weights["focal"] * self.focal(logits, target)
        return out

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``logits`` ``(N, C, H, W)``, ``target`` ``(N, H, W)`` int64 → scalar loss."""
        if logits.shape[0] != target.shape[0] or logits.shape[2:] != target.shape[1:]:
            raise ValueError(
                f"logits {tuple(logits.shape)} and target {tuple(target.shape)} disagree on "
                "batch or spatial size"
            )
        return torch.stack(list(self.terms(logits, target).values())).sum()


def build_loss(cfg: LossConfig, num_classes: int, ignore_index: int) -> SegmentationLoss:
    """The recipe's loss section → :class:`SegmentationLoss`, checking class weights' length."""
    if cfg.class_weights is not None:
        if len(cfg.class_weights) != num_classes:
            raise ConfigError(
                f"loss.class_weights: {len(cfg.class_weights)} values for {num_classes} classes; "
                "give one weight per class"
            )
        if min(cfg.class_weights) < 0:
            raise ConfigError("loss.class_weights: weights must be >= 0")
    if not 0.0 <= cfg.label_smoothing < 1.0:
        raise ConfigError(f"loss.label_smoothing: must be in [0, 1), got {cfg.label_smoothing}")
    return SegmentationLoss(
        num_classes,
        ignore_index=ignore_index,
        ce=cfg.ce,
        dice=cfg.dice,
        focal=cfg.focal,
        class_weights=cfg.class_weights,
        label_smoothing=cfg.label_smoothing,
    )

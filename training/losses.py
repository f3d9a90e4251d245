"""The training loss: ``L = ce * CrossEntropy + dice * Dice + focal * Focal``.

Every term ignores pixels labelled ``ignore_index`` (void borders, padding): smp's Dice and
Focal losses only do so when ``ignore_index`` is passed, otherwise Dice crashes on the
one-hot of 255 and Focal silently counts those pixels as background.

Imbalanced data: ``loss.class_weights`` weighs every term per class (a list, or a method
computed from the training split by :mod:`training.class_weights`), and ``loss.ohem`` makes
the CE term count only each batch's hard pixels (:func:`hard_pixel_mask`).

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

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.losses import DiceLoss, FocalLoss
from torch import nn

from training.config import ConfigError, LossConfig, OhemConfig

# loss.ohem without threshold or keep_fraction: a pixel is hard below this true-class probability
# (PSPNet/mmsegmentation's usual 0.7).
DEFAULT_OHEM_THRESHOLD = 0.7


def hard_pixel_mask(
    true_prob: torch.Tensor,
    valid: torch.Tensor,
    threshold: float | None = DEFAULT_OHEM_THRESHOLD,
    keep_fraction: float | None = None,
    min_kept: int = 0,
) -> torch.Tensor:
    """OHEM's choice: which valid pixels count, from each pixel's true-class probability.

    ``threshold``: the pixels whose probability is below it; ``keep_fraction``: that share of
    the valid pixels, the least probable first. If fewer than ``min_kept`` are chosen, the
    ``min_kept`` least probable valid pixels are (all valid pixels when there are fewer).
    Ignored pixels (``valid`` False) are never chosen.

    Example:
        >>> p = torch.tensor([0.9, 0.2, 0.6, 0.05, 0.8])
        >>> valid = torch.tensor([True, True, True, False, True])
        >>> hard_pixel_mask(p, valid, threshold=0.7).tolist()
        [False, True, True, False, False]
        >>> hard_pixel_mask(p, valid, threshold=0.7, min_kept=3).tolist()
        [False, True, True, False, True]
        >>> hard_pixel_mask(p, valid, threshold=None, keep_fraction=0.25).tolist()
        [False, True, False, False, False]
    """
    n_valid = int(valid.sum())
    if keep_fraction is not None:
        chosen = None
        k = math.ceil(keep_fraction * n_valid)
    else:
        chosen = valid & (true_prob < (DEFAULT_OHEM_THRESHOLD if threshold is None else threshold))
        k = int(chosen.sum())
    k = min(max(k, min_kept), n_valid)
    if chosen is not None and int(chosen.sum()) == k:
        return chosen
    if k == n_valid:
        return valid.clone()
    # The k least probable valid pixels (exactly k, whatever the ties).
    flat = torch.where(valid, true_prob, torch.full_like(true_prob, float("inf"))).flatten()
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[torch.topk(flat, k, largest=False).indices] = True
    return keep.view_as(valid)


class SegmentationLoss(nn.Module):
    """Weighted sum of cross-entropy, Dice and focal loss over the non-ignored pixels."""

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        ce: float = 1.0,
        dice: float = 0.0,
        focal: float = 0.0,
        class_weights: Sequence[float] | None = None,
        label_smoothing: float = 0.0,
        ohem: OhemConfig | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.weights = {"ce": ce, "dice": dice, "focal": focal}
        self.label_smoothing = label_smoothing
        self.ohem = ohem
        class_weights = None if class_weights is None else [float(w) for w in class_weights]
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
            out["ce"] = self.weights["ce"] * self.cross_entropy(logits, target)
        if self.weights["dice"] > 0:
            out["dice"] = self.weights["dice"] * self.dice(logits, target)
        if self.weights["focal"] > 0:
            out["focal"] = self.weights["focal"] * self.focal(logits, target)
        return out

    def cross_entropy(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """CE over the valid pixels, or, with OHEM, over the hard ones only.

        Both are torch's weighted mean, ``sum(w[y] * loss) / sum(w[y])`` over the pixels
        counted, so OHEM keeping every valid pixel gives exactly the plain CE.
        """
        per_pixel = F.cross_entropy(
            logits,
            target,
            weight=self.class_weight,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            reduction="mean" if self.ohem is None else "none",
        )
        if self.ohem is None:
            return per_pixel
        valid = target != self.ignore_index
        safe = target.masked_fill(~valid, 0)
        with torch.no_grad():  # the choice is not differentiated, only the kept pixels' loss
            true_prob = logits.softmax(dim=1).gather(1, safe[:, None]).squeeze(1)
            keep = hard_pixel_mask(
                true_prob,
                valid,
                self.ohem.threshold,
                self.ohem.keep_fraction,
                self.ohem.min_kept,
            )
        pixel_weight = keep.to(per_pixel.dtype)
        if self.class_weight is not None:
            pixel_weight = pixel_weight * self.class_weight[safe]
        # per_pixel already carries w[y]; divide by the kept weights, as torch's mean does.
        return (per_pixel * keep).sum() / pixel_weight.sum().clamp_min(1e-12)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``logits`` ``(N, C, H, W)``, ``target`` ``(N, H, W)`` int64 → scalar loss."""
        if logits.shape[0] != target.shape[0] or logits.shape[2:] != target.shape[1:]:
            raise ValueError(
                f"logits {tuple(logits.shape)} and target {tuple(target.shape)} disagree on "
                "batch or spatial size"
            )
        return torch.stack(list(self.terms(logits, target).values())).sum()


def build_loss(
    cfg: LossConfig,
    num_classes: int,
    ignore_index: int,
    class_weights: Sequence[float] | None = None,
) -> SegmentationLoss:
    """The recipe's loss section → :class:`SegmentationLoss`, checking class weights' length.

    ``class_weights``: the weights a method in ``loss.class_weights`` (e.g. median_frequency)
    computed from the training split (:func:`training.class_weights.resolve_class_weights`);
    a list in the recipe is used as given.
    """
    if class_weights is None and isinstance(cfg.class_weights, str):
        raise ConfigError(
            f"loss.class_weights: {cfg.class_weights!r} is computed from the training split "
            "when a run starts (training.class_weights.resolve_class_weights); pass its result "
            "as class_weights"
        )
    if class_weights is None and cfg.class_weights is not None:
        class_weights = list(cfg.class_weights)  # type: ignore[arg-type]
    if class_weights is not None:
        if len(class_weights) != num_classes:
            raise ConfigError(
                f"loss.class_weights: {len(class_weights)} values for {num_classes} classes; "
                "give one weight per class"
            )
        if min(class_weights) < 0:
            raise ConfigError("loss.class_weights: weights must be >= 0")
    if not 0.0 <= cfg.label_smoothing < 1.0:
        raise ConfigError(f"loss.label_smoothing: must be in [0, 1), got {cfg.label_smoothing}")
    return SegmentationLoss(
        num_classes,
        ignore_index=ignore_index,
        ce=cfg.ce,
        dice=cfg.dice,
        focal=cfg.focal,
        class_weights=class_weights,
        label_smoothing=cfg.label_smoothing,
        ohem=cfg.ohem,
    )


def distillation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor,
    temperature: float = 1.0,
    ignore_index: int = 255,
) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over the pixels
    whose label is not ``ignore_index`` (Hinton et al. 2015, per pixel).

    The ``T^2`` keeps the gradient's scale independent of the temperature (the soft targets'
    gradients shrink as ``1 / T^2``), so one ``weight`` suits every T. Ignored pixels (void,
    padding) count for nothing: the teacher's guess there is as unlabelled as the pixel.
    ``student``/``teacher``: logits ``(N, C, H, W)``; ``target``: labels ``(N, H, W)``; the
    teacher receives no gradient.

    Example:
        >>> s = torch.zeros(1, 2, 1, 2)
        >>> t = torch.tensor([[[[2.0, 0.0]], [[0.0, 0.0]]]])  # pixel 0 confident, pixel 1 not
        >>> labels = torch.tensor([[[0, 1]]])
        >>> round(distillation_loss(s, t, labels).item(), 4)  # pixel 0's KL 0.3278, / 2 pixels
        0.1639
        >>> labels[0, 0, 0] = 255  # ignore pixel 0: only pixel 1 (KL 0) is left
        >>> distillation_loss(s, t, labels).item()
        0.0
        >>> distillation_loss(t, t, labels, temperature=4.0).item()  # same logits: nothing to learn
        0.0
    """
    if student.shape != teacher.shape:
        raise ValueError(
            f"student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} "
            "differ; both must be (N, C, H, W) for the same batch"
        )
    log_student = F.log_softmax(student.float() / temperature, dim=1)
    log_teacher = F.log_softmax(teacher.detach().float() / temperature, dim=1)
    # KL(p_t || p_s) = sum_c p_t (log p_t - log p_s), per pixel
    per_pixel = (log_teacher.exp() * (log_teacher - log_student)).sum(dim=1)
    valid = (target != ignore_index).to(per_pixel.dtype)
    return temperature**2 * (per_pixel * valid).sum() / valid.sum().clamp_min(1.0)


class TrainingLoss(nn.Module):
    """What a training step minimises, around the recipe's label loss (:func:`build_loss`):

    ``label(logits) + aux_weight * sum(label(aux_i)) + distill_weight * distillation``.

    ``outputs`` is the model's training-mode return: the logits, or ``(logits, [aux logits])``
    for a model with auxiliary heads (BiSeNetV2's booster). ``teacher_logits`` (optional) are a
    distillation teacher's for the same batch. Without either, it is exactly the label loss.

    Example:
        >>> from training.config import LossConfig
        >>> label = build_loss(LossConfig(), num_classes=3, ignore_index=255)
        >>> loss = TrainingLoss(label, aux_weight=0.5, distill_weight=1.0, temperature=2.0)
        >>> logits, target = torch.zeros(2, 3, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long)
        >>> bool(loss(logits, target) == label(logits, target))
        True
        >>> aux_loss = loss((logits, [logits]), target)  # + 0.5 * the same CE
        >>> round(aux_loss.item() / label(logits, target).item(), 4)
        1.5
    """

    def __init__(
        self,
        label_loss: SegmentationLoss,
        aux_weight: float = 0.0,
        distill_weight: float = 0.0,
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        self.label_loss = label_loss
        self.aux_weight = aux_weight
        self.distill_weight = distill_weight
        self.temperature = temperature

    def forward(
        self,
        outputs: torch.Tensor | tuple[torch.Tensor, Sequence[torch.Tensor]],
        target: torch.Tensor,
        teacher_logits: torch.Tensor | None = None,
    ) -> torch.Tensor:
        logits, aux = (outputs, ()) if isinstance(outputs, torch.Tensor) else outputs
        loss = self.label_loss(logits, target)
        for head in aux:
            loss = loss + self.aux_weight * self.label_loss(head, target)
        if teacher_logits is not None:
            loss = loss + self.distill_weight * distillation_loss(
                logits, teacher_logits, target, self.temperature, self.label_loss.ignore_index
            )
        return loss

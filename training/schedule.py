"""The optimiser and its per-step learning-rate curve: linear warmup, then poly/cosine decay.

The curve is a pure function of the step (:func:`lr_factor`), so it is tested on its values
and a resumed run continues it exactly from the scheduler's saved ``last_epoch``.

Example:
    >>> lr_factor(0, total_steps=100, warmup_steps=10)
    0.1
    >>> lr_factor(10, total_steps=100, warmup_steps=10)
    1.0
    >>> lr_factor(100, total_steps=100, warmup_steps=10, policy="cosine")
    0.0
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.optim.lr_scheduler import LambdaLR

from training.config import ConfigError, OptimConfig, ScheduleConfig


def lr_factor(
    step: int,
    total_steps: int,
    warmup_steps: int = 0,
    policy: str = "poly",
    power: float = 0.9,
    min_lr_ratio: float = 0.0,
) -> float:
    """Multiplier of the base learning rate for the optimiser step ``step`` (0-based).

    Warmup step ``s`` uses ``(s + 1) / warmup_steps``: the first step is not wasted at lr = 0
    and the full rate is reached at step ``warmup_steps - 1``.
    Decay then runs from 1 at ``warmup_steps`` down to ``min_lr_ratio`` at ``total_steps``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if policy == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if policy == "poly":
        decay = (1.0 - progress) ** power
    elif policy == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown lr policy {policy!r}")
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay


@dataclass
class LRCurve:
    """Picklable callable for LambdaLR: its fields land in the scheduler's state_dict."""

    total_steps: int
    warmup_steps: int
    policy: str
    power: float
    min_lr_ratio: float

    def __call__(self, step: int) -> float:
        return lr_factor(
            step, self.total_steps, self.warmup_steps, self.policy, self.power, self.min_lr_ratio
        )


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, steps_per_epoch: int, epochs: int
) -> LambdaLR:
    """A LambdaLR stepped once per optimiser step (not per epoch)."""
    if cfg.warmup_epochs < 0:
        raise ConfigError(f"schedule.warmup_epochs: must be >= 0, got {cfg.warmup_epochs}")
    if not 0.0 <= cfg.min_lr_ratio <= 1.0:
        raise ConfigError(f"schedule.min_lr_ratio: must be in [0, 1], got {cfg.min_lr_ratio}")
    total = max(1, steps_per_epoch * epochs)
    # Not capped at ``total``: the curve up to any step must not depend on train.epochs, or a
    # run extended with --resume would not match one planned long from the start.
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    curve = LRCurve(total, warmup, cfg.policy, cfg.power, cfg.min_lr_ratio)
    return LambdaLR(optimizer, curve)


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW or SGD; no weight decay on biases and norm weights (1-d tensors).

    Decaying BatchNorm/LayerNorm scales towards zero only fights the normalisation.
    """
    if cfg.lr <= 0:
        raise ConfigError(f"optim.lr: must be > 0, got {cfg.lr}")
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    raise ConfigError(f"optim.name: {cfg.name!r} is not one of ['adamw', 'sgd']")

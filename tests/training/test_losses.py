"""training/losses.py: every term ignores ignore_index pixels exactly; weights and checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from training.config import ConfigError, LossConfig
from training.losses import SegmentationLoss, build_loss

C, IGNORE = 4, 255
TERMS = {"ce": LossConfig(ce=1.0), "dice": LossConfig(ce=0.0, dice=1.0),
         "focal": LossConfig(ce=0.0, focal=1.0)}  # fmt: skip


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits, a target with ~30% ignored pixels, and the valid-pixel mask."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, C, 8, 8, generator=gen)
    target = torch.randint(0, C, (2, 8, 8), generator=gen)
    ignored = torch.rand(2, 8, 8, generator=gen) < 0.3
    target[ignored] = IGNORE
    return logits, target, ~ignored


def _valid_only(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor):
    """The valid pixels alone, as a (1, C, K, 1) batch: what the loss should equal."""
    kept_logits = logits.permute(1, 0, 2, 3)[:, valid]  # (C, K)
    return kept_logits[None, :, :, None], target[valid][None, :, None]


@pytest.mark.parametrize("term", TERMS)
def test_ignored_pixels_change_nothing(term: str, batch) -> None:
    logits, target, valid = batch
    loss_fn = build_loss(TERMS[term], C, IGNORE)
    with_ignored = loss_fn(logits, target)
    reference = loss_fn(*_valid_only(logits, target, valid))
    assert torch.isfinite(with_ignored)
    assert with_ignored.item() > 0
    torch.testing.assert_close(with_ignored, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("term", TERMS)
def test_ignored_pixels_whatever_the_logits_say(term: str, batch) -> None:
    logits, target, valid = batch
    loss_fn = build_loss(TERMS[term], C, IGNORE)
    scrambled = torch.where(valid[:, None], logits, torch.randn_like(logits) * 50)
    torch.testing.assert_close(loss_fn(scrambled, target), loss_fn(logits, target))


@pytest.mark.parametrize("term", TERMS)
def test_gradient_is_zero_at_ignored_pixels(term: str, batch) -> None:
    logits, target, valid = batch
    logits = logits.clone().requires_grad_(True)
    build_loss(TERMS[term], C, IGNORE)(logits, target).backward()
    grad = logits.grad
    assert torch.count_nonzero(grad.permute(1, 0, 2, 3)[:, ~valid]) == 0
    assert torch.count_nonzero(grad.permute(1, 0, 2, 3)[:, valid]) > 0


def test_ce_term_is_torch_cross_entropy(batch) -> None:
    logits, target, _ = batch
    expected = F.cross_entropy(logits, target, ignore_index=IGNORE)
    torch.testing.assert_close(build_loss(LossConfig(), C, IGNORE)(logits, target), expected)


def test_total_is_the_weighted_sum_of_the_terms(batch) -> None:
    logits, target, _ = batch
    parts = {name: build_loss(cfg, C, IGNORE)(logits, target) for name, cfg in TERMS.items()}
    combined = build_loss(LossConfig(ce=0.5, dice=2.0, focal=3.0), C, IGNORE)
    expected = 0.5 * parts["ce"] + 2.0 * parts["dice"] + 3.0 * parts["focal"]
    torch.testing.assert_close(combined(logits, target), expected)
    assert set(combined.terms(logits, target)) == {"ce", "dice", "focal"}


def test_class_weights_reach_the_cross_entropy(batch) -> None:
    logits, target, _ = batch
    weights = [1.0, 2.0, 0.5, 4.0]
    loss = build_loss(LossConfig(class_weights=weights), C, IGNORE)(logits, target)
    expected = F.cross_entropy(logits, target, weight=torch.tensor(weights), ignore_index=IGNORE)
    torch.testing.assert_close(loss, expected)
    assert not torch.allclose(loss, build_loss(LossConfig(), C, IGNORE)(logits, target))


def test_label_smoothing_reaches_the_cross_entropy(batch) -> None:
    logits, target, _ = batch
    loss = build_loss(LossConfig(label_smoothing=0.1), C, IGNORE)(logits, target)
    expected = F.cross_entropy(logits, target, ignore_index=IGNORE, label_smoothing=0.1)
    torch.testing.assert_close(loss, expected)


def test_an_all_ignored_batch_gives_zero_not_nan() -> None:
    logits = torch.randn(1, C, 4, 4, requires_grad=True)
    target = torch.full((1, 4, 4), IGNORE)
    loss = build_loss(LossConfig(ce=1.0, dice=1.0, focal=1.0), C, IGNORE)(logits, target)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(logits.grad) == 0


def test_bf16_logits_are_scored_in_float32(batch) -> None:
    logits, target, _ = batch
    loss_fn = build_loss(LossConfig(ce=1.0, dice=1.0), C, IGNORE)
    low = loss_fn(logits.to(torch.bfloat16), target)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, loss_fn(logits.to(torch.bfloat16).float(), target))


def test_shape_mismatch_is_explained() -> None:
    with pytest.raises(ValueError, match="disagree on batch or spatial size"):
        SegmentationLoss(C)(torch.zeros(1, C, 8, 8), torch.zeros(1, 4, 4, dtype=torch.long))


def test_config_checks() -> None:
    with pytest.raises(ConfigError, match="loss.class_weights: 2 values for 4 classes"):
        build_loss(LossConfig(class_weights=[1.0, 2.0]), C, IGNORE)
    with pytest.raises(ConfigError, match="loss.class_weights: weights must be >= 0"):
        build_loss(LossConfig(class_weights=[1.0, -1.0, 1.0, 1.0]), C, IGNORE)
    with pytest.raises(ConfigError, match="loss.label_smoothing"):
        build_loss(LossConfig(label_smoothing=1.0), C, IGNORE)

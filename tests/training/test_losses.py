"""training/losses.py: every term ignores ignore_index pixels exactly; weights, OHEM, checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from training.config import ConfigError, LossConfig, OhemConfig, recipe_from_dict
from training.losses import SegmentationLoss, build_loss, hard_pixel_mask

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


# --- OHEM ---------------------------------------------------------------------------------------


def _ohem(**kw) -> LossConfig:
    return LossConfig(ohem=OhemConfig(**kw))


@pytest.fixture
def easy_and_hard() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One image of 4x4 pixels: 4 hard (the true class unlikely), 10 easy, 2 ignored.

    The ignored pixels have the worst logits of all, so a selection that saw them would pick
    them first.
    """
    target = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3], [0, 1, IGNORE, IGNORE]])[None]
    logits = torch.zeros(1, C, 4, 4)
    for y in range(4):
        for x in range(4):
            cls = int(target[0, y, x]) if target[0, y, x] != IGNORE else 0
            logits[0, cls, y, x] = 6.0  # confident and right: p ≈ 0.99
    hard = torch.zeros(1, 4, 4, dtype=torch.bool)
    hard[0, 0, :] = True  # first row: confident in the wrong class
    for x in range(4):
        logits[0, :, 0, x] = 0.0
        logits[0, (x + 1) % C, 0, x] = 6.0 - x  # differing hardness, p(true) < 0.7 each
    logits[0, 3, 3, 2:] = -20.0
    logits[0, 1, 3, 2:] = 20.0
    valid = target != IGNORE
    return logits, target, hard, valid


def _ce_over(logits: torch.Tensor, target: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.permute(0, 2, 3, 1)[keep], target[keep])


def test_ohem_counts_only_the_hard_pixels(easy_and_hard) -> None:
    logits, target, hard, _ = easy_and_hard
    logits = logits.clone().requires_grad_(True)
    loss = build_loss(_ohem(threshold=0.7, min_kept=0), C, IGNORE)(logits, target)
    torch.testing.assert_close(loss, _ce_over(logits, target, hard))
    assert loss > build_loss(LossConfig(), C, IGNORE)(logits, target)  # easy pixels dilute CE
    loss.backward()
    per_pixel_grad = logits.grad.abs().sum(dim=1)
    assert bool((per_pixel_grad[hard] > 0).all())
    assert bool((per_pixel_grad[~hard] == 0).all())  # easy and ignored pixels: no gradient


def test_ohem_min_kept_adds_the_next_hardest_never_an_ignored_pixel(easy_and_hard) -> None:
    logits, target, hard, valid = easy_and_hard
    true_prob = logits.softmax(1).gather(1, target.clamp(max=C - 1)[:, None]).squeeze(1)
    order = torch.where(valid, true_prob, torch.inf).flatten().argsort()
    six = torch.zeros(16, dtype=torch.bool)
    six[order[:6]] = True
    six = six.view(1, 4, 4)
    assert bool((six & hard).sum() == 4)  # the 4 hard ones and the 2 hardest easy ones
    loss = build_loss(_ohem(threshold=0.7, min_kept=6), C, IGNORE)(logits, target)
    torch.testing.assert_close(loss, _ce_over(logits, target, six))
    # More than there are valid pixels: all 14 valid ones, still not the 2 ignored.
    every = build_loss(_ohem(threshold=0.7, min_kept=1000), C, IGNORE)(logits, target)
    torch.testing.assert_close(every, _ce_over(logits, target, valid))


def test_ohem_keep_fraction_keeps_the_top_share(easy_and_hard) -> None:
    logits, target, hard, _ = easy_and_hard
    loss = build_loss(_ohem(keep_fraction=4 / 14, min_kept=0), C, IGNORE)(logits, target)
    torch.testing.assert_close(loss, _ce_over(logits, target, hard))


def test_ohem_keeping_everything_is_exactly_the_plain_weighted_ce(batch) -> None:
    logits, target, _ = batch
    common = {"class_weights": [1.0, 2.0, 0.5, 4.0], "label_smoothing": 0.1}
    plain = build_loss(LossConfig(**common), C, IGNORE)(logits, target)
    mined = build_loss(LossConfig(**common, ohem=OhemConfig(keep_fraction=1.0)), C, IGNORE)
    torch.testing.assert_close(mined(logits, target), plain)


def test_ohem_on_an_all_ignored_batch_is_zero(easy_and_hard) -> None:
    logits, _, _, _ = easy_and_hard
    target = torch.full((1, 4, 4), IGNORE)
    assert build_loss(_ohem(), C, IGNORE)(logits, target).item() == 0.0


def test_ohem_without_settings_uses_threshold_0_7() -> None:
    p = torch.tensor([0.69, 0.71, 0.1])
    valid = torch.ones(3, dtype=torch.bool)
    assert hard_pixel_mask(p, valid, threshold=None).tolist() == [True, False, True]
    assert recipe_from_dict({"loss": {"ohem": {}}}).loss.ohem == OhemConfig()


@pytest.mark.parametrize(
    ("ohem", "match"),
    [
        ({"threshold": 0.5, "keep_fraction": 0.2}, "loss.ohem: give one of threshold"),
        ({"threshold": 0.0}, r"loss.ohem.threshold: must be in \(0, 1\]"),
        ({"keep_fraction": 1.5}, r"loss.ohem.keep_fraction: must be in \(0, 1\]"),
        ({"min_kept": -1}, "loss.ohem.min_kept: must be >= 0"),
        ({"top_k": 3}, "unknown key loss.ohem.top_k"),
    ],
)
def test_ohem_recipe_validation(ohem: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        recipe_from_dict({"loss": {"ohem": ohem}})


def test_ohem_needs_the_ce_term() -> None:
    with pytest.raises(ConfigError, match="loss.ohem: mines the CE term, but loss.ce is 0"):
        recipe_from_dict({"loss": {"ce": 0.0, "dice": 1.0, "ohem": {}}})

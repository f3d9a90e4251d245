"""training/schedule.py: the LR curve's values at known steps, the scheduler, the optimiser."""

from __future__ import annotations

import math

import pytest
import torch

from training.config import ConfigError, OptimConfig, ScheduleConfig
from training.schedule import build_optimizer, build_scheduler, lr_factor


def test_warmup_is_linear_per_step() -> None:
    values = [lr_factor(s, total_steps=100, warmup_steps=4) for s in range(5)]
    assert values == [0.25, 0.5, 0.75, 1.0, 1.0]


def test_poly_decay_values() -> None:
    # 10 warmup steps, then 90 decay steps: progress = (step - 10) / 90.
    assert lr_factor(10, 100, 10, "poly", power=0.9) == 1.0
    assert lr_factor(55, 100, 10, "poly", power=0.9) == pytest.approx(0.5**0.9)
    assert lr_factor(100, 100, 10, "poly", power=0.9) == 0.0
    assert lr_factor(40, 100, 10, "poly", power=1.0) == pytest.approx(1 - 30 / 90)


def test_cosine_decay_values() -> None:
    assert lr_factor(0, 100, 0, "cosine") == 1.0
    assert lr_factor(50, 100, 0, "cosine") == pytest.approx(0.5)
    assert lr_factor(25, 100, 0, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(100, 100, 0, "cosine") == pytest.approx(0.0)


def test_min_lr_ratio_is_the_floor() -> None:
    assert lr_factor(100, 100, 0, "cosine", min_lr_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(50, 100, 0, "cosine", min_lr_ratio=0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(500, 100, 0, "poly", min_lr_ratio=0.2) == pytest.approx(0.2)  # past the end


def test_constant_policy_after_warmup() -> None:
    assert [lr_factor(s, 10, 2, "constant") for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]


def test_unknown_policy() -> None:
    with pytest.raises(ValueError, match="unknown lr policy 'step'"):
        lr_factor(5, 10, 0, "step")


def _optimizer(lr: float = 0.1) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr)


def test_scheduler_follows_the_curve_per_optimizer_step() -> None:
    opt = _optimizer(lr=0.1)
    cfg = ScheduleConfig(policy="poly", warmup_epochs=0.5, power=1.0)
    sched = build_scheduler(opt, cfg, steps_per_epoch=4, epochs=3)  # 12 steps, 2 warmup
    seen = []
    for _ in range(12):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [0.05, 0.1] + [0.1 * (1 - k / 10) for k in range(10)]
    assert seen == pytest.approx(expected)


def test_scheduler_state_round_trips_for_resume() -> None:
    cfg = ScheduleConfig(policy="cosine", warmup_epochs=1.0)
    opt = _optimizer()
    sched = build_scheduler(opt, cfg, steps_per_epoch=5, epochs=4)
    for _ in range(7):
        opt.step()
        sched.step()
    state = sched.state_dict()
    assert state["lr_lambdas"][0]["total_steps"] == 20  # the curve's fields travel with it
    opt2 = _optimizer()
    resumed = build_scheduler(opt2, cfg, steps_per_epoch=5, epochs=4)
    resumed.load_state_dict(state)
    assert resumed.get_last_lr() == sched.get_last_lr()
    opt.step(), sched.step(), opt2.step(), resumed.step()
    assert resumed.get_last_lr() == sched.get_last_lr()


def test_schedule_config_checks() -> None:
    with pytest.raises(ConfigError, match="schedule.warmup_epochs"):
        build_scheduler(_optimizer(), ScheduleConfig(warmup_epochs=-1), 4, 2)
    with pytest.raises(ConfigError, match="schedule.min_lr_ratio"):
        build_scheduler(_optimizer(), ScheduleConfig(min_lr_ratio=1.5), 4, 2)


def test_warmup_does_not_depend_on_the_number_of_epochs() -> None:
    """The curve up to a step is the same for a short and a long run (resume can extend)."""
    cfg = ScheduleConfig(policy="constant", warmup_epochs=10)
    short_opt, long_opt = _optimizer(lr=1.0), _optimizer(lr=1.0)
    short = build_scheduler(short_opt, cfg, steps_per_epoch=2, epochs=2)
    long = build_scheduler(long_opt, cfg, steps_per_epoch=2, epochs=20)
    assert short.lr_lambdas[0].warmup_steps == long.lr_lambdas[0].warmup_steps == 20
    for _ in range(4):
        assert short_opt.param_groups[0]["lr"] == long_opt.param_groups[0]["lr"]
        short_opt.step(), long_opt.step(), short.step(), long.step()


def _net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))


def test_adamw_skips_weight_decay_on_biases_and_norms() -> None:
    opt = build_optimizer(_net(), OptimConfig(name="adamw", lr=0.01, weight_decay=0.05))
    assert isinstance(opt, torch.optim.AdamW)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert [tuple(p.shape) for p in decay["params"]] == [(4, 3, 3, 3)]
    assert len(no_decay["params"]) == 3  # conv bias, BN weight, BN bias
    assert all(g["lr"] == 0.01 for g in opt.param_groups)


def test_sgd_uses_momentum() -> None:
    opt = build_optimizer(_net(), OptimConfig(name="sgd", lr=0.1, momentum=0.8))
    assert isinstance(opt, torch.optim.SGD)
    assert opt.param_groups[0]["momentum"] == 0.8


def test_optimizer_config_checks() -> None:
    with pytest.raises(ConfigError, match="optim.lr: must be > 0"):
        build_optimizer(_net(), OptimConfig(lr=0.0))

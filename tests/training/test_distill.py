"""Knowledge distillation (train.distill): the loss, the teacher's checks, resume, DDP, and a
student that learns more with its teacher than without at equal epochs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml

from training.checkpoint import load_checkpoint
from training.config import ConfigError, DistillConfig, apply_overrides, recipe_from_dict
from training.losses import distillation_loss
from training.model import load_teacher
from training.train import train

from .conftest import torchrun_train, write_untrained_checkpoint

IGNORE = 255

# A recipe that trains in seconds (8 scenes of 64 px, a 3-stage resnet18 Unet), as in test_train.
TINY: dict[str, Any] = {
    "seed": 3,
    "data": {
        "input_size": [64, 64],
        "batch_size": 4,
        "synthetic": {"num_train": 8, "num_val": 4, "image_size": [64, 64]},
    },
    "model": {"kwargs": {"encoder_depth": 3, "decoder_channels": [16, 8, 8]}},
    "optim": {"lr": 0.003},
    "train": {"epochs": 2, "amp": "off", "threads": 1, "progress": False},
}


def tiny(*overrides: str):
    return apply_overrides(recipe_from_dict(TINY), list(overrides))


def distill(teacher: Path, weight: float = 1.0, temperature: float = 2.0) -> str:
    return f"train.distill={{teacher: '{teacher}', weight: {weight}, temperature: {temperature}}}"


def history(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]


@pytest.fixture(scope="module")
def random_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A teacher run dir holding checkpoints/best.pt of an untrained BiSeNetV2 (other arch than
    the students': the teacher is rebuilt from its own recipe)."""
    run_dir = tmp_path_factory.mktemp("teacher") / "run"
    recipe = tiny(
        "model.arch=BiSeNetV2", "model.kwargs={width: 0.25, head_channels: 16, aux_channels: 8}"
    )
    write_untrained_checkpoint(recipe, run_dir, seed=7)
    return run_dir


# --- the loss ------------------------------------------------------------------------------------


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(2, 4, 6, 6, generator=gen)
    teacher = torch.randn(2, 4, 6, 6, generator=gen) * 3
    target = torch.randint(0, 4, (2, 6, 6), generator=gen)
    target[torch.rand(2, 6, 6, generator=gen) < 0.3] = IGNORE
    return student, teacher, target


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_the_loss_is_t2_times_the_mean_pixel_kl_over_valid_pixels(batch, temperature) -> None:
    student, teacher, target = batch
    valid = target != IGNORE
    kl = F.kl_div(
        F.log_softmax(student / temperature, 1), F.log_softmax(teacher / temperature, 1),
        log_target=True, reduction="none",
    ).sum(1)  # fmt: skip
    expected = temperature**2 * kl[valid].mean()
    got = distillation_loss(student, teacher, target, temperature, IGNORE)
    torch.testing.assert_close(got, expected)


def test_ignored_pixels_count_for_nothing_and_the_teacher_gets_no_gradient(batch) -> None:
    student, teacher, target = batch
    student, teacher = student.clone().requires_grad_(), teacher.clone().requires_grad_()
    scrambled = torch.where((target != IGNORE)[:, None], teacher, torch.randn_like(teacher) * 50)
    torch.testing.assert_close(
        distillation_loss(student, scrambled, target), distillation_loss(student, teacher, target)
    )
    distillation_loss(student, teacher, target).backward()
    assert teacher.grad is None
    ignored = (target == IGNORE)[:, None].expand_as(student)
    assert torch.count_nonzero(student.grad[ignored]) == 0
    assert torch.count_nonzero(student.grad[~ignored]) > 0
    all_void = torch.full_like(target, IGNORE)
    assert distillation_loss(student, teacher, all_void).item() == 0.0  # not NaN


def test_a_shape_mismatch_is_named() -> None:
    with pytest.raises(ValueError, match=r"student logits \(1, 3, 4, 4\) and teacher logits"):
        distillation_loss(torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 4, 4), torch.zeros(1, 4, 4))


# --- the recipe and the teacher's checks ---------------------------------------------------------


def test_recipe_validation_names_the_key() -> None:
    recipe = tiny("train.distill={teacher: runs/t, weight: 0.5, temperature: 4}")
    assert recipe.train.distill == DistillConfig(teacher="runs/t", weight=0.5, temperature=4.0)
    assert tiny().train.distill is None
    cases = {
        "train.distill={weight: 1.0}": "train.distill.teacher: required",
        "train.distill={teacher: t, weight: -1}": "train.distill.weight: must be >= 0",
        "train.distill={teacher: t, temperature: 0}": "train.distill.temperature: must be > 0",
        "train.distill={teacher: t, alpha: 1}": "unknown key train.distill.alpha",
    }
    for override, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            tiny(override)


def test_a_missing_teacher_run_is_named_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train.distill.teacher: '.*nowhere' is not a direc"):
        train(tiny(distill(tmp_path / "nowhere")), tmp_path / "student")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"train.distill.teacher: .*best.pt: no such checkpoint"
                       r".*train the teacher run first"):  # fmt: skip
        train(tiny(distill(tmp_path / "empty")), tmp_path / "student")
    assert not (tmp_path / "student").exists()  # refused before anything is written


def test_a_teacher_of_other_classes_is_refused(tmp_path: Path) -> None:
    two = tiny("data.class_map={classes: [background, disc]}")
    write_untrained_checkpoint(two, tmp_path / "two")
    message = (
        r"train.distill.teacher: .* predicts 2 classes, this recipe's data has 6; distil from a "
        r"teacher trained on the same classes"
    )
    with pytest.raises(ConfigError, match=message):
        train(tiny(distill(tmp_path / "two")), tmp_path / "student")
    swapped = tiny(
        "data.class_map={classes: [disc, background, box, triangle, ring, bar]}"
    )  # same count, other order
    write_untrained_checkpoint(swapped, tmp_path / "swapped")
    with pytest.raises(ConfigError, match="the teacher's classes must match, in order"):
        train(tiny(distill(tmp_path / "swapped")), tmp_path / "student")


def test_a_teacher_normalised_otherwise_is_refused(tmp_path: Path) -> None:
    other = tiny("data.mean=[0.5, 0.5, 0.5]", "data.std=[0.5, 0.5, 0.5]")
    write_untrained_checkpoint(other, tmp_path / "other")
    with pytest.raises(ConfigError, match="set data.mean and data.std to the teacher's"):
        train(tiny(distill(tmp_path / "other")), tmp_path / "student")


def test_the_teacher_is_frozen_in_eval_mode(random_teacher: Path) -> None:
    info_names = ("background", "disc", "box", "triangle", "ring", "bar")
    spec = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    teacher = load_teacher(DistillConfig(teacher=str(random_teacher)), info_names, spec, "cpu")
    assert not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    out = teacher(torch.zeros(2, 3, 64, 64))  # eval: the logits only, no booster outputs
    assert isinstance(out, torch.Tensor) and out.shape == (2, 6, 64, 64)


# --- in the training loop ------------------------------------------------------------------------


def test_a_zero_weight_teacher_changes_nothing(random_teacher: Path, tmp_path: Path) -> None:
    """Loading and running the teacher leaves the student's random stream alone: with weight 0
    the run is the plain run, weight for weight. The settings land in the recipe + metadata."""
    train(tiny(), tmp_path / "plain")
    train(tiny(distill(random_teacher, weight=0.0)), tmp_path / "zero")
    a, b = weights(tmp_path / "plain"), weights(tmp_path / "zero")
    assert all(torch.equal(a[k], b[k]) for k in a)
    saved = yaml.safe_load((tmp_path / "zero" / "recipe.yaml").read_text())["train"]["distill"]
    assert saved == {"teacher": str(random_teacher), "weight": 0.0, "temperature": 2.0}
    meta = load_checkpoint(tmp_path / "zero" / "checkpoints" / "best.pt")["metadata"]
    assert meta["recipe"]["train"]["distill"] == saved


def test_resume_with_a_teacher_equals_an_uninterrupted_run(
    random_teacher: Path, tmp_path: Path
) -> None:
    """2 epochs + resume to 4 == 4 straight, the teacher rebuilt at the resume; and the teacher
    term is really there (the curve differs from the same run without it)."""
    common = ["schedule.policy=constant", distill(random_teacher, weight=1.0)]
    train(tiny("train.epochs=4", *common), tmp_path / "straight")
    train(tiny("train.epochs=2", *common), tmp_path / "split")
    train(tiny("train.epochs=4", *common), tmp_path / "split", resume=True)
    a, b = history(tmp_path / "straight"), history(tmp_path / "split")
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b]
    wa, wb = weights(tmp_path / "straight"), weights(tmp_path / "split")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    train(tiny("train.epochs=2", "schedule.policy=constant"), tmp_path / "plain")
    assert history(tmp_path / "plain")[0]["train_loss"] != a[0]["train_loss"]
    # The recipe is part of the run: resuming without the teacher is a different experiment.
    with pytest.raises(ConfigError, match=r"recipe differs.*\['train.distill'\]"):
        train(tiny("train.epochs=5", "schedule.policy=constant"), tmp_path / "split", resume=True)


@pytest.mark.slow
def test_torchrun_distils_with_a_teacher_per_rank(random_teacher: Path, tmp_path: Path) -> None:
    """2 CPU ranks on gloo, each rebuilding the teacher; rank 0 writes one run."""
    torchrun_train(tiny(distill(random_teacher)).to_dict(), tmp_path)
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert ckpt["epoch"] == 2 and ckpt["global_step"] == 2  # 8 images / 2 ranks / batch 4
    assert ckpt["recipe"]["train"]["distill"]["teacher"] == str(random_teacher)
    assert len(history(tmp_path / "run")) == 2


# --- a trained teacher and two students ---------------------------------------------------------


# The embedded scenes of 64 px: the teacher learns 256 of them, the students only 32 (the
# deployment story: a big model trained on everything teaches a small one on what it is given).
def scenes(num_train: int, seed: int) -> dict[str, Any]:
    return {
        "seed": seed,
        "data": {
            "input_size": [64, 64],
            "batch_size": 4,
            "synthetic": {"num_train": num_train, "num_val": 32, "image_size": [64, 64]},
        },
        "optim": {"lr": 0.003},
        "train": {"epochs": 8, "amp": "off", "threads": 1, "progress": False},
    }


# A resnet18 Unet: ~0.72 val mIoU in 8 epochs (~1.5 min here).
TEACHER = ["model.kwargs={encoder_depth: 3, decoder_channels: [32, 16, 16]}"]
# A half-width BiSeNetV2 (~1/18 of the teacher's weights), 30 epochs of its 32 scenes (~1 min).
STUDENT = [
    "model.arch=BiSeNetV2",
    "model.kwargs={width: 0.5, head_channels: 64, aux_channels: 32}",
    "train.epochs=30",
]


def val_kl_to_teacher(student_run: Path, teacher_run: Path, temperature: float) -> float:
    """The distillation loss (T^2 * mean pixel KL) of a run's final model on the val split."""
    from training.datasets import build_dataset
    from training.model import model_from_checkpoint
    from training.resolve import resolve_preprocess_spec

    ckpt = load_checkpoint(student_run / "checkpoints" / "last.pt")
    student = model_from_checkpoint(ckpt)
    teacher = model_from_checkpoint(load_checkpoint(teacher_run / "checkpoints" / "best.pt"))
    recipe = recipe_from_dict(ckpt["recipe"])
    val = build_dataset(recipe.data, "val", resolve_preprocess_spec(recipe), train=False)
    x, y = (torch.stack(t) for t in zip(*(val[i] for i in range(len(val))), strict=True))
    with torch.no_grad():
        return float(distillation_loss(student(x), teacher(x), y, temperature, IGNORE))


@pytest.mark.slow
def test_a_distilled_student_comes_closer_to_its_teacher(tmp_path: Path) -> None:
    """Teacher, then a BiSeNetV2 student with and without it, equal seed, data and epochs: the
    distilled student's predictions are closer to the teacher's (the KL it is trained on, on
    the val split), by a clear margin; the val mIoU of both is printed, not asserted.

    Why not the mIoU: on 32 scenes it depends on the CPU's arithmetic. On a 2-core AMD EPYC
    (AVX2), seeds 0-5, plain -> distilled: 0.204 -> 0.364, 0.292 -> 0.370, 0.357 -> 0.406,
    0.404 -> 0.350, 0.402 -> 0.403, 0.270 -> 0.398 (mean 0.322 -> 0.382). On a 2-core Xeon
    (AVX-512), the same code and seeds: 0.250 -> 0.359, 0.258 -> 0.199, 0.358 -> 0.399,
    0.396 -> 0.389, 0.402 -> 0.365, 0.401 -> 0.262 (mean 0.344 -> 0.329). The KL to the teacher
    fell for every seed on the Xeon (1.034 -> 0.586, 1.006 -> 0.926, 0.801 -> 0.571,
    0.791 -> 0.565, 0.784 -> 0.684, 0.758 -> 0.723) and for seed 1 on the EPYC (1.048 ->
    0.633). This test runs seed 0 (43 % lower on the Xeon), so a change that stops the
    teacher's signal reaching the student fails it.
    """
    teacher = tmp_path / "teacher"
    taught = train(apply_overrides(recipe_from_dict(scenes(256, 0)), TEACHER), teacher)
    runs = {}
    for name, extra in (("plain", []), ("distilled", [distill(teacher, 1.0, 2.0)])):
        recipe = apply_overrides(recipe_from_dict(scenes(32, 0)), STUDENT + extra)
        runs[name] = train(recipe, tmp_path / name)["final"]["val_miou"]
    plain_kl = val_kl_to_teacher(tmp_path / "plain", teacher, 2.0)
    distilled_kl = val_kl_to_teacher(tmp_path / "distilled", teacher, 2.0)
    print(
        f"teacher mIoU {taught['best_miou']:.3f}; student mIoU plain {runs['plain']:.3f}, "
        f"distilled {runs['distilled']:.3f}; KL to the teacher {plain_kl:.3f} -> "
        f"{distilled_kl:.3f}"
    )
    assert taught["best_miou"] > runs["plain"] + 0.2  # a teacher worth learning from
    assert distilled_kl < 0.8 * plain_kl

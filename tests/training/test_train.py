"""training/train.py: real tiny runs on the synthetic data: files, determinism, resume, stopping."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from handler.artifact import parse_metadata
from training.checkpoint import CheckpointError, load_checkpoint
from training.config import ConfigError, Recipe, apply_overrides, load_recipe, recipe_from_dict
from training.resolve import build_metadata, resolve_preprocess_spec
from training.train import CSV_FIELDS, Runtime, resolve_amp, train

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


def tiny_recipe(*overrides: str) -> Recipe:
    """A recipe that trains in seconds: 8 images of 64 px, a 3-stage resnet18 Unet."""
    return apply_overrides(recipe_from_dict(TINY), list(overrides))


def history(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """One tiny 2-epoch run shared by the tests that only read its outputs."""
    run_dir = tmp_path_factory.mktemp("run") / "tiny"
    return run_dir, train(tiny_recipe(), run_dir)


def test_run_writes_every_file(run) -> None:
    run_dir, summary = run
    for name in ("recipe.yaml", "metrics.csv", "metrics.jsonl", "curves.png"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert load_recipe(run_dir / "recipe.yaml") == tiny_recipe()
    assert summary["epochs_completed"] == 2
    assert summary["best_checkpoint"] == str(run_dir / "checkpoints" / "best.pt")


def test_metrics_files_have_one_row_per_epoch(run) -> None:
    run_dir, summary = run
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert list(rows[0]) == CSV_FIELDS
    jsonl = history(run_dir)
    assert [r["epoch"] for r in jsonl] == [1, 2]
    for row in jsonl:
        assert row["train_loss"] > 0 and row["val_loss"] > 0
        assert 0.0 <= row["val_miou"] <= 1.0 and 0.0 <= row["pixel_acc"] <= 1.0
        assert row["images_per_s"] > 0 and row["epoch_time_s"] > 0
        assert set(row["per_class_iou"]) == {"background", "disc", "box", "triangle", "ring", "bar"}
    assert float(rows[1]["val_miou"]) == pytest.approx(jsonl[1]["val_miou"])
    assert summary["best_miou"] == max(r["val_miou"] for r in jsonl)
    # Warmup (1 epoch = 2 steps) then poly decay: epoch 1 starts at lr/2, epoch 2 at the peak.
    assert jsonl[0]["lr"] == pytest.approx(0.003 / 2)
    assert jsonl[1]["lr"] == pytest.approx(0.003)


def test_checkpoints_carry_state_and_metadata(run) -> None:
    run_dir, summary = run
    last = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    best = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    keys = (
        "model",
        "optimizer",
        "scheduler",
        "scaler",
        "epoch",
        "global_step",
        "rng",
        "best_metric",
        "epochs_without_improvement",
        "recipe",
        "metadata",
        "metrics",
    )
    for key in keys:
        assert key in last, key
    assert last["epoch"] == 2 and last["global_step"] == 4  # 8 images / batch 4 = 2 steps
    assert best["epoch"] == summary["best_epoch"]
    assert best["best_metric"] == pytest.approx(summary["best_miou"])
    assert best["metadata"]["metrics"]["miou"] == pytest.approx(summary["best_miou"])
    assert best["metadata"]["source_checkpoint"].endswith("best.pt")
    meta = parse_metadata(last["metadata"])  # the handler accepts it as is
    assert meta.num_classes == 6 and meta.preprocess.input_size == (64, 64)
    assert meta.class_names[1] == "disc"
    assert "export" not in last["metadata"]
    assert last["metrics"]["confusion_matrix"] and len(last["metrics"]["confusion_matrix"]) == 6
    assert sum(map(sum, last["metrics"]["confusion_matrix"])) == 4 * 64 * 64


def test_same_seed_same_run(run, tmp_path: Path) -> None:
    """Deterministic on CPU: a second run of the same recipe repeats the loss curve exactly."""
    run_dir, _ = run
    train(tiny_recipe(), tmp_path / "again")
    for a, b in zip(history(run_dir), history(tmp_path / "again"), strict=True):
        assert a["train_loss"] == b["train_loss"] and a["val_loss"] == b["val_loss"]
    first = weights(run_dir / "checkpoints/last.pt")
    second = weights(tmp_path / "again/checkpoints/last.pt")
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_another_seed_another_run(run, tmp_path: Path) -> None:
    run_dir, _ = run
    train(tiny_recipe("seed=4"), tmp_path / "other")
    assert history(run_dir)[0]["train_loss"] != history(tmp_path / "other")[0]["train_loss"]


def test_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    """4 epochs straight == 2 epochs, then resume to 4: weights and loss curve identical.

    A warmup of 3 epochs crosses the interruption, so the scheduler state matters; the
    constant policy keeps the curve independent of train.epochs (2 vs 4).
    """
    common = ["schedule.policy=constant", "schedule.warmup_epochs=3"]
    straight = tmp_path / "straight"
    train(tiny_recipe("train.epochs=4", *common), straight)
    split = tmp_path / "split"
    train(tiny_recipe("train.epochs=2", *common), split)
    summary = train(tiny_recipe("train.epochs=4", *common), split, resume=True)
    assert summary["epochs_completed"] == 4
    a, b = history(straight), history(split)
    assert [r["epoch"] for r in b] == [1, 2, 3, 4]
    for key in ("train_loss", "val_loss", "val_miou", "lr"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    wa, wb = weights(straight / "checkpoints/last.pt"), weights(split / "checkpoints/last.pt")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # And the run learned something: the training loss fell.
    assert a[-1]["train_loss"] < a[0]["train_loss"]


def test_early_stopping_stops(tmp_path: Path) -> None:
    # Epoch 1 always improves on "nothing yet"; after it, a gain of more than 1.0 mIoU is
    # impossible, so a patience of 1 stops the run after epoch 2 of 5.
    recipe = tiny_recipe(
        "train.epochs=5", "train.early_stopping_patience=1", "train.early_stopping_min_delta=1.0"
    )
    summary = train(recipe, tmp_path / "stop")
    assert summary["stopped_early"] is True
    assert summary["epochs_completed"] == 2
    assert len(history(tmp_path / "stop")) == 2
    assert load_checkpoint(tmp_path / "stop/checkpoints/last.pt")["epochs_without_improvement"] == 1
    assert (tmp_path / "stop/checkpoints/best.pt").is_file()


def test_refuses_to_overwrite_a_run_without_resume(run) -> None:
    run_dir, _ = run
    with pytest.raises(ConfigError, match="already holds a trained run.*--resume"):
        train(tiny_recipe(), run_dir)


def test_resume_needs_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="last.pt: no such checkpoint"):
        train(tiny_recipe(), tmp_path / "empty", resume=True)


def test_resume_refuses_a_different_recipe(run) -> None:
    run_dir, _ = run
    with pytest.raises(ConfigError, match=r"recipe differs.*\['model.arch'\]"):
        train(tiny_recipe("train.epochs=3", "model.arch=FPN"), run_dir, resume=True)


def test_resume_of_a_finished_run_says_how_to_continue(run) -> None:
    run_dir, _ = run
    with pytest.raises(ConfigError, match="raise train.epochs"):
        train(tiny_recipe(), run_dir, resume=True)


def test_batch_larger_than_the_data_is_explained(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data.batch_size: 16 is larger than the 8"):
        train(tiny_recipe("data.batch_size=16"), tmp_path / "big")


def test_amp_resolution() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda:0")
    assert resolve_amp("off", cpu) == (None, False)
    assert resolve_amp("bf16", cpu) == (torch.bfloat16, False)
    assert resolve_amp("auto", cuda) == (torch.float16, True)
    assert resolve_amp("fp16", cuda) == (torch.float16, True)
    assert resolve_amp("auto", cpu)[0] in (None, torch.bfloat16)
    assert resolve_amp("auto", cpu)[1] is False
    with pytest.raises(ConfigError, match="fp16 needs CUDA"):
        resolve_amp("fp16", cpu)


def test_runtime_defaults_to_one_process() -> None:
    rt = Runtime(rank=0, world_size=1, device=torch.device("cpu"))
    assert rt.is_main and not rt.distributed


def test_preprocess_spec_resolution() -> None:
    spec = resolve_preprocess_spec(tiny_recipe())
    assert spec.input_size == (64, 64) and spec.size_divisor == 32
    assert spec.mean == (0.485, 0.456, 0.406)  # random init: ImageNet statistics
    custom = resolve_preprocess_spec(
        tiny_recipe(
            "data.mean=[0.5, 0.5, 0.5]", "data.std=[0.1, 0.2, 0.3]", "data.resize_policy=pad"
        )
    )
    assert custom.mean == (0.5, 0.5, 0.5) and custom.std == (0.1, 0.2, 0.3)
    assert custom.resize_policy == "pad"
    # Pretrained weights that are not cached: never a download, ImageNet as the fallback.
    pretrained = resolve_preprocess_spec(tiny_recipe("model.encoder_weights=imagenet"))
    assert pretrained.mean == (0.485, 0.456, 0.406)


def test_build_metadata_matches_the_schema() -> None:
    from training.datasets import dataset_info

    recipe = tiny_recipe()
    info = dataset_info(recipe.data)
    metrics = {"miou": 0.5, "pixel_accuracy": 0.9, "per_class_iou": [0.1, 0.2, 0.3, 0.4, 0.5,
               float("nan")]}  # fmt: skip
    built = build_metadata(recipe, info, resolve_preprocess_spec(recipe), metrics, "x/best.pt")
    meta = built.to_dict()
    assert meta["schema_version"] == 1 and meta["num_classes"] == 6
    assert meta["palette"][1] == [230, 25, 75]
    assert meta["metrics"]["per_class_iou"]["disc"] == 0.2
    assert meta["metrics"]["per_class_iou"]["bar"] is None  # NaN is not JSON
    assert json.loads(json.dumps(meta)) == meta
    assert yaml.safe_load(yaml.safe_dump(meta["recipe"])) == recipe.to_dict()
    assert parse_metadata(meta).source_checkpoint == "x/best.pt"


@pytest.mark.slow
def test_the_loop_learns_a_tiny_set_by_heart(tmp_path: Path) -> None:
    """Validated on its own 8 training scenes without augmentation, the model must go far past
    the all-background score (~0.14 mIoU): loss, optimiser, schedule and metrics work together.
    """
    recipe = tiny_recipe(
        "train.epochs=30", "data.val_split=train", "data.synthetic.num_val=8", "model.kwargs={}",
        "data.augment={hflip: 0.0, scale: [1.0, 1.0], color_jitter: 0.0, noise: 0.0}",
        "schedule.policy=constant",
    )  # fmt: skip
    summary = train(recipe, tmp_path / "overfit")
    assert summary["best_miou"] > 0.4


# --- checkpoints ---------------------------------------------------------------------------------


def _minimal(epoch: int) -> dict:
    return {"model": {"w": torch.arange(3.0)}, "epoch": epoch, "recipe": {}, "metadata": {}}


def test_save_checkpoint_is_atomic(tmp_path: Path) -> None:
    from training.checkpoint import save_checkpoint

    path = tmp_path / "ckpt" / "last.pt"
    save_checkpoint(path, _minimal(1))
    with pytest.raises(Exception):  # noqa: B017 - whatever torch.save raises for a lambda
        save_checkpoint(path, _minimal(2) | {"bad": lambda: None})
    assert load_checkpoint(path)["epoch"] == 1  # the previous file is intact
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temporary left


def test_truncated_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    from training.checkpoint import save_checkpoint

    path = tmp_path / "last.pt"
    save_checkpoint(path, _minimal(1))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="last.pt: not a readable segserve checkpoint"):
        load_checkpoint(path)


def test_foreign_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(CheckpointError, match=r"lacks \['model', 'epoch', 'recipe', 'metadata'\]"):
        load_checkpoint(path)


def test_rng_state_round_trips_through_a_checkpoint(tmp_path: Path) -> None:
    import random

    import numpy as np

    from training.checkpoint import capture_rng_state, restore_rng_state, save_checkpoint

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    save_checkpoint(tmp_path / "c.pt", _minimal(0) | {"rng": capture_rng_state()})
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    restore_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"])  # weights_only load
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected

"""End-to-end evaluation of a tiny random checkpoint on tiny synthetic data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from handler.preprocessing import prepare_image, rgb_array_to_tensor
from training.checkpoint import CheckpointError, load_checkpoint
from training.config import recipe_from_dict
from training.datasets import build_dataset, dataset_info
from training.evaluate import EvalTarget, colourise, overlay_indices, overlay_panel, run_evaluation
from training.metrics import BoundaryF1, ConfusionMatrix
from training.model import model_from_checkpoint
from training.resolve import resolve_preprocess_spec

from .conftest import write_untrained_checkpoint

VAL_SIZE = (40, 56)  # not a multiple of 32: predictions are upsampled back to it


def tiny_run(tmp_path: Path, data: dict | None = None) -> Path:
    """A run folder with checkpoints/best.pt of a random tiny Unet on tiny synthetic data."""
    recipe = recipe_from_dict(
        {
            "data": {
                "input_size": [64, 64],
                "batch_size": 2,
                "synthetic": {"num_train": 2, "num_val": 5, "image_size": list(VAL_SIZE)},
                **(data or {}),
            },
            "model": {"kwargs": {"encoder_depth": 3, "decoder_channels": [32, 16, 8]}},
            "eval": {"boundary_tolerance": 1, "num_overlays": 3},
        }
    )
    write_untrained_checkpoint(recipe, tmp_path / "run", seed=0)
    return tmp_path / "run"


def independent_predictions(run_dir: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """(truth, prediction) per val image, computed here one image at a time, the long way."""
    ckpt = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    recipe = recipe_from_dict(ckpt["recipe"])
    spec = resolve_preprocess_spec(recipe)
    model = model_from_checkpoint(ckpt)
    dataset = build_dataset(recipe.data, "val", spec, train=False)
    out = []
    for i in range(len(dataset)):
        rgb, truth, _ = dataset.load_raw(i)
        x, _ = prepare_image(rgb_array_to_tensor(rgb), spec)
        with torch.no_grad():
            logits = model(x[None])
        logits = F.interpolate(logits, size=truth.shape, mode="bilinear", align_corners=False)
        out.append((truth, logits[0].argmax(0).numpy()))
    return out


def test_run_evaluation_writes_everything_and_matches_an_independent_count(
    tmp_path: Path,
) -> None:
    run_dir = tiny_run(tmp_path)
    result = run_evaluation(run_dir)
    eval_dir = run_dir / "eval"

    written = json.loads((eval_dir / "metrics.json").read_text())
    assert written == result
    cm, bf = ConfusionMatrix(6), BoundaryF1(6, tolerance=1)
    for truth, pred in independent_predictions(run_dir):
        cm.update(torch.from_numpy(pred), torch.from_numpy(truth))
        bf.update(torch.from_numpy(pred), torch.from_numpy(truth))
    expected = cm.compute()
    assert written["confusion_matrix"] == cm.matrix.tolist()
    assert int(cm.matrix.sum()) == 5 * VAL_SIZE[0] * VAL_SIZE[1]  # native resolution, all pixels
    assert written["miou"] == pytest.approx(expected["miou"])
    assert written["pixel_accuracy"] == pytest.approx(expected["pixel_accuracy"])
    assert written["boundary_f1"] == pytest.approx(bf.compute())
    for got, want in zip(written["per_class_iou"], expected["per_class_iou"], strict=True):
        assert (got is None and math.isnan(want)) or got == pytest.approx(want)
    assert written["num_images"] == 5 and written["boundary_tolerance"] == 1
    assert written["checkpoint"] == str(run_dir / "checkpoints" / "best.pt")

    table = (eval_dir / "per_class.md").read_text().splitlines()
    assert "| class | IoU | accuracy | Dice | pixels |" in table
    rows = [line for line in table if line.startswith("| ") and "class |" not in line]
    assert [r.split(" | ")[0][2:] for r in rows] == list(
        dataset_info(recipe_from_dict({}).data).class_names
    )
    assert rows[0].endswith(f"| {written['pixels_per_class'][0]} |")

    with Image.open(eval_dir / "confusion_matrix.png") as png:
        assert png.format == "PNG" and min(png.size) >= 300
    overlays = sorted((eval_dir / "overlays").glob("*.png"))
    assert [p.name[:5] for p in overlays] == ["00000", "00002", "00004"]
    for path in overlays:
        with Image.open(path) as png:
            assert png.size == (4 * VAL_SIZE[1], VAL_SIZE[0])


def test_overlay_panel_colours() -> None:
    target = EvalTarget(("a", "b"), ((10, 20, 30), (200, 100, 0)), ignore_index=255)
    rgb = np.full((2, 3, 3), 100, np.uint8)
    truth = np.array([[0, 1, 255], [0, 0, 1]])
    pred = np.array([[0, 0, 1], [0, 1, 1]])
    panel = overlay_panel(rgb, truth, pred, target)
    assert panel.shape == (2, 12, 3)
    assert panel[0, 0].tolist() == [100, 100, 100]  # the image itself
    assert panel[0, 4].tolist() == [150, 100, 50]  # truth class 1 blended half/half
    assert panel[0, 5].tolist() == [255, 255, 255]  # ignore: white
    errors = panel[:, 9:]
    assert errors[0, 1].tolist() == [255, 0, 0] and errors[1, 1].tolist() == [255, 0, 0]
    assert errors[0, 0].tolist() == [50, 50, 50]  # right: dimmed grey
    assert errors[0, 2].tolist() == [255, 255, 255]  # ignored, whatever was predicted
    assert colourise(truth, target.palette, 255)[1, 2].tolist() == [200, 100, 0]


def test_overlay_indices() -> None:
    assert overlay_indices(5, 3) == [0, 2, 4]
    assert overlay_indices(2, 4) == [0, 1]
    assert overlay_indices(7, 0) == []


def test_missing_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"best\.pt: no such checkpoint"):
        run_evaluation(tmp_path)

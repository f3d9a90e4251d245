"""End-to-end evaluation of a tiny random checkpoint on tiny synthetic data."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from handler.preprocessing import prepare_image, rgb_array_to_tensor
from training.checkpoint import CheckpointError, load_checkpoint
from training.config import recipe_from_dict
from training.datasets import DataError, build_dataset, dataset_info
from training.evaluate import (
    ERROR_COLOUR,
    IGNORE_COLOUR,
    OVERLAY_TITLES,
    EvalTarget,
    colourise,
    overlay_figure,
    overlay_indices,
    overlay_panel,
    run_evaluation,
)
from training.figures import MIN_PANEL_HEIGHT, upscale_nearest
from training.inference import InferenceError, InferenceOptions
from training.metrics import BoundaryF1, ConfusionMatrix
from training.model import model_from_checkpoint
from training.resolve import resolve_preprocess_spec

from .conftest import H, W, write_index, write_untrained_checkpoint

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
    assert "| class | IoU | accuracy | Dice | boundary F1 | pixels |" in table
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
        with Image.open(path) as png:  # 40 px rows upscaled 8x, plus titles and a legend
            assert png.size[0] >= 4 * 8 * VAL_SIZE[1] and png.size[1] > 8 * VAL_SIZE[0]


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


def test_overlay_figure_has_titles_readable_panels_and_a_legend_of_the_classes_shown() -> None:
    palette = ((10, 200, 30), (200, 100, 0), (40, 40, 220))
    target = EvalTarget(("grass", "road", "sky"), palette, ignore_index=255)
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), np.uint8)
    truth = np.zeros((20, 30), np.int64)
    truth[:, 20:] = 255
    pred = np.zeros((20, 30), np.int64)
    pred[5:9, 3:8] = 1  # "road" predicted where the truth says "grass"; "sky" never appears
    figure, boxes = overlay_figure(rgb, truth, pred, target)
    panel = overlay_panel(rgb, truth, pred, target)
    factor = 16  # ceil(320 / 20)
    assert len(boxes) == len(OVERLAY_TITLES) == 4
    for i, (top, left, h, w) in enumerate(boxes):
        assert (h, w) == (20 * factor, 30 * factor) and h >= MIN_PANEL_HEIGHT
        want = upscale_nearest(panel[:, i * 30 : (i + 1) * 30], factor)
        assert np.array_equal(figure[top : top + h, left : left + w], want)  # nearest, exact
    top = boxes[0][0]
    header, legend = figure[:top], figure[top + boxes[0][2] :]
    assert top > 10 and (header < 100).all(axis=2).any()  # dark title text above the panels
    colours = {tuple(c) for c in legend.reshape(-1, 3).tolist()}
    for present in (palette[0], palette[1], IGNORE_COLOUR, ERROR_COLOUR):
        assert present in colours
    assert palette[2] not in colours  # "sky" is in neither truth nor prediction


def test_overlay_indices() -> None:
    assert overlay_indices(5, 3) == [0, 2, 4]
    assert overlay_indices(2, 4) == [0, 1]
    assert overlay_indices(7, 0) == []
    assert overlay_indices(7, 1) == [0]


def test_missing_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"best\.pt: no such checkpoint"):
        run_evaluation(tmp_path)


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


def test_other_splits_and_tta_write_their_own_folder_and_leave_eval_alone(tmp_path: Path) -> None:
    """64x64 scenes under a 64x64 input: a one-window "sliding window" is the served path
    exactly, while flip TTA of a random model changes the answer."""
    run_dir = tiny_run(
        tmp_path, {"synthetic": {"num_train": 3, "num_val": 2, "image_size": [64, 64]}}
    )
    plain = run_evaluation(run_dir)
    window = run_evaluation(run_dir, options=InferenceOptions(window=(64, 64)))
    flip = run_evaluation(run_dir, options=InferenceOptions(flip=True))
    train = run_evaluation(run_dir, split="train")

    assert _read(run_dir / "eval" / "metrics.json") == plain  # the one export reads
    assert plain["split"] == "val" and plain["inference"]["flip"] is False
    assert _read(run_dir / "eval-val-window64x64-stride32x32" / "metrics.json") == window
    assert window["confusion_matrix"] == plain["confusion_matrix"]
    assert window["inference"] == {"flip": False, "scales": [1.0], "window": [64, 64],
                                   "stride": [32, 32]}  # fmt: skip
    assert _read(run_dir / "eval-val-flip" / "metrics.json") == flip
    assert flip["confusion_matrix"] != plain["confusion_matrix"]
    assert train["split"] == "train" and train["num_images"] == 3
    assert _read(run_dir / "eval-train" / "metrics.json") == train
    for name in ("eval-train", "eval-val-flip"):
        assert (run_dir / name / "per_class.md").is_file()
        assert len(list((run_dir / name / "overlays").glob("*.png"))) >= 2


def test_unknown_split_data_root_and_window_are_clear_errors(tmp_path: Path) -> None:
    run_dir = tiny_run(tmp_path)
    with pytest.raises(DataError, match="synthetic data has splits train, val and test"):
        run_evaluation(run_dir, split="holdout")
    with pytest.raises(DataError, match="--data-root .*data.kind=synthetic.*drop --data-root"):
        run_evaluation(run_dir, data_root=tmp_path)
    with pytest.raises(InferenceError, match="--window 48x48: each side must be a multiple of 32"):
        run_evaluation(run_dir, options=InferenceOptions(window=(48, 48)))
    assert not (run_dir / "eval").exists()


def test_evaluate_another_copy_of_a_folder_dataset(tmp_path: Path, folder_root: Path) -> None:
    recipe = recipe_from_dict(
        {
            "data": {"kind": "folder", "root": str(folder_root), "input_size": [32, 32]},
            "model": {"kwargs": {"encoder_depth": 3, "decoder_channels": [16, 8, 8]}},
            "eval": {"num_overlays": 1},
        }
    )
    run_dir = tmp_path / "run"
    write_untrained_checkpoint(recipe, run_dir)
    copy = tmp_path / "copy"
    shutil.copytree(folder_root, copy)
    shutil.copy(copy / "images" / "train" / "img1.jpg", copy / "images" / "val" / "img1.jpg")
    write_index(copy / "masks" / "val" / "img1.png", np.full((H, W), 2))  # all "car"

    original = run_evaluation(run_dir)
    other = run_evaluation(run_dir, data_root=copy)
    assert original["num_images"] == 1 and original["data_root"] == str(folder_root)
    assert other["num_images"] == 2 and other["data_root"] == str(copy)
    assert _read(run_dir / "eval-val-root-copy" / "metrics.json") == other
    # The copy's extra image is all "car": 768 more car pixels in the truth.
    assert other["pixels_per_class"][2] == original["pixels_per_class"][2] + H * W
    assert _read(run_dir / "eval" / "metrics.json") == original
    with pytest.raises(DataError, match="RUN_DIR/eval holds the plain validation evaluation"):
        run_evaluation(run_dir, data_root=copy, out_dir=run_dir / "eval")

    (copy / "classes.yaml").write_text("names: [background, road, truck]\nignore_index: 9\n")
    with pytest.raises(DataError, match=r"classes \['background', 'road', 'truck'\] differ"):
        run_evaluation(run_dir, data_root=copy)

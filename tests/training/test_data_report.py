"""check-data's report (training/data_report.py): class distribution, image sizes, samples."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from training.cli import main
from training.config import DataConfig, SyntheticConfig
from training.data_report import CELL_HEIGHT, REPORT_FILES, DataSurvey, size_statistics
from training.datasets import dataset_info
from training.figures import LegendEntry, class_legend, font_size_for, legend
from training.synthetic import PALETTE, generate_scene, scene_index

from .conftest import FOLDER_COLOURS, FOLDER_NAMES, bands, write_index, write_rgb


def recipe_file(tmp_path: Path, data: dict) -> Path:
    recipe = {"data": {"input_size": [32, 32]} | data, "output_dir": str(tmp_path / "run")}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def colours_in(pixels: np.ndarray) -> set[tuple[int, int, int]]:
    return {tuple(c) for c in np.unique(pixels.reshape(-1, 3), axis=0).tolist()}


def the_legend(pixels: np.ndarray, names, palette, ignore: int) -> np.ndarray:
    """The legend samples.png must end with, built here from the class list."""
    entries = class_legend(names, palette) + [LegendEntry(f"ignored ({ignore})", (255, 255, 255))]
    return legend(entries, pixels.shape[1], font_size_for(2 * CELL_HEIGHT))


def test_check_data_report_on_the_synthetic_dataset(tmp_path: Path, capsys) -> None:
    synthetic = {"synthetic": {"num_train": 5, "num_val": 3, "image_size": [40, 56], "seed": 3}}
    config = recipe_file(tmp_path, synthetic)
    out = tmp_path / "report"
    assert main(["check-data", "--config", str(config), "--out", str(out), "--samples", "2"]) == 0
    printed = capsys.readouterr().out
    for name in REPORT_FILES:
        assert str(out / name) in printed  # every file is listed
        assert (out / name).is_file()

    summary = json.loads((out / "summary.json").read_text())
    for split, n in (("train", 5), ("val", 3)):
        expected = np.zeros(6, np.int64)
        images = np.zeros(6, np.int64)
        for i in range(n):
            _, mask = generate_scene(3, scene_index(split, i), (40, 56))
            counts = np.bincount(mask.ravel(), minlength=6)
            expected += counts
            images += counts > 0
        got = summary["splits"][split]
        assert [c["pixels"] for c in got["classes"]] == expected.tolist()
        assert [c["images"] for c in got["classes"]] == images.tolist()
        assert got["sizes"]["distinct"] == 1 and got["sizes"]["most_common"] == [["40x56", n]]
        assert got["labelled_pixels"] == n * 40 * 56 and got["ignored_pixels"] == 0

    with Image.open(out / "samples.png") as png:
        pixels = np.asarray(png.convert("RGB"))
    names = dataset_info(DataConfig(synthetic=SyntheticConfig())).class_names
    bottom = the_legend(pixels, names, PALETTE, 255)
    assert np.array_equal(pixels[-bottom.shape[0] :], bottom)
    assert set(PALETTE) <= colours_in(bottom)
    # 2 samples per split, image | mask, 224 px tall, two to a row: at least 2 rows of cells.
    assert pixels.shape[0] > 2 * CELL_HEIGHT and pixels.shape[1] >= 4 * CELL_HEIGHT
    with Image.open(out / "class_distribution.png") as png:
        chart = np.asarray(png.convert("RGB"))
    assert set(PALETTE[1:]) <= colours_in(chart)  # bars in the class colours


@pytest.fixture
def odd_folder(folder_root: Path) -> Path:
    """The folder fixture with one train image at another size (30x40)."""
    write_rgb(folder_root / "images" / "train" / "img2.jpg", seed=7, size=(30, 40), fmt="JPEG")
    write_index(folder_root / "masks" / "train" / "img2.png", bands([0, 1, 1, 9], (30, 40)))
    return folder_root


def test_check_data_report_on_a_folder_dataset(tmp_path: Path, odd_folder: Path, capsys) -> None:
    config = recipe_file(tmp_path, {"kind": "folder", "root": str(odd_folder)})
    assert main(["check-data", "--config", str(config)]) == 0
    out = tmp_path / "run" / "check-data"  # the default: next to the recipe's run
    assert f"in {out}:" in capsys.readouterr().out

    rows = list(csv.DictReader((out / "class_distribution.csv").open()))
    table = {(r["split"], r["class_name"]): r for r in rows}
    # train: img0, img1 are 24x32 with four 8-px bands 0, 1, 2, ignore; img2 is 30x40 with
    # 10-px bands 0, 1, 1, ignore. val: one 24x32 image.
    assert table["train", "background"]["pixels"] == str(2 * 192 + 300)
    assert table["train", "road"]["pixels"] == str(2 * 192 + 600)
    assert table["train", "car"]["pixels"] == str(2 * 192)
    assert table["train", "car"]["images"] == "2"
    assert table["train", "ignored"]["pixels"] == str(2 * 192 + 300)
    assert table["train", "road"]["color"] == "#804080"
    assert table["val", "car"]["fraction"] == f"{1 / 3:.6f}"

    report = (out / "report.md").read_text()
    assert "| train | 3 | 3 | 2 | 24 / 24 / 30 | 32 / 32 / 40 | 24x32 (2), 30x40 (1) |" in report
    assert "| 1 | road | `#804080` | 984 | 47.95 | 3 |" in report

    with Image.open(out / "samples.png") as png:
        pixels = np.asarray(png.convert("RGB"))
    bottom = the_legend(pixels, FOLDER_NAMES, FOLDER_COLOURS, 255)
    assert np.array_equal(pixels[-bottom.shape[0] :], bottom)
    # The masks in the folder's own colours, ignored pixels white (nearest: exact colours).
    assert {(128, 64, 128), (0, 0, 142), (255, 255, 255)} <= colours_in(pixels[: -bottom.shape[0]])


def test_check_data_reports_what_it_could_read(tmp_path: Path, folder_root: Path, capsys) -> None:
    (folder_root / "images" / "train" / "img1.jpg").write_bytes(b"not a jpeg")
    config = recipe_file(tmp_path, {"kind": "folder", "root": str(folder_root)})
    out = tmp_path / "report"
    assert main(["check-data", "--config", str(config), "--out", str(out)]) == 1
    assert "img1.jpg" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["splits"]["train"]["samples"] == 3 and summary["splits"]["train"]["read"] == 2


def test_nothing_readable_writes_no_report(tmp_path: Path, folder_root: Path, capsys) -> None:
    for path in (folder_root / "images").rglob("*.jpg"):
        path.write_bytes(b"broken")
    config = recipe_file(tmp_path, {"kind": "folder", "root": str(folder_root)})
    assert main(["check-data", "--config", str(config), "--out", str(tmp_path / "r")]) == 1
    assert "no data report written" in capsys.readouterr().out
    assert not (tmp_path / "r").exists()
    with pytest.raises(ValueError, match="nothing to report"):
        DataSurvey().write(tmp_path / "r")


def test_size_statistics() -> None:
    stats = size_statistics([(10, 20), (30, 20), (20, 40), (10, 20)])
    assert stats["height"] == {"min": 10, "median": 15.0, "max": 30}
    assert stats["width"] == {"min": 20, "median": 20.0, "max": 40}
    assert stats["distinct"] == 3 and stats["most_common"][0] == ["10x20", 2]
    assert size_statistics([])["count"] == 0

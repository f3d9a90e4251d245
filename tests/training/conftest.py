"""Tiny datasets written with PIL in the exact on-disk layouts the readers expect.

Every fixture returns the dataset root; the label content is chosen so tests can assert the
exact mapping (Cityscapes labelIds → train ids, VOC palette indices, folder colours).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tests.k8s import background_build
from training.checkpoint import save_checkpoint
from training.config import Recipe
from training.datasets import dataset_info, voc_palette
from training.model import build_model
from training.resolve import build_metadata, resolve_preprocess_spec

H, W = 24, 32
REPO = Path(__file__).resolve().parents[2]


def torchrun_train(recipe: dict[str, Any], tmp: Path) -> tuple[Path, subprocess.CompletedProcess]:
    """Train ``recipe`` on 2 CPU ranks (torchrun, one thread each) into ``tmp/run``; the run
    must succeed. Returns the run dir and the finished process (its stdout holds both ranks')."""
    config = tmp / "recipe.yaml"
    config.write_text(yaml.safe_dump(recipe))
    run_dir = tmp / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "training", "train", "--config", str(config), "--run-dir", str(run_dir),
    ]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run_dir, proc


@pytest.fixture(scope="session", autouse=True)
def _image_builds_overlap_training() -> None:
    """The image tests' builds run beside these CPU-bound tests (tests/k8s/background_build)."""
    background_build.start()


@pytest.fixture(autouse=True)
def _one_thread():
    """The machine is shared: keep every test on one CPU thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def write_rgb(path: Path, seed: int, size: tuple[int, int] = (H, W), fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(rgb, mode="RGB").save(path, format=fmt)


def write_index(path: Path, values: np.ndarray, palette: list[int] | None = None) -> None:
    """Single-channel mask: mode P with ``palette`` when given, otherwise mode L."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(values.astype(np.uint8), mode="P" if palette else "L")
    if palette:
        img.putpalette(palette)
    img.save(path)


def bands(values: list[int], size: tuple[int, int] = (H, W)) -> np.ndarray:
    """A mask of vertical bands, one per value, so every value is present."""
    cols = np.array_split(np.arange(size[1]), len(values))
    mask = np.zeros(size, dtype=np.int64)
    for value, c in zip(values, cols, strict=True):
        mask[:, c] = value
    return mask


# Cityscapes labelIds in the fixture and the train ids they must become.
CITYSCAPES_LABEL_IDS = [7, 26, 0, 23, 1, 33, 9]
CITYSCAPES_TRAIN_IDS = [0, 13, 255, 10, 255, 18, 255]


@pytest.fixture
def cityscapes_root(tmp_path: Path) -> Path:
    """``leftImg8bit/<split>/<city>/`` + ``gtFine/<split>/<city>/``: 2 train, 1 val image."""
    root = tmp_path / "cityscapes"
    for split, city, n in (("train", "aachen", 2), ("val", "lindau", 1)):
        for i in range(n):
            stem = f"{city}_{i:06d}_000019"
            write_rgb(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", seed=i)
            gt = root / "gtFine" / split / city
            write_index(gt / f"{stem}_gtFine_labelIds.png", bands(CITYSCAPES_LABEL_IDS))
            # The colour and instance files sit next to labelIds and must be ignored.
            write_rgb(gt / f"{stem}_gtFine_color.png", seed=99)
    return root


# Palette indices used in the VOC fixture (255 = the void border).
VOC_INDICES = [0, 15, 255, 20, 1]


@pytest.fixture
def voc_root(tmp_path: Path) -> Path:
    """``VOCdevkit/VOC2012`` with JPEGImages, palette SegmentationClass PNGs, split lists.

    Returns the ``VOCdevkit`` folder (the parent form the reader must accept).
    """
    base = tmp_path / "VOCdevkit" / "VOC2012"
    flat = [c for rgb in voc_palette(256) for c in rgb]
    ids = {"train": ["2007_000032", "2007_000039"], "val": ["2007_000063"]}
    for split, names in ids.items():
        for i, name in enumerate(names):
            write_rgb(base / "JPEGImages" / f"{name}.jpg", seed=i, fmt="JPEG")
            write_index(base / "SegmentationClass" / f"{name}.png", bands(VOC_INDICES), flat)
        listing = base / "ImageSets" / "Segmentation" / f"{split}.txt"
        listing.parent.mkdir(parents=True, exist_ok=True)
        listing.write_text("\n".join(names) + "\n")
    return tmp_path / "VOCdevkit"


FOLDER_NAMES = ["background", "road", "car"]
FOLDER_COLOURS = [[0, 0, 0], [128, 64, 128], [0, 0, 142]]


@pytest.fixture
def folder_root(tmp_path: Path) -> Path:
    """``images/<split>/*`` + ``masks/<split>/*.png`` + ``classes.yaml`` (index masks, ignore 9)."""
    root = tmp_path / "folder"
    (root).mkdir()
    (root / "classes.yaml").write_text(
        "names: [background, road, car]\n"
        "colors: [[0, 0, 0], [128, 64, 128], [0, 0, 142]]\n"
        "ignore_index: 9\n"
    )
    for split, n in (("train", 3), ("val", 1)):
        for i in range(n):
            write_rgb(root / "images" / split / f"img{i}.jpg", seed=i, fmt="JPEG")
            write_index(root / "masks" / split / f"img{i}.png", bands([0, 1, 2, 9]))
    return root


def write_untrained_checkpoint(
    recipe: Recipe, run_dir: Path, seed: int = 0, metrics: dict | None = None
) -> Path:
    """``run_dir/checkpoints/best.pt`` of a randomly initialised model for ``recipe``.

    The run folder evaluate/export/predict read, without spending test time on training.
    """
    torch.manual_seed(seed)
    info = dataset_info(recipe.data)
    state = {
        "model": build_model(recipe.model, info.num_classes).state_dict(),
        "epoch": 1,
        "recipe": recipe.to_dict(),
        "metadata": build_metadata(
            recipe, info, resolve_preprocess_spec(recipe), metrics, None
        ).to_dict(),
        "metrics": {},
    }
    path = run_dir / "checkpoints" / "best.pt"
    save_checkpoint(path, state)
    return path

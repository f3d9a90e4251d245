"""data.rare_repeat: repeat-factor sampling of the images that hold rare classes."""

from __future__ import annotations

import io
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from training.class_weights import class_presence
from training.config import ConfigError, recipe_from_dict
from training.repeat_factor import repeat_factors, repeated_indices


def test_factors_follow_the_lvis_formula() -> None:
    # class 0 everywhere, class 1 in 2 of 8 images, class 2 in 1 of 8, class 3 nowhere.
    presence = np.zeros((8, 4), dtype=bool)
    presence[:, 0] = True
    presence[[0, 1], 1] = True
    presence[1, 2] = True
    factors = repeat_factors(presence, threshold=0.5)
    assert factors[0] == pytest.approx(np.sqrt(0.5 / 0.25))
    assert factors[1] == pytest.approx(2.0)  # the rarest class it holds: sqrt(0.5 / 0.125)
    assert factors[2:].tolist() == [1.0] * 6  # only common classes: shown once
    # A threshold at or below every class's image fraction changes nothing.
    assert repeat_factors(presence, threshold=0.125).tolist() == [1.0] * 8


@pytest.mark.parametrize("threshold", [0.0, -0.1, 1.5])
def test_a_threshold_outside_0_1_is_refused(threshold: float) -> None:
    with pytest.raises(ValueError, match=r"data.rare_repeat: a fraction of images in \(0, 1\]"):
        repeat_factors(np.ones((2, 2), dtype=bool), threshold)


def test_indices_repeat_each_image_its_factor_on_average_and_are_seeded() -> None:
    factors = np.array([1.0, 1.5, 3.0, 2.25] * 500)
    indices = repeated_indices(factors, seed=3)
    assert indices == repeated_indices(factors, seed=3)
    assert indices != repeated_indices(factors, seed=4)
    counts = np.bincount(indices, minlength=len(factors))
    assert counts[0::4].tolist() == [1] * 500 and counts[2::4].tolist() == [3] * 500
    assert set(counts[1::4]) == {1, 2} and abs(counts[1::4].mean() - 1.5) < 0.1
    assert set(counts[3::4]) == {2, 3} and abs(counts[3::4].mean() - 2.25) < 0.1


def test_recipe_validation() -> None:
    assert recipe_from_dict({"data": {"rare_repeat": 0.3}}).data.rare_repeat == 0.3
    with pytest.raises(ConfigError, match=r"data.rare_repeat: a fraction .* got 2"):
        recipe_from_dict({"data": {"rare_repeat": 2}})


def test_a_run_shows_the_rare_class_images_more_often(tmp_path: Path, capsys) -> None:
    """A tiny real run on imbalanced scenes: the beacon's images come round more than once."""
    from training.train import Runtime, make_loaders, resolve_preprocess_spec, train

    recipe = recipe_from_dict(
        {
            "seed": 2,
            "data": {
                "input_size": [64, 64],
                "batch_size": 4,
                "rare_repeat": 0.5,
                "synthetic": {"num_train": 40, "num_val": 4, "image_size": [64, 64], "seed": 3,
                              "mode": "imbalanced"},
            },
            "model": {"kwargs": {"encoder_depth": 3, "decoder_channels": [16, 8, 8]}},
            "loss": {"class_weights": "median_frequency"},
            "train": {"epochs": 1, "amp": "off", "threads": 1, "progress": False},
        }
    )  # fmt: skip
    rt = Runtime(rank=0, world_size=1, device=torch.device("cpu"))
    loader, _ = make_loaders(recipe, resolve_preprocess_spec(recipe), rt)
    base = loader.dataset.dataset
    presence = class_presence(base, base.info.num_classes, base.info.ignore_index)
    beacon = base.info.class_names.index("beacon")
    with_beacon = np.flatnonzero(presence[:, beacon])
    assert 0 < len(with_beacon) < 0.2 * len(base)  # rare, as the generator makes it
    shown = Counter(loader.dataset.indices)
    assert all(shown[i] >= 2 for i in with_beacon)  # sqrt(0.5 / f) > 2 for f < 1/8
    assert min(shown.values()) == 1 and sorted(shown) == list(range(len(base)))

    train(recipe, tmp_path / "run")
    assert f"data.rare_repeat=0.5: {len(loader.dataset)} training samples per epoch from 40" \
        in capsys.readouterr().out  # fmt: skip
    # Class weights count the masks as the epoch shows them (repeats included).
    report = json.loads((tmp_path / "run" / "class_weights.json").read_text())
    assert report["num_images"] == len(loader.dataset)


def test_the_epoch_length_line_is_one_write(monkeypatch) -> None:
    """torchrun's ranks share stdout: print() writes its text and its newline separately, and
    two ranks' lines ran together (seen once in the DDP test), so the line is a single write."""
    from training.datasets import build_dataset
    from training.resolve import resolve_preprocess_spec
    from training.train import rare_repeated

    recipe = recipe_from_dict(
        {"data": {"input_size": [32, 32], "synthetic": {
            "num_train": 8, "num_val": 2, "image_size": [32, 32], "mode": "imbalanced"}}}
    )  # fmt: skip
    dataset = build_dataset(recipe.data, "train", resolve_preprocess_spec(recipe), train=True)
    writes: list[str] = []

    class Recorder(io.StringIO):
        def write(self, text: str) -> int:
            writes.append(text)
            return len(text)

    monkeypatch.setattr(sys, "stdout", Recorder())
    rare_repeated(dataset, 0.5, seed=0)
    assert len(writes) == 1 and writes[0].startswith("data.rare_repeat=0.5: ")
    assert writes[0].endswith(" images\n")

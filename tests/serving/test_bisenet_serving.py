"""A BiSeNetV2 run through the whole path: train -> export_run -> .mar -> a real TorchServe.

Under the ``pad`` policy the handler feeds each image at its native resolution, padded to the
metadata's size divisor (BiSeNetV2's stride, 32), so odd sizes exercise that padding; every
served mask must equal the offline predictor's bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from serving.archive import ArchiveOptions, build_archive
from serving.server import stop
from training.config import recipe_from_dict
from training.export import export_run
from training.synthetic import generate_scene
from training.train import train

from .conftest import Reference

pytestmark = [pytest.mark.serving, pytest.mark.slow]

SIZES = [(64, 64), (33, 97), (120, 40), (211, 157)]
RECIPE = {
    "seed": 1,
    "data": {
        "input_size": [64, 64],
        "resize_policy": "pad",
        "batch_size": 4,
        "synthetic": {"num_train": 32, "num_val": 2, "image_size": [64, 64]},
    },
    "model": {
        "arch": "BiSeNetV2",
        "kwargs": {"width": 0.5, "head_channels": 64, "aux_channels": 32},
    },
    "optim": {"lr": 0.003},
    # ~10 s; enough to predict more than the background on scenes (an untrained model, or 2
    # epochs, answers one constant class, which would make the comparison vacuous)
    "train": {"epochs": 5, "amp": "off", "threads": 1, "progress": False},
    "export": {"drift_reference_images": 2},
}


@pytest.fixture(scope="module")
def bisenet_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("bisenet") / "run"
    train(recipe_from_dict(RECIPE), run_dir)
    export_run(run_dir)
    return run_dir / "export"


def test_a_served_bisenet_run_masks_like_offline_predict(
    bisenet_export, tmp_path, torchserve_factory, helpers
):
    store = tmp_path / "store"
    build_archive(bisenet_export, store, ArchiveOptions(model_name="bisenet", batch_size=1))
    reference = Reference(bisenet_export)
    assert reference.meta.architecture == "BiSeNetV2"
    assert reference.meta.preprocess.size_divisor == 32
    # unseen scenes (the training split is the generator's seed 0)
    images = [generate_scene(5, i, size)[0] for i, size in enumerate(SIZES)]
    expected = reference.predict(images)
    info = torchserve_factory(store, {"load_models": "bisenet=bisenet.mar"})
    try:
        classes = set()
        for image, want in zip(images, expected, strict=True):
            response = helpers.rest_predict(info, helpers.png_bytes(image), model="bisenet")
            assert response.status_code == 200, response.text
            got = helpers.decode_png(response.content)
            assert got.shape == image.shape[:2]
            np.testing.assert_array_equal(got, want)
            classes |= set(np.unique(got).tolist())
        assert len(classes) >= 2  # not two constant masks
    finally:
        stop(info.workdir)

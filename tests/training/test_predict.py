"""The offline predictor on a real exported (TorchScript) tiny model."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from handler.preprocessing import prepare_image, rgb_array_to_tensor
from training.checkpoint import load_checkpoint
from training.config import recipe_from_dict
from training.export import ExportError, export_run
from training.model import model_from_checkpoint
from training.predict import PredictError, Predictor

from .conftest import write_untrained_checkpoint

NUM_CLASSES = 6  # the synthetic dataset's


def exported_run(root: Path, resize_policy: str = "resize") -> Path:
    """Export a random tiny Unet (checkpoint in the documented format) and return the run."""
    recipe = recipe_from_dict(
        {
            "data": {
                "input_size": [64, 64],
                "resize_policy": resize_policy,
                "synthetic": {"num_train": 1, "num_val": 2, "image_size": [48, 64]},
            },
            "model": {"kwargs": {"encoder_depth": 3, "decoder_channels": [32, 16, 8]}},
        }
    )
    write_untrained_checkpoint(recipe, root / "run", seed=1)
    export_run(root / "run")
    return root / "run"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    return exported_run(tmp_path_factory.mktemp("predict"))


def random_image(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # Smooth blobs, not noise: more like a photo, so classes vary across the image.
    small = rng.integers(0, 256, (max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
    return np.array(Image.fromarray(small).resize((w, h), Image.BILINEAR))


def test_predict_odd_size_returns_mask_at_that_size(run_dir: Path) -> None:
    predictor = Predictor.from_export(run_dir / "export")
    assert predictor.class_names[1] == "disc"
    mask, confidence = predictor.predict(random_image(37, 53, seed=0))
    assert mask.shape == confidence.shape == (37, 53)
    assert mask.dtype == np.uint8 and confidence.dtype == np.float32
    assert 0 <= mask.min() and mask.max() < NUM_CLASSES
    assert len(np.unique(mask)) > 1  # not a constant answer
    assert np.all(confidence >= 1 / NUM_CLASSES - 1e-6) and np.all(confidence <= 1 + 1e-6)


def test_predict_matches_the_eager_checkpoint(run_dir: Path) -> None:
    predictor = Predictor.from_export(run_dir / "export")
    eager = model_from_checkpoint(load_checkpoint(run_dir / "checkpoints" / "best.pt"))
    rgb = random_image(50, 90, seed=3)
    x, _ = prepare_image(rgb_array_to_tensor(rgb), predictor.spec)
    with torch.no_grad():
        logits = F.interpolate(eager(x[None]), size=(50, 90), mode="bilinear")
    probs = logits.softmax(1)[0]
    mask, confidence = predictor.predict(rgb)
    assert np.array_equal(mask, probs.argmax(0).numpy())
    np.testing.assert_allclose(confidence, probs.max(0).values.numpy(), atol=1e-4)


@pytest.mark.parametrize("policy", ["resize", "pad"])
def test_predict_batch_of_mixed_sizes_equals_one_by_one(
    run_dir: Path, tmp_path: Path, policy: str
) -> None:
    export_dir = (run_dir if policy == "resize" else exported_run(tmp_path, "pad")) / "export"
    predictor = Predictor.from_export(export_dir)
    assert predictor.spec.resize_policy == policy
    images = [random_image(h, w, seed=i) for i, (h, w) in enumerate([(37, 53), (64, 64), (70, 20)])]
    batched = predictor.predict_batch(images)
    for image, (mask, confidence) in zip(images, batched, strict=True):
        single_mask, single_confidence = predictor.predict(image)
        assert mask.shape == image.shape[:2]
        assert np.array_equal(mask, single_mask)
        np.testing.assert_allclose(confidence, single_confidence, rtol=0, atol=1e-6)


def test_predict_file_decodes_like_the_handler(run_dir: Path, tmp_path: Path) -> None:
    predictor = Predictor.from_export(run_dir / "export")
    rgb = random_image(45, 61, seed=5)
    png = tmp_path / "a.png"
    Image.fromarray(rgb).save(png)
    mask, confidence = predictor.predict_file(png)
    expected_mask, expected_confidence = predictor.predict(rgb)
    assert np.array_equal(mask, expected_mask)
    assert np.array_equal(confidence, expected_confidence)

    # A phone photo stored landscape with EXIF "rotate 90": segmented as displayed (portrait).
    jpeg = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rgb).save(jpeg, format="JPEG", exif=exif.tobytes())
    rotated_mask, _ = predictor.predict_file(jpeg)
    assert rotated_mask.shape == (61, 45)


def test_bad_inputs_name_the_problem(run_dir: Path, tmp_path: Path) -> None:
    predictor = Predictor.from_export(run_dir / "export")
    text = tmp_path / "notes.png"
    text.write_text("hello")
    with pytest.raises(PredictError, match=r"notes\.png: .*text, not image bytes"):
        predictor.predict_file(text)
    with pytest.raises(PredictError, match=r"missing\.png: cannot read"):
        predictor.predict_file(tmp_path / "missing.png")
    with pytest.raises(PredictError, match="uint8"):
        predictor.predict(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(PredictError, match=r"\(H, W, 3\)"):
        predictor.predict(np.zeros((8, 8), np.uint8))
    small = Predictor.from_export(run_dir / "export", max_pixels=100)
    with pytest.raises(PredictError, match="above the limit"):
        buf = io.BytesIO()
        Image.fromarray(random_image(20, 20, 0)).save(buf, format="PNG")
        (tmp_path / "big.png").write_bytes(buf.getvalue())
        small.predict_file(tmp_path / "big.png")
    with pytest.raises(ExportError, match="export the model first"):
        Predictor.from_export(tmp_path / "no_export")
    assert predictor.predict_batch([]) == []


def test_a_runtime_the_export_lacks_says_how_to_export_it(run_dir: Path) -> None:
    with pytest.raises(PredictError, match="export has no model.int8.onnx: re-export with "):
        Predictor.from_export(run_dir / "export", runtime="onnx_int8")
    with pytest.raises(PredictError, match="runtime 'tensorrt' is not one of"):
        Predictor.from_export(run_dir / "export", runtime="tensorrt")
    assert Predictor.from_export(run_dir / "export", runtime="torchscript").runtime == "torchscript"

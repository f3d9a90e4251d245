"""The offline predictor on a real exported (TorchScript) tiny model."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from handler.imaging import encode_overlay
from handler.preprocessing import prepare_image, rgb_array_to_tensor
from training.checkpoint import load_checkpoint
from training.cli import main
from training.config import recipe_from_dict
from training.export import ExportError, export_run
from training.inference import InferenceOptions, segment_with_options
from training.model import model_from_checkpoint
from training.predict import PredictError, Predictor, list_images, write_predictions

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


@pytest.fixture
def photo_folder(tmp_path: Path) -> Path:
    """Two images of different sizes and formats, plus a file that is not an image."""
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(random_image(45, 61, seed=7)).save(folder / "a.png")
    Image.fromarray(random_image(30, 80, seed=8)).save(folder / "b.jpg", quality=95)
    (folder / "notes.txt").write_text("not an image")
    (folder / "nested").mkdir()
    return folder


def test_predict_a_folder_writes_the_served_mask_and_overlay(
    run_dir: Path, photo_folder: Path, tmp_path: Path
) -> None:
    predictor = Predictor.from_export(run_dir / "export")
    images = list_images([photo_folder])
    assert [p.name for p in images] == ["a.png", "b.jpg"]
    written = write_predictions(predictor, images, tmp_path / "out")
    palette = predictor.metadata.palette
    for done in written:
        want_mask, want_confidence = predictor.predict_file(done.source)  # the served reference
        with Image.open(done.mask) as png:
            assert png.mode == "P" and png.getpalette()[: 3 * NUM_CLASSES] == [
                c for rgb in palette for c in rgb
            ]
            assert np.array_equal(np.asarray(png), want_mask)  # bit for bit
        rgb = predictor.read_image(done.source)
        assert done.overlay.read_bytes() == encode_overlay(rgb, want_mask, palette, "PNG")
        assert done.mean_confidence == pytest.approx(float(want_confidence.mean()))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "a.png", "a_overlay.png", "b.png", "b_overlay.png"
    ]  # fmt: skip


def test_predict_with_tta_is_opt_in_and_separate(run_dir: Path, photo_folder: Path, tmp_path):
    predictor = Predictor.from_export(run_dir / "export")
    options = InferenceOptions(flip=True, scales=(0.75, 1.0))
    image = photo_folder / "a.png"
    (done,) = write_predictions(predictor, [image], tmp_path / "tta", options)
    rgb = predictor.read_image(image)
    want, _ = segment_with_options(predictor.model, [rgb], predictor.spec, options)[0]
    with Image.open(done.mask) as png:
        tta_mask = np.asarray(png)
    assert np.array_equal(tta_mask, want)
    assert not np.array_equal(tta_mask, predictor.predict(rgb)[0])  # really another path


def test_predict_inputs_and_outputs_that_cannot_work(
    run_dir: Path, photo_folder: Path, tmp_path: Path
) -> None:
    predictor = Predictor.from_export(run_dir / "export")
    with pytest.raises(PredictError, match=r"missing: no such file or folder; check --input"):
        list_images([tmp_path / "missing"])
    with pytest.raises(PredictError, match=r"nested: no image files .*subfolders"):
        list_images([photo_folder / "nested"])
    Image.fromarray(random_image(8, 8, 0)).save(photo_folder / "a.jpg")
    with pytest.raises(
        PredictError, match=r"a\.png: its output a\.png would overwrite that of .*a\.jpg"
    ):
        write_predictions(predictor, list_images([photo_folder]), tmp_path / "out")
    with pytest.raises(PredictError, match="--out is the input folder itself"):
        write_predictions(predictor, [photo_folder / "b.jpg"], photo_folder)


def test_predict_cli_on_a_run_folder(run_dir: Path, photo_folder: Path, tmp_path: Path, capsys):
    out = tmp_path / "preds"
    code = main(["predict", "--run-dir", str(run_dir), "--input", str(photo_folder),
                 "--input", str(photo_folder / "b.jpg"), "--out", str(tmp_path / "x")])  # fmt: skip
    assert code == 2  # b.jpg twice: its outputs would collide
    assert "would overwrite" in capsys.readouterr().err
    assert main(["predict", "--run-dir", str(run_dir), "--input", str(photo_folder),
                 "--out", str(out)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert f"{photo_folder / 'a.png'} -> {out / 'a.png'} + a_overlay.png" in printed
    with Image.open(out / "b.png") as png:
        mask = np.asarray(png)
    assert np.array_equal(mask, Predictor.from_export(run_dir / "export").predict_file(
        photo_folder / "b.jpg")[0])  # fmt: skip
    assert main(["predict", "--input", str(photo_folder), "--out", str(out)]) == 2
    assert "either --run-dir RUN_DIR or --export-dir" in capsys.readouterr().err
    assert main(["predict", "--run-dir", str(run_dir), "--input", str(photo_folder),
                 "--out", str(out), "--window", "50x50"]) == 2  # fmt: skip
    assert "--window 50x50: each side must be a multiple of 32" in capsys.readouterr().err
    assert main(["predict", "--run-dir", str(run_dir), "--input", str(photo_folder),
                 "--out", str(out), "--threads", "0"]) == 2  # fmt: skip
    assert "--threads 0: give 1 or more" in capsys.readouterr().err


def test_predict_cli_threads_sets_torchs_threads(run_dir, photo_folder, tmp_path):
    """--threads N: what a served worker of N threads computes (on AVX-512 CPUs the forward's
    sums depend on the thread count: 14 of 40 M pixels of a mask differed, 1 vs 2 threads)."""
    import torch

    before = torch.get_num_threads()
    try:
        assert main(["predict", "--run-dir", str(run_dir), "--input", str(photo_folder),
                     "--out", str(tmp_path / "one"), "--threads", "1"]) == 0  # fmt: skip
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with Image.open(tmp_path / "one" / "b.png") as png:
        assert png.size == Image.open(photo_folder / "b.jpg").size

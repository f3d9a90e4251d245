"""training/bisenet.py: BiSeNetV2 as a recipe's model.arch: shapes, booster heads, recipe checks,
learning the embedded data, export with parity."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from handler.artifact import parse_metadata
from handler.preprocessing import collate, logits_to_prediction, prepare_image, rgb_array_to_tensor
from training.bisenet import OUTPUT_STRIDE, BiSeNetV2
from training.checkpoint import load_checkpoint
from training.config import ConfigError, ModelConfig, apply_overrides, recipe_from_dict
from training.datasets import build_dataset, dataset_info
from training.export import export_run, load_exported
from training.losses import TrainingLoss, build_loss
from training.metrics import ConfusionMatrix
from training.model import architectures, build_model, model_from_checkpoint, output_stride
from training.resolve import resolve_preprocess_spec
from training.train import train

from .conftest import write_untrained_checkpoint

SMALL = {"width": 0.25, "head_channels": 16, "aux_channels": 8}

# Trains in ~30 s on one CPU thread: 64 scenes of 64 px, a half-width BiSeNetV2, 12 epochs.
LEARNS: dict[str, Any] = {
    "seed": 0,
    "data": {
        "input_size": [64, 64],
        "batch_size": 4,
        "synthetic": {"num_train": 64, "num_val": 32, "image_size": [64, 64]},
    },
    "model": {
        "arch": "BiSeNetV2",
        "kwargs": {"width": 0.5, "head_channels": 64, "aux_channels": 32},
    },
    "optim": {"lr": 0.003},
    "train": {"epochs": 12, "amp": "off", "threads": 1, "progress": False},
}


def small(num_classes: int = 5) -> BiSeNetV2:
    torch.manual_seed(0)
    return BiSeNetV2(num_classes, **SMALL)


def test_odd_sizes_after_padding_come_back_at_their_own_size() -> None:
    """The serving path (pad policy: native resolution, padded to the size divisor, cropped
    back) gives a mask of each image's own odd size, and logits at the padded size."""
    recipe = recipe_from_dict({"model": {"arch": "BiSeNetV2"}, "data": {"resize_policy": "pad"}})
    spec = resolve_preprocess_spec(recipe)
    assert spec.size_divisor == OUTPUT_STRIDE == 32
    model = small().eval()
    rng = np.random.default_rng(0)
    for h, w in [(37, 53), (64, 100), (1, 1), (97, 33)]:
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        x, geometry = prepare_image(rgb_array_to_tensor(rgb), spec)
        batch = collate([x], spec)
        assert batch.shape[2] % 32 == 0 and batch.shape[3] % 32 == 0
        assert batch.shape[2] - h < 32 and batch.shape[3] - w < 32
        with torch.no_grad():
            logits = model(batch)
        assert logits.shape == (1, 5, *batch.shape[2:])
        mask, confidence = logits_to_prediction(logits[0], geometry)
        assert mask.shape == confidence.shape == (h, w)


def test_the_stride_is_why_inputs_are_padded() -> None:
    """48 px is a multiple of 16 but not of 32: the 1/32 semantic map no longer lines up with
    the 1/8 detail map, so the metadata's size divisor must be 32."""
    model = small().eval()
    with torch.no_grad(), pytest.raises(RuntimeError, match="must match the size"):
        model(torch.zeros(1, 3, 48, 48))
    assert output_stride(ModelConfig(arch="BiSeNetV2")) == 32


def test_booster_heads_only_in_training_mode() -> None:
    model = small(num_classes=3)
    x = torch.randn(2, 3, 64, 96)
    logits, aux = model.train()(x)
    assert logits.shape == (2, 3, 64, 96)
    assert len(aux) == 4 and all(a.shape == (2, 3, 64, 96) for a in aux)
    # The booster is trained: its heads get gradients through the training loss.
    label = build_loss(recipe_from_dict({}).loss, num_classes=3, ignore_index=255)
    target = torch.randint(0, 3, (2, 64, 96))
    TrainingLoss(label, aux_weight=1.0)((logits, aux), target).backward()
    assert all(p.grad is not None for p in model.aux_heads.parameters())
    out = model.eval()(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3, 64, 96)
    # Raw logits, not probabilities.
    assert not torch.allclose(out.softmax(1).sum(1), out.sum(1))


def test_a_booster_weight_scales_the_auxiliary_terms() -> None:
    label = build_loss(recipe_from_dict({}).loss, num_classes=3, ignore_index=255)
    logits, aux = torch.randn(1, 3, 8, 8), [torch.randn(1, 3, 8, 8) for _ in range(2)]
    target = torch.randint(0, 3, (1, 8, 8))
    plain = label(logits, target)
    expected = plain + 0.4 * (label(aux[0], target) + label(aux[1], target))
    assert torch.allclose(TrainingLoss(label, aux_weight=0.4)((logits, aux), target), expected)
    assert torch.equal(TrainingLoss(label, aux_weight=0.0)((logits, aux), target), plain)


def test_it_is_a_model_arch_next_to_smps() -> None:
    assert "BiSeNetV2" in architectures() and "Unet" in architectures()
    model = build_model(ModelConfig(arch="bisenetv2", kwargs=SMALL), num_classes=4)
    assert isinstance(model, BiSeNetV2)
    narrow = build_model(ModelConfig(arch="BiSeNetV2", kwargs={"width": 0.5}), 4)
    wide = build_model(ModelConfig(arch="BiSeNetV2"), 4)
    count = lambda m: sum(p.numel() for p in m.detail.parameters())  # noqa: E731
    assert count(narrow) < count(wide) / 3  # channels halved: ~1/4 of the weights


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"encoder": "mobilenet_v2"}, r"model.encoder: 'mobilenet_v2' does not apply to BiSeNetV2"),
        ({"encoder_weights": "imagenet"}, r"model.encoder_weights: BiSeNetV2 has no pretrained"),
        ({"kwargs": {"widht": 0.5}}, r"model.kwargs.widht: BiSeNetV2 takes no such argument; "
                                     r"allowed: \['aux_channels', 'expansion', 'head_channels'"),
        ({"kwargs": {"classes": 3}}, r"model.kwargs.classes: set by segserve itself"),
        ({"kwargs": {"width": -1}}, r"model.kwargs: cannot build BiSeNetV2 .* width must be > 0"),
        ({"kwargs": {"head_channels": 0.5}}, r"head_channels must be an integer >= 1"),
    ],
)  # fmt: skip
def test_what_does_not_apply_is_refused_with_the_key(model: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_model(ModelConfig(arch="BiSeNetV2", **model), num_classes=3)


def test_recipe_rules_for_the_booster() -> None:
    assert recipe_from_dict({"model": {"arch": "BiSeNetV2"}}).loss.aux_weight is None
    assert recipe_from_dict(
        {"model": {"arch": "BiSeNetV2"}, "loss": {"aux_weight": 0.4}}
    ).loss.aux_weight == pytest.approx(0.4)
    with pytest.raises(ConfigError, match="loss.aux_weight: only BiSeNetV2 has auxiliary heads"):
        recipe_from_dict({"model": {"arch": "Unet"}, "loss": {"aux_weight": 0.4}})
    with pytest.raises(ConfigError, match="loss.aux_weight: must be >= 0"):
        recipe_from_dict({"model": {"arch": "BiSeNetV2"}, "loss": {"aux_weight": -1}})
    # BatchNorm of one pooled value per channel: a batch of 1 cannot train the context block.
    with pytest.raises(ConfigError, match="data.batch_size: BiSeNetV2's context embedding"):
        recipe_from_dict({"model": {"arch": "BiSeNetV2"}, "data": {"batch_size": 1}})


def test_untrained_run_exports_with_parity_and_its_metadata(tmp_path: Path) -> None:
    """export_run on a BiSeNetV2 checkpoint: TorchScript (trace, the default) and ONNX, parity
    at the traced and a non-square extra size, metadata naming the model and its stride."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    recipe = recipe_from_dict(
        {
            "data": {
                "input_size": [64, 64],
                "batch_size": 2,
                "synthetic": {"num_train": 2, "num_val": 2, "image_size": [40, 56]},
            },
            "model": {"arch": "BiSeNetV2", "kwargs": SMALL},
            "export": {"parity_sizes": [[96, 128]], "drift_reference_images": 2},
        }
    )
    run_dir = tmp_path / "run"
    write_untrained_checkpoint(recipe, run_dir, metrics={"miou": 0.1})
    report = export_run(run_dir, runtimes=["torchscript", "onnx"])
    meta = parse_metadata(report["metadata"])
    assert meta.architecture == "BiSeNetV2" and meta.encoder == ""
    assert meta.preprocess.size_divisor == 32
    for runtime in ("torchscript", "onnx"):
        parity = meta.export.runtimes[runtime].parity
        assert parity["argmax_equal"] is True and parity["max_abs_logit_diff"] <= 1e-4
        assert parity["sizes"] == [[64, 64], [96, 128]]
        assert parity["batch_sizes"] == [1, 2]


def test_script_export_passes_parity(tmp_path: Path) -> None:
    """export.method=script compiles the eval path only (the booster branch is skipped)."""
    recipe = recipe_from_dict(
        {
            "data": {"input_size": [64, 64], "synthetic": {"num_train": 1, "num_val": 2}},
            "model": {"arch": "BiSeNetV2", "kwargs": SMALL},
            "export": {"method": "script", "drift_reference_images": 0},
        }
    )
    write_untrained_checkpoint(recipe, tmp_path / "run")
    report = export_run(tmp_path / "run")
    assert report["parity"]["argmax_equal"] is True
    assert report["metadata"]["export"]["method"] == "script"


# --- it learns ------------------------------------------------------------------------------------


def chance_miou(recipe) -> float:
    """The val mIoU of always predicting the most frequent val class (what a model that learned
    nothing but the class prior scores)."""
    spec = resolve_preprocess_spec(recipe)
    dataset = build_dataset(recipe.data, "val", spec, train=False)
    masks = torch.stack(
        [torch.as_tensor(dataset.load_raw(i)[1]).long() for i in range(len(dataset))]
    )
    num_classes = dataset_info(recipe.data).num_classes
    valid = masks[masks != recipe.data.ignore_index]
    majority = int(torch.bincount(valid, minlength=num_classes).argmax())
    cm = ConfusionMatrix(num_classes, recipe.data.ignore_index)
    cm.update(torch.full_like(masks, majority), masks)
    return float(cm.compute()["miou"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    run_dir = tmp_path_factory.mktemp("bisenet") / "run"
    return run_dir, train(apply_overrides(recipe_from_dict(LEARNS), []), run_dir)


@pytest.mark.slow
def test_it_learns_the_embedded_scenes(trained) -> None:
    """Validated on unseen scenes, it must go far past the majority-class score (~0.13).

    Measured: final val mIoU 0.355 / 0.342 / 0.366 / 0.357 for seeds 0-3 (this recipe is seed
    0); a model that learns only the class prior, or a few classes, stays below 0.2.
    """
    run_dir, summary = trained
    chance = chance_miou(recipe_from_dict(LEARNS))
    assert chance < 0.15
    assert summary["best_miou"] > 0.28, (summary["best_miou"], chance)
    ckpt = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    assert ckpt["metadata"]["architecture"] == "BiSeNetV2"
    assert ckpt["metadata"]["preprocess"]["size_divisor"] == 32


@pytest.mark.slow
def test_a_trained_run_rebuilds_and_exports_with_parity(trained) -> None:
    run_dir, _ = trained
    ckpt = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    rebuilt = model_from_checkpoint(ckpt)  # the one builder, from the recipe in the checkpoint
    assert isinstance(rebuilt, BiSeNetV2) and not rebuilt.training
    report = export_run(run_dir)
    assert report["parity"]["argmax_equal"] is True
    module, _ = load_exported(Path(report["model_path"]).parent)  # the serving loader
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(module(x), rebuilt(x), atol=1e-4, rtol=0)

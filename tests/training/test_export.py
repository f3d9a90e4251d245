"""TorchScript/ONNX export with parity enforced on real validation images."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from handler.artifact import parse_metadata
from handler.preprocessing import PreprocessSpec, prepare_image, rgb_array_to_tensor
from training.config import recipe_from_dict
from training.datasets import build_dataset, dataset_info
from training.export import (
    ExportError,
    ParityError,
    check_miou_drop,
    check_parity,
    export_model,
    export_run,
    load_exported,
    parity_sizes,
)
from training.resolve import build_metadata, resolve_preprocess_spec

from .conftest import write_untrained_checkpoint


def tiny_run(
    tmp_path: Path, model: dict | None = None, export: dict | None = None, data: dict | None = None
) -> Path:
    """A run folder with checkpoints/best.pt of a random tiny model on tiny synthetic data."""
    recipe = recipe_from_dict(
        {
            "output_dir": str(tmp_path / "run"),
            "data": {
                "input_size": [64, 64],
                "batch_size": 2,
                "synthetic": {"num_train": 2, "num_val": 3, "image_size": [40, 56]},
                **(data or {}),
            },
            "model": model
            or {"arch": "Unet", "kwargs": {"encoder_depth": 3, "decoder_channels": [32, 16, 8]}},
            "eval": {"boundary_tolerance": 1, "num_overlays": 2},
            "export": export or {"parity_sizes": [[96, 64]]},
        }
    )
    run_dir = tmp_path / "run"
    write_untrained_checkpoint(recipe, run_dir, seed=0, metrics={"miou": 0.1})
    return run_dir


def val_images(run_dir: Path) -> list[np.ndarray]:
    recipe = recipe_from_dict(torch.load(run_dir / "checkpoints" / "best.pt")["recipe"])
    dataset = build_dataset(recipe.data, "val", resolve_preprocess_spec(recipe), train=False)
    return [dataset.load_raw(i)[0] for i in range(len(dataset))]


def test_export_run_writes_torchscript_and_metadata_with_parity(tmp_path: Path, capsys) -> None:
    run_dir = tiny_run(tmp_path)
    report = export_run(run_dir)
    printed = capsys.readouterr().out
    assert "parity torchscript (trace) input (2, 3, 96, 64)" in printed

    meta = json.loads((run_dir / "export" / "metadata.json").read_text())
    parse_metadata(meta)  # the handler accepts it
    assert list(meta["export"]["runtimes"]) == ["torchscript"]  # the default: TorchScript only
    parity = meta["export"]["runtimes"]["torchscript"]["parity"]
    assert meta["export"]["format"] == "torchscript" and meta["export"]["method"] == "trace"
    assert meta["export"]["torch_version"] == torch.__version__.split("+")[0]
    assert parity["sizes"] == [[64, 64], [96, 64]]  # traced + recipe (non-square)
    assert parity["batch_sizes"] == [1, 2]
    assert parity["argmax_equal"] is True
    assert 0 <= parity["max_abs_logit_diff"] <= 1e-4
    assert meta["model_name"] == "segmenter" and meta["model_version"] == "1.0"
    assert meta["source_checkpoint"] == str(run_dir / "checkpoints" / "best.pt")
    assert meta["class_names"][1] == "disc" and len(meta["palette"]) == meta["num_classes"] == 6
    assert report["metadata"] == meta

    module, loaded_meta = load_exported(run_dir / "export")
    assert loaded_meta.to_dict() == meta
    # The exported file reproduces the eager model on a real image at a size never traced.
    from training.checkpoint import load_checkpoint
    from training.model import model_from_checkpoint

    eager = model_from_checkpoint(load_checkpoint(run_dir / "checkpoints" / "best.pt"))
    spec = PreprocessSpec(input_size=(160, 96))
    x = prepare_image(rgb_array_to_tensor(val_images(run_dir)[2]), spec)[0][None]
    with torch.no_grad():
        assert torch.allclose(module(x), eager(x), atol=1e-4)
        assert torch.equal(module(x).argmax(1), eager(x).argmax(1))


def test_embedded_metadata_equals_file_and_a_stale_file_is_refused(tmp_path: Path) -> None:
    run_dir = tiny_run(tmp_path)
    export_run(run_dir)
    path = run_dir / "export" / "metadata.json"
    meta = json.loads(path.read_text())
    meta["class_names"][0] = "renamed"
    path.write_text(json.dumps(meta))
    with pytest.raises(ExportError, match="differs from the metadata embedded"):
        load_exported(run_dir / "export")


def test_script_method_passes_parity(tmp_path: Path) -> None:
    run_dir = tiny_run(tmp_path, export={"method": "script", "parity_sizes": [[32, 96]]})
    meta = export_run(run_dir)["metadata"]
    assert meta["export"]["method"] == "script"
    assert meta["export"]["runtimes"]["torchscript"]["parity"]["sizes"] == [[32, 96], [64, 64]]


def test_segformer_traces_with_parity_at_several_sizes(tmp_path: Path) -> None:
    run_dir = tiny_run(
        tmp_path,
        model={
            "arch": "Segformer",
            "encoder": "mit_b0",
            "kwargs": {"decoder_segmentation_channels": 32},
        },
        export={"parity_sizes": [[96, 96], [32, 128]]},
    )
    report = export_run(run_dir)
    parity = report["parity"]
    assert parity["sizes"] == [[32, 128], [64, 64], [96, 96]]
    assert parity["argmax_equal"] and parity["max_abs_logit_diff"] <= 1e-4
    # smp's Segformer decoder checks a channel count in Python; tracing reports it, parity
    # proves it harmless.
    assert report["tracer_warnings"]
    assert all("might not generalize" in w for w in report["tracer_warnings"])


class SizeDependent(torch.nn.Module):
    """A model with Python control flow on the input size: tracing freezes the branch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if x.shape[-1] > 64:  # e.g. a "large input" path
            y = y.flip(1)
        return y


def test_broken_trace_is_caught_at_another_size(tmp_path: Path) -> None:
    metadata = build_metadata(
        recipe_from_dict({}),
        dataset_info(recipe_from_dict({}).data),
        PreprocessSpec(input_size=(64, 64)),
        None,
        None,
    )
    metadata = replace(metadata, class_names=metadata.class_names[:4], palette=metadata.palette[:4])
    images = val_images(tiny_run(tmp_path))
    with pytest.raises(ParityError, match=r"max \|logit diff\| .* > export.parity_atol .* 128\)"):
        export_model(
            SizeDependent(), metadata, images, tmp_path / "export", extra_sizes=[[64, 128]]
        )
    assert not (tmp_path / "export" / "model.pt").exists()
    # Scripting keeps the branch, so the same model exports fine that way.
    report = export_model(
        SizeDependent(), metadata, images, tmp_path / "export", method="script",
        extra_sizes=[[64, 128]],
    )  # fmt: skip
    assert (tmp_path / "export" / "model.pt").is_file()
    assert report["parity"]["sizes"] == [[64, 64], [64, 128]]


def test_argmax_difference_is_enforced_even_within_atol() -> None:
    torch.manual_seed(0)
    net = torch.nn.Conv2d(3, 3, 1).eval()
    x = torch.randn(1, 3, 32, 32) * 0.01

    def nudged(t: torch.Tensor) -> torch.Tensor:
        out = net(t).clone()
        out[:, 2] = out.max(1).values + 1e-3  # tiny logit change, different winner
        return out

    with pytest.raises(ParityError, match="argmax differs"):
        check_parity(net, nudged, [x], atol=1.0, what="nudged")
    with pytest.raises(ParityError, match="output shape"):
        check_parity(net, lambda t: net(t)[:, :, :16], [x], atol=1.0, what="cropped")


def test_parity_sizes_rule() -> None:
    assert parity_sizes((64, 64), []) == [[64, 64], [32, 64]]
    assert parity_sizes((32, 32), []) == [[32, 32], [32, 64]]
    assert parity_sizes((64, 96), [[64, 96]]) == [[64, 96]]  # already non-square
    with pytest.raises(ExportError, match="multiple of 32"):
        parity_sizes((64, 64), [[50, 64]])


def test_missing_checkpoint_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"best\.pt: no such checkpoint"):
        export_run(tmp_path / "nowhere")


def test_onnx_export_with_dynamic_sizes_passes_parity(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    run_dir = tiny_run(tmp_path)
    report = export_run(run_dir, onnx=True)
    assert Path(report["onnx_path"]).is_file()
    onnx_parity = report["metadata"]["export"]["runtimes"]["onnx"]["parity"]
    assert onnx_parity["sizes"] == [[64, 64], [96, 64]]
    assert onnx_parity["batch_sizes"] == [1, 2]
    assert onnx_parity["max_abs_logit_diff"] <= 1e-4


def test_export_with_every_runtime_has_parity_and_a_measured_int8_miou(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from handler.artifact import RUNTIME_FILES

    export = {
        "runtimes": ["onnx_int8", "onnx", "torchscript"],
        "int8_calibration_images": 2,
        "int8_max_miou_drop": 1.0,  # random weights: measured here, not judged
        "parity_sizes": [[96, 64]],
    }
    run_dir = tiny_run(tmp_path, export=export)
    report = export_run(run_dir)
    export_dir = run_dir / "export"
    meta = json.loads((export_dir / "metadata.json").read_text())
    runtimes = meta["export"]["runtimes"]
    assert list(runtimes) == ["torchscript", "onnx", "onnx_int8"]  # canonical order
    for name, section in runtimes.items():
        assert section["file"] == RUNTIME_FILES[name] and (export_dir / section["file"]).is_file()
        assert section["parity"]["sizes"] == [[64, 64], [96, 64]]
        assert section["parity"]["batch_sizes"] == [1, 2]
    for name in ("torchscript", "onnx"):
        assert runtimes[name]["parity"]["argmax_equal"] is True
        assert runtimes[name]["parity"]["max_abs_logit_diff"] <= 1e-4
    int8 = runtimes["onnx_int8"]
    assert 0 < int8["parity"]["argmax_agreement_min"] <= int8["parity"]["argmax_agreement"] <= 1
    assert int8["parity"]["max_miou_drop"] == 1.0
    for key in ("val_miou", "val_miou_fp32", "miou_drop"):
        assert np.isfinite(int8[key]), key
    assert 0 <= int8["val_miou"] <= 1 and 0 <= int8["val_miou_fp32"] <= 1
    assert int8["miou_drop"] == pytest.approx(int8["val_miou_fp32"] - int8["val_miou"])
    assert report["int8"] == int8 and parse_metadata(meta).export.runtimes["onnx_int8"].passed
    assert not [p.name for p in export_dir.iterdir() if p.name.startswith(".")]  # no staging left

    # A later TorchScript-only export removes the files that would no longer match model.pt.
    export_run(run_dir, runtimes=["torchscript"])
    assert sorted(p.name for p in export_dir.iterdir()) == ["metadata.json", "model.pt"]


def test_runtimes_are_checked_with_the_fix() -> None:
    from training.config import ConfigError

    with pytest.raises(ConfigError, match=r"export.runtimes: 'tensorrt' is not one of"):
        recipe_from_dict({"export": {"runtimes": ["torchscript", "tensorrt"]}})
    with pytest.raises(ConfigError, match="lacks torchscript"):
        recipe_from_dict({"export": {"runtimes": ["onnx"]}})
    with pytest.raises(ConfigError, match="int8_max_miou_drop"):
        recipe_from_dict({"export": {"int8_max_miou_drop": -0.1}})
    assert recipe_from_dict({"export": {"onnx": True}}).export.runtimes is None  # still valid


def test_int8_needs_calibration_and_a_too_large_miou_drop_fails() -> None:
    metadata = build_metadata(
        recipe_from_dict({}),
        dataset_info(recipe_from_dict({}).data),
        PreprocessSpec(input_size=(64, 64)),
        None,
        None,
    )
    with pytest.raises(ExportError, match="onnx_int8 needs calibration images"):
        export_model(
            torch.nn.Conv2d(3, 6, 1), metadata, [], Path("unused"), runtimes=["torchscript",
            "onnx_int8"],
        )  # fmt: skip
    assert check_miou_drop(0.80, 0.78, 0.05) == pytest.approx(0.02)
    assert check_miou_drop(0.80, 0.82, 0.0) == pytest.approx(-0.02)  # INT8 may score higher
    with pytest.raises(ParityError, match=r"drop 0.1000 .* > export.int8_max_miou_drop 0.05"):
        check_miou_drop(0.80, 0.70, 0.05)
    with pytest.raises(ParityError, match="not finite"):
        check_miou_drop(float("nan"), 0.5, 0.05)

"""The artifact contract: metadata validation (the field named) and every field round-tripped."""

from __future__ import annotations

import copy
import json
import re

import pytest

from handler.artifact import MetadataError, load_metadata, parse_metadata


@pytest.fixture
def meta_dict(tiny_export):
    return json.loads((tiny_export / "metadata.json").read_text())


def test_valid_metadata(meta_dict):
    meta = parse_metadata(meta_dict)
    assert meta.num_classes == 4 == len(meta.class_names) == len(meta.palette)
    assert meta.preprocess.input_size == (64, 64)
    assert meta.palette[1] == (128, 64, 128)
    assert meta.serving.cuda_half is False and meta.metrics["miou"] == 0.5


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda d: d.update(num_classes=5), "class_names"),
        (lambda d: d["palette"].pop(), "palette"),
        (lambda d: d["palette"].__setitem__(0, [0, 0, 300]), "palette"),
        (lambda d: d["class_names"].__setitem__(1, "background"), "duplicates"),
        (lambda d: d.pop("preprocess"), "preprocess"),
        (lambda d: d["preprocess"].update(input_size=[60, 64]), "preprocess"),
        (lambda d: d.update(schema_version=2), "schema_version"),
        (lambda d: d.update(num_classes="4"), "num_classes"),
        (lambda d: d.update(serving={"cuda_fp8": True}), "serving"),
    ],
)
def test_inconsistent_metadata_names_the_field(meta_dict, change, field):
    bad = copy.deepcopy(meta_dict)
    change(bad)
    with pytest.raises(MetadataError, match=field):
        parse_metadata(bad)


def test_load_metadata_errors_name_the_file(tmp_path):
    with pytest.raises(MetadataError, match="make export"):
        load_metadata(tmp_path / "metadata.json")
    (tmp_path / "metadata.json").write_text("{not json")
    with pytest.raises(MetadataError, match=str(tmp_path / "metadata.json")):
        load_metadata(tmp_path / "metadata.json")


def full_metadata():
    """Every field set to something other than its default."""
    from handler.artifact import (
        DriftReference,
        ExportInfo,
        ModelMetadata,
        RuntimeExport,
        ServingOptions,
    )
    from handler.preprocessing import PreprocessSpec

    return ModelMetadata(
        model_name="roads",
        model_version="2.3",
        class_names=("background", "road", "car"),
        palette=((0, 0, 0), (128, 64, 128), (0, 0, 142)),
        preprocess=PreprocessSpec(
            input_size=(96, 160), resize_policy="pad", mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2)
        ),
        ignore_index=7,
        architecture="FPN",
        encoder="resnet34",
        encoder_weights="imagenet",
        metrics={"miou": 0.61, "per_class_iou": {"background": 0.9, "road": 0.7, "car": None}},
        recipe={"model": {"arch": "FPN"}, "train": {"epochs": 3}},
        source_checkpoint="runs/x/checkpoints/best.pt",
        serving=ServingOptions(cuda_half=True, cuda_channels_last=True),
        export=ExportInfo(
            format="torchscript",
            method="script",
            torch_version="2.15.0",
            runtimes={
                "torchscript": RuntimeExport(
                    "model.pt",
                    {"max_abs_logit_diff": 1e-6, "argmax_equal": True, "sizes": [[96, 160]]},
                ),
                "onnx": RuntimeExport("model.onnx", {"argmax_equal": True}),
                "onnx_int8": RuntimeExport(
                    "model.int8.onnx",
                    {"argmax_agreement": 0.97, "max_miou_drop": 0.05},
                    val_miou=0.6,
                    val_miou_fp32=0.61,
                    miou_drop=0.01,
                ),
            },
        ),
        drift_reference=DriftReference(
            class_pixel_fraction={"background": 0.6, "road": 0.3, "car": 0.1},
            class_confidence={"background": 0.95, "road": 0.9},  # car never predicted
            images=160,
        ),
    )


def test_every_field_round_trips_through_json_and_the_export_files(tmp_path):
    import dataclasses

    import torch

    from handler.artifact import SCHEMA_VERSION, ModelMetadata
    from handler.runtime import quiet_torchscript
    from training.export import load_exported, write_export

    meta = full_metadata()
    data = meta.to_dict()
    # Every dataclass field is written (a new field that to_dict forgets fails here) ...
    names = {f.name for f in dataclasses.fields(ModelMetadata)}
    assert names <= set(data) and data["schema_version"] == SCHEMA_VERSION
    assert data["num_classes"] == 3
    defaults = ModelMetadata("m", "1", ("a", "b"), ((0, 0, 0), (1, 1, 1)), meta.preprocess)
    for name in names - {"preprocess"}:
        assert getattr(meta, name) != getattr(defaults, name), f"full_metadata leaves {name}"
    int8 = meta.export.runtimes["onnx_int8"]
    for f in dataclasses.fields(int8):  # every runtime field written and read back too
        assert getattr(int8, f.name) not in (None, {}), f"full_metadata leaves onnx_int8.{f.name}"
    assert set(data["export"]["runtimes"]["onnx_int8"]) == {
        f.name for f in dataclasses.fields(int8)
    }
    # ... and read back to an equal object, through JSON text and through the written files.
    assert parse_metadata(json.loads(meta.to_json())) == meta
    assert parse_metadata(data).to_dict() == data
    with quiet_torchscript():
        module = torch.jit.script(torch.nn.Conv2d(3, 3, 1))
    write_export(module, meta, tmp_path)
    _, loaded = load_exported(tmp_path)
    assert loaded == meta
    assert json.loads((tmp_path / "metadata.json").read_text()) == data


def test_a_real_export_reads_back_to_the_same_json(meta_dict):
    assert parse_metadata(meta_dict).to_dict() == meta_dict


def test_metadata_built_in_code_is_checked_like_parsed_metadata():
    from handler.artifact import ModelMetadata
    from handler.preprocessing import PreprocessSpec

    spec = PreprocessSpec(input_size=(32, 32))
    with pytest.raises(MetadataError, match="palette"):
        ModelMetadata("m", "1", ("a", "b"), ((0, 0, 0),), spec)
    with pytest.raises(MetadataError, match="duplicates"):
        ModelMetadata("m", "1", ("a", "a"), ((0, 0, 0), (1, 1, 1)), spec)
    from handler.artifact import DriftReference

    stale = DriftReference({"a": 1.0}, {}, images=4)  # a baseline of another class list
    with pytest.raises(MetadataError, match="drift_reference"):
        ModelMetadata("m", "1", ("a", "b"), ((0, 0, 0), (1, 1, 1)), spec, drift_reference=stale)


def test_an_export_from_before_the_runtimes_section_still_reads(meta_dict):
    """schema_version 1 as first written: TorchScript parity at the top, ONNX under "onnx"."""
    old = copy.deepcopy(meta_dict)
    parity = old["export"].pop("runtimes")["torchscript"]["parity"]
    old["export"]["parity"] = parity
    old["export"]["onnx"] = {"file": "model.onnx", "parity": {"argmax_equal": True}}
    runtimes = parse_metadata(old).export.runtimes
    assert list(runtimes) == ["torchscript", "onnx"]
    assert runtimes["torchscript"].file == "model.pt" and runtimes["torchscript"].parity == parity
    assert runtimes["onnx"].file == "model.onnx" and runtimes["onnx"].passed
    del old["export"]["onnx"]
    assert list(parse_metadata(old).export.runtimes) == ["torchscript"]


@pytest.mark.parametrize(
    ("runtime", "message"),
    [
        ({"parity": {}}, "file"),
        ({"file": "../model.onnx", "parity": {}}, "file"),
        ({"file": "model.onnx", "parity": []}, "parity"),
        ({"file": "model.onnx", "miou_drop": "small"}, "miou_drop"),
    ],
)
def test_a_bad_runtime_section_names_the_field(meta_dict, runtime, message):
    bad = copy.deepcopy(meta_dict)
    bad["export"]["runtimes"]["onnx"] = runtime
    with pytest.raises(MetadataError, match=rf"export\.runtimes\.onnx.*{message}"):
        parse_metadata(bad)


def test_unknown_runtimes_are_skipped_and_a_missing_one_says_how_to_export_it(meta_dict):
    from handler.artifact import runtime_export

    newer = copy.deepcopy(meta_dict)
    newer["export"]["runtimes"]["tensorrt"] = {"file": "model.plan", "parity": {}}
    meta = parse_metadata(newer)
    assert list(meta.export.runtimes) == ["torchscript"]
    with pytest.raises(MetadataError, match="export has no model.int8.onnx: re-export with "
                       "export.runtimes including onnx_int8"):  # fmt: skip
        runtime_export(meta, "onnx_int8")


@pytest.mark.parametrize(
    "drift, message",
    [
        ("x", "'drift_reference' must be an object"),
        ({"class_pixel_fraction": {"a": 0.5}, "class_confidence": {}, "images": 3}, "every class"),
        ({"class_pixel_fraction": {"a": 1, "b": 2}, "class_confidence": {}, "images": 3}, "[0, 1]"),
        ({"class_pixel_fraction": {"a": 1, "zz": 0}, "class_confidence": {}, "images": 3}, "map"),
        ({"class_pixel_fraction": {"a": 1, "b": 0}, "class_confidence": {}, "images": 0}, "images"),
    ],
)
def test_a_bad_drift_reference_names_the_field(meta_dict, drift, message):
    data = {**meta_dict, "num_classes": 2, "class_names": ["a", "b"]}
    data["palette"] = [[0, 0, 0], [1, 1, 1]]
    with pytest.raises(MetadataError, match=re.escape(message)):
        parse_metadata({**data, "drift_reference": drift})


def test_the_drift_reference_is_what_the_served_masks_show(tiny_export):
    """The baseline (measured at export, handler.drift) equals the mean class shares of the
    offline Predictor's masks on the same images: the statistic live traffic is held to."""
    import numpy as np

    from handler.postprocess import class_fractions
    from tests.conftest import LabelledScenes
    from training.predict import Predictor

    predictor = Predictor.from_export(tiny_export)
    reference = predictor.metadata.drift_reference
    assert reference is not None and reference.images == 16
    scenes = LabelledScenes(predictor.metadata.num_classes, 16, (96, 128), seed=3).samples
    masks = [predictor.predict(rgb)[0] for rgb, _ in scenes]
    want = np.mean([class_fractions(m, predictor.metadata.num_classes) for m in masks], axis=0)
    got = [reference.class_pixel_fraction[n] for n in predictor.metadata.class_names]
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert abs(sum(got) - 1) < 1e-5
    assert set(reference.class_confidence) <= set(predictor.metadata.class_names)
    assert all(0 < c <= 1 for c in reference.class_confidence.values())

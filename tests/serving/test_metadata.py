"""Metadata validation: every inconsistency is refused with the field named."""

from __future__ import annotations

import copy
import json

import pytest

from handler.metadata import MetadataError, load_metadata, parse_metadata


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

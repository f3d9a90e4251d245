"""Per-class statistics, the JSON answer and every output encoding."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from handler.artifact import parse_metadata
from handler.postprocess import class_confidences, class_fractions, encode_output, json_body
from handler.request import CONTENT_TYPES, OUTPUT_FORMATS


@pytest.fixture
def meta(tiny_export):
    return parse_metadata(json.loads((tiny_export / "metadata.json").read_text()))


@pytest.fixture
def prediction():
    rng = np.random.default_rng(0)
    mask = rng.integers(0, 3, size=(30, 50))  # class 3 absent
    confidence = rng.uniform(0.3, 1.0, size=(30, 50)).astype(np.float32)
    rgb = rng.integers(0, 256, size=(30, 50, 3), dtype=np.uint8)
    return rgb, mask, confidence


def test_fractions_sum_to_one_and_count_pixels(prediction):
    _, mask, _ = prediction
    fractions = class_fractions(mask, 4)
    assert fractions.sum() == pytest.approx(1.0, abs=1e-12)
    assert fractions[3] == 0.0
    assert fractions[1] == pytest.approx((mask == 1).mean())


def test_confidences_per_class(prediction):
    _, mask, confidence = prediction
    conf = class_confidences(mask, confidence, 4)
    assert conf[2] == pytest.approx(confidence[mask == 2].mean(), rel=1e-6)
    assert np.isnan(conf[3])


def test_json_body_fields(prediction, meta):
    _, mask, confidence = prediction
    body = json_body(mask, confidence, meta)
    assert (body["width"], body["height"]) == (50, 30)
    assert body["model_name"] == "segmenter" and body["model_version"] == "1.0"
    assert [c["name"] for c in body["classes"]] == list(meta.class_names)
    assert sum(c["pixel_fraction"] for c in body["classes"]) == pytest.approx(1.0, abs=1e-9)
    assert body["classes"][3]["confidence"] is None
    assert body["mean_confidence"] == pytest.approx(float(confidence.mean()), rel=1e-6)
    decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["mask"]))))
    np.testing.assert_array_equal(decoded, mask)
    assert body["confidence_map_format"] == "png/base64/uint8"
    heat = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["confidence_map"]))))
    assert heat.shape == mask.shape and heat.dtype == np.uint8
    np.testing.assert_allclose(heat / 255.0, confidence, atol=0.5 / 255 + 1e-6)
    json.dumps(body, allow_nan=False)  # strict JSON: no NaN leaks


@pytest.mark.parametrize("output", OUTPUT_FORMATS)
def test_every_output_decodes_to_the_image_size(prediction, meta, output):
    rgb, mask, confidence = prediction
    data = encode_output(output, rgb, mask, confidence, meta)
    if output == "json":
        assert CONTENT_TYPES[output] == "application/json"
        assert (json.loads(data)["width"], json.loads(data)["height"]) == (50, 30)
        return
    image = Image.open(io.BytesIO(data))
    assert image.size == (50, 30)
    assert image.format == ("JPEG" if output == "overlay_jpeg" else "PNG")
    if output == "mask":
        np.testing.assert_array_equal(np.asarray(image), mask)
    if output == "color":
        colours = np.asarray(image.convert("RGB"))
        np.testing.assert_array_equal(colours, np.asarray(meta.palette, dtype=np.uint8)[mask])


def test_unknown_output_is_a_programming_error(prediction, meta):
    rgb, mask, confidence = prediction
    with pytest.raises(ValueError, match="unknown output"):
        encode_output("heatmap", rgb, mask, confidence, meta)

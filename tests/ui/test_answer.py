"""What the page draws from a json answer: pure functions, no server, no browser."""

from __future__ import annotations

import base64
import io
import json
import os
import time

import numpy as np
import pytest
from PIL import Image

from handler.imaging import encode_overlay
from handler.postprocess import json_body
from tests.conftest import TINY_CLASSES, TINY_PALETTE, tiny_metadata
from ui.answer import (
    AnswerError,
    colour_mask,
    fraction_rows,
    heat_map,
    legend_html,
    overlay,
    parse_answer,
    summary_html,
)
from ui.app import DOWNLOAD_MAX_AGE_S, Downloads, sample_paths, status_html


@pytest.fixture(scope="module")
def answer():
    """The handler's own json body for a 3x5 prediction (built by its writer, not by hand)."""
    rng = np.random.default_rng(0)
    mask = np.array([[0, 0, 1, 1, 2]] * 3, dtype=np.uint8)
    confidence = rng.uniform(0.3, 1.0, mask.shape).astype(np.float32)
    rgb = rng.integers(0, 256, (*mask.shape, 3), dtype=np.uint8)
    body = json.loads(json.dumps(json_body(mask, confidence, tiny_metadata())))
    return body, mask, confidence, rgb


def test_the_answer_round_trips(answer):
    body, mask, confidence, _ = answer
    seg = parse_answer(body)
    np.testing.assert_array_equal(seg.mask, mask)
    assert [c.name for c in seg.classes] == TINY_CLASSES
    assert seg.palette == [tuple(c) for c in TINY_PALETTE]
    assert seg.classes[3].confidence is None and seg.classes[3].pixel_fraction == 0.0
    np.testing.assert_allclose(seg.confidence_map, confidence, atol=0.5 / 255 + 1e-6)
    assert seg.mask_png == base64.b64decode(body["mask"])


def test_the_overlay_is_the_servers_blend(answer):
    body, mask, _, rgb = answer
    seg = parse_answer(body)
    served = np.asarray(Image.open(io.BytesIO(encode_overlay(rgb, mask, TINY_PALETTE, "PNG"))))
    np.testing.assert_array_equal(overlay(rgb, seg, 0.5), served)
    np.testing.assert_array_equal(overlay(rgb, seg, 0.0), rgb)
    np.testing.assert_array_equal(overlay(rgb, seg, 7.0), colour_mask(seg))  # clipped to 1


def test_legend_lists_every_class_escaped_with_exact_fractions(answer):
    body, *_ = answer
    body = {**body, "classes": [dict(c) for c in body["classes"]]}
    body["classes"][1]["name"] = '<img src=x onerror="alert(1)">'
    html = legend_html(parse_answer(body))
    assert "<img" not in html and "&lt;img" in html
    assert html.count("data-class-id=") == len(TINY_CLASSES)
    fractions = [float(x.split('"')[0]) for x in html.split('data-fraction="')[1:]]
    assert sum(fractions) == pytest.approx(1.0, abs=1e-12)
    assert fraction_rows(parse_answer(body))["color"][1] == "rgb(128, 64, 128)"


def test_summary_and_heat_map(answer):
    seg = parse_answer(answer[0])
    html = summary_html(seg, 41.6, "grpc")
    assert 'data-latency-ms="41.6"' in html and "(GRPC)" in html and "5x3 px" in html
    heat = heat_map(np.array([[0.0, 0.5, 1.0, -3.0, 9.0]]))
    assert heat[0, 1].tolist() == [33, 145, 140]
    assert heat[0, 3].tolist() == heat[0, 0].tolist() and heat[0, 4].tolist() == heat[0, 2].tolist()


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda b: b.pop("mask_format"), "not segserve's json output"),
        (lambda b: b.update(mask="bm90IGEgcG5n"), "is not a base64 PNG"),
        (lambda b: b.update(width=99), "the answer says 99x3"),
        (lambda b: b.update(classes=[]), "classes are missing"),
        (lambda b: b["classes"][0].pop("color"), "class entry of the answer is malformed"),
    ],
)
def test_a_malformed_answer_is_named(answer, change, message):
    body = json.loads(json.dumps(answer[0]))
    change(body)
    with pytest.raises(AnswerError, match=message):
        parse_answer(body)


def test_an_answer_without_a_confidence_map_still_draws(answer):
    body = {k: v for k, v in answer[0].items() if not k.startswith("confidence_map")}
    assert parse_answer(body).confidence_map is None


def test_status_is_escaped_and_samples_tolerate_a_missing_folder(tmp_path):
    assert "&lt;script&gt;" in status_html("<script>", error=True)
    assert sample_paths(tmp_path / "missing") == [] and sample_paths(None) == []
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    assert sample_paths(tmp_path) == [tmp_path / "a.png"]


def test_downloads_are_pruned_by_age(tmp_path):
    downloads = Downloads(tmp_path / "downloads")
    old = downloads.save("photo.jpg", b"old")
    assert old.name == "photo.mask.png" and old.read_bytes() == b"old"
    stale = time.time() - DOWNLOAD_MAX_AGE_S - 5
    os.utime(old.parent, (stale, stale))
    new = downloads.save("../../etc/x.png", b"new")
    assert not old.exists() and new.parent.parent == downloads.root and new.name == "x.mask.png"

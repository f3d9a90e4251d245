"""The active-learning hook (handler.sampling): off by default, bounded, never in the way."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from handler.sampling import LowConfidenceSampler, mean_confidence


def test_mean_confidence_weights_classes_by_their_pixels():
    assert mean_confidence(np.array([0.75, 0.25]), np.array([0.8, 0.4])) == pytest.approx(0.7)
    assert math.isnan(mean_confidence(np.array([1.0, 0.0]), np.array([np.nan, np.nan])))


def test_off_unless_the_folder_is_set_and_bad_settings_are_named(tmp_path):
    assert LowConfidenceSampler.from_environment({}) is None
    on = LowConfidenceSampler.from_environment({"SEGSERVE_SAMPLE_DIR": str(tmp_path / "s")})
    assert on is not None and on.below == 0.5 and on.max_bytes == 512 * 2**20
    for bad in ({"SEGSERVE_SAMPLE_BELOW": "x"}, {"SEGSERVE_SAMPLE_BELOW": "2"},
                {"SEGSERVE_SAMPLE_MAX_MB": "0"}):  # fmt: skip
        with pytest.raises(ValueError, match="SEGSERVE_SAMPLE_"):
            LowConfidenceSampler.from_environment({"SEGSERVE_SAMPLE_DIR": str(tmp_path), **bad})


def test_keeps_only_unsure_inputs_and_stops_at_the_cap(tmp_path):
    sampler = LowConfidenceSampler(tmp_path, below=0.5, max_bytes=1000)
    assert sampler.offer(b"x" * 100, 0.6, {}) is None  # sure enough
    assert sampler.offer(b"x" * 100, float("nan"), {}) is None  # nothing predicted
    kept = sampler.offer(b"y" * 300, 0.3, {"model_name": "m"})
    assert kept.read_bytes() == b"y" * 300
    sidecar = json.loads(kept.with_suffix(".json").read_text())
    assert sidecar["model_name"] == "m" and sidecar["mean_confidence"] == 0.3
    while sampler.offer(b"z" * 300, 0.1, {}) is not None:
        pass
    assert sampler.used_bytes() <= 1000  # full: keeps what it has, writes nothing more
    # A second worker on the same folder sees it full too.
    assert LowConfidenceSampler(tmp_path, 0.5, 1000).offer(b"z" * 300, 0.1, {}) is None


@pytest.mark.serving
@pytest.mark.slow
def test_a_served_model_keeps_its_unsure_inputs_within_the_cap(
    tiny_archive, torchserve_factory, tmp_path, monkeypatch
):
    """The tiny random model is unsure of everything (mean confidence ~0.3): every answered
    image is kept until the 64 KiB cap; answers are the same as without sampling."""
    folder = tmp_path / "samples"
    monkeypatch.setenv("SEGSERVE_SAMPLE_DIR", str(folder))
    monkeypatch.setenv("SEGSERVE_SAMPLE_MAX_MB", str(64 / 1024))
    info = torchserve_factory(tiny_archive)
    monkeypatch.undo()  # the workers have inherited it; nothing else should
    sent = []
    for seed in range(12):
        pixels = np.random.default_rng(seed).integers(0, 256, (60, 80, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        sent.append(buf.getvalue())
        resp = requests.post(
            f"{info.inference_url}/predictions/{info.model_name}",
            data=sent[-1],
            headers={"Authorization": f"Bearer {info.inference_key}"},
            timeout=60,
        )
        assert resp.status_code == 200 and resp.content[:4] == b"\x89PNG"
    kept = sorted(folder.glob("*.bin"))
    used = sum(p.stat().st_size for p in folder.iterdir())
    assert kept and len(kept) < len(sent), "the cap did not stop the sampling"
    assert used <= 64 * 1024
    assert {p.read_bytes() for p in kept} <= set(sent)  # the bytes the client sent
    for path in kept:
        record = json.loads(path.with_suffix(".json").read_text())
        assert record["model_name"] == info.model_name and record["mean_confidence"] < 0.5
        assert set(record["class_pixel_fraction"]) == {"background", "road", "building", "sky"}
    assert not list(Path(info.workdir).glob("*.bin"))

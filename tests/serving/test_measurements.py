"""Figures for the report (printed; run with -s): latency and response size. No timing asserts."""

from __future__ import annotations

import json
import statistics
import time

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.serving, pytest.mark.slow]


def test_latency_served_vs_raw_forward(torchserve, helpers, tiny_export, reference):
    image = helpers.random_image(512, 512, 7)
    body = helpers.png_bytes(image)
    for _ in range(3):  # warm-up: TorchScript's profiling executor optimises on early calls
        assert helpers.rest_predict(torchserve, body).status_code == 200
    served = []
    for _ in range(25):
        start = time.perf_counter()
        response = helpers.rest_predict(torchserve, body)
        served.append(time.perf_counter() - start)
        assert response.status_code == 200
    from handler.runtime import load_scripted_model

    model = load_scripted_model(tiny_export / "model.pt")
    h, w = reference.meta.preprocess.input_size
    x = torch.randn(1, 3, h, w)
    raw, pipeline = [], []
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        for _ in range(25):
            start = time.perf_counter()
            model(x)
            raw.append(time.perf_counter() - start)
    for _ in range(10):
        start = time.perf_counter()
        reference.predict([image])
        pipeline.append(time.perf_counter() - start)
    figures = {
        "image": f"512x512 PNG -> model input {h}x{w}",
        "served_p50_ms": round(statistics.median(served) * 1000, 1),
        "raw_forward_p50_ms": round(statistics.median(raw) * 1000, 1),
        "offline_prepare_forward_postprocess_p50_ms": round(statistics.median(pipeline) * 1000, 1),
        "archive_max_batch_delay_ms": 50,
    }
    print("\nLATENCY", json.dumps(figures))
    assert all(v > 0 for v in (figures["served_p50_ms"], figures["raw_forward_p50_ms"]))


def test_response_bytes_mask_vs_json_list(torchserve, helpers):
    body = helpers.png_bytes(helpers.random_image(512, 512, 8))
    mask_response = helpers.rest_predict(torchserve, body, output="mask")
    json_response = helpers.rest_predict(torchserve, body, output="json")
    mask = helpers.decode_png(mask_response.content)
    as_list = json.dumps(mask.tolist()).encode()  # what a naive handler would return
    sizes = {
        "mask_png_bytes": len(mask_response.content),
        "json_answer_bytes": len(json_response.content),
        "json_list_of_class_ids_bytes": len(as_list),
    }
    print("\nSIZES 512x512", json.dumps(sizes))
    assert mask.shape == (512, 512)
    assert sizes["mask_png_bytes"] * 10 < sizes["json_list_of_class_ids_bytes"]
    assert np.array_equal(np.asarray(json.loads(as_list), dtype=np.uint8), mask)

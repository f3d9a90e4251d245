"""``make bench``'s own parts: the limit sweep's counting, and that the in-process pipeline it
holds served rows to is the served work (same masks as the offline predictor)."""

from __future__ import annotations

import functools
import io
import time

import numpy as np
import pytest
from PIL import Image

from benchmarks.bench import jpeg_images, pipeline_work, served_pipeline
from benchmarks.limit import gpu_layouts, layouts, measure_layout, sweep
from training.predict import Predictor

SLEEP_S = 0.01


def sleeping_work(images_per_call: int, threads: int, batch: int):
    """A maker whose run() takes at least SLEEP_S per call and finishes ``batch`` images."""

    def run() -> int:
        time.sleep(SLEEP_S)
        return batch * images_per_call

    return run


def test_the_sweep_counts_every_process_and_no_more() -> None:
    """Two processes of a run() that cannot go faster than 1/SLEEP_S calls a second: the layout
    adds both processes' images over one wall clock, and can never beat what sleeping allows."""
    make = functools.partial(sleeping_work, 1)
    one = measure_layout(make, processes=1, threads=1, batch=2, seconds=0.5)
    two = measure_layout(make, processes=2, threads=1, batch=2, seconds=0.5)
    assert (one.processes, one.threads, one.batch) == (1, 1, 2)
    assert 0 < one.images_per_s <= 2 / SLEEP_S
    assert one.images_per_s < two.images_per_s <= 2 * 2 / SLEEP_S


def test_sweep_orders_layouts_best_first() -> None:
    found = sweep(functools.partial(sleeping_work, 1), [(1, 1)], (1, 4), 0.3)
    assert [(x.processes, x.batch) for x in found] == [(1, 4), (1, 1)]  # 4 images a call win


def test_layouts_use_the_cores() -> None:
    assert layouts(4) == [(1, 3), (1, 4), (2, 2), (3, 1), (4, 1)]
    assert all(p * t <= 4 for p, t in layouts(4))
    assert gpu_layouts(1) == [(1, 1)]


def test_the_in_process_pipeline_serves_the_offline_masks(tiny_export) -> None:
    """What the bench times is what the handler answers: each PNG body is the mask
    ``training.predict`` gives for the same JPEG (the handler's served == offline guarantee)."""
    images = jpeg_images((48, 64), n=2)
    bodies = served_pipeline(tiny_export, "torchscript", threads=1)(images)
    predictor = Predictor.from_export(tiny_export)
    for image, body in zip(images, bodies, strict=True):
        served = np.asarray(Image.open(io.BytesIO(body)))
        [(offline, _)] = predictor.predict_batch([np.asarray(Image.open(io.BytesIO(image)))])
        assert served.shape == (48, 64) and np.array_equal(served, offline)
    run = pipeline_work(tiny_export, "torchscript", images, "cpu", threads=1, batch=3)
    assert run() == 3


def test_cuda_without_cuda_is_a_clear_error() -> None:
    import torch

    from benchmarks.bench import resolve_device

    if torch.cuda.is_available():
        assert resolve_device("cuda") == "cuda" and resolve_device("auto") == "cuda"
    else:
        with pytest.raises(SystemExit, match="CUDA is not available"):
            resolve_device("cuda")
        assert resolve_device("auto") == "cpu"

"""Shared fixtures: a tiny real export, its .mar, and a real TorchServe on free ports.

* ``tiny_export``   dir with model.pt (traced + frozen smp Unet, random weights, 4 classes,
                    input_size 64x64, resize policy) and metadata.json (schema_version 1).
* ``tiny_archive``  model store dir with segmenter.mar (batch 4, 50 ms delay) + manifest.
* ``torchserve``    ServerInfo of a running TorchServe serving it (REST, management, metrics
                    and both gRPC ports free), stopped at session end even on failure; its log
                    tails are printed when a test of the session failed.
* ``torchserve_factory`` start more servers (e.g. other batch settings), stopped at the end.
* ``free_port()``   a free TCP port.
* ``make_export``   factory ``make_export(out_dir, **overrides) -> Path`` for variants.
"""

from __future__ import annotations

import atexit
import contextlib
import io
from pathlib import Path
from typing import Any

import pytest

from serving.server import Ports, ServerError, _log_tail, start, stop
from serving.server import free_port as _free_port

REPO = Path(__file__).resolve().parent.parent
TINY_CLASSES = ["background", "road", "building", "sky"]
TINY_PALETTE = [[0, 0, 0], [128, 64, 128], [70, 70, 70], [70, 130, 180]]


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    return _free_port()


def tiny_metadata(num_classes: int = 4, input_size=(64, 64), resize_policy="resize"):
    """The tiny model's ``ModelMetadata`` (every field set; ``export`` comes from the export)."""
    from handler.artifact import ModelMetadata
    from handler.preprocessing import PreprocessSpec

    names = (TINY_CLASSES + [f"class_{i}" for i in range(4, num_classes)])[:num_classes]
    extra = [((37 * i) % 256, (91 * i) % 256, (53 * i) % 256) for i in range(4, num_classes)]
    return ModelMetadata(
        model_name="segmenter",
        model_version="1.0",
        architecture="Unet",
        encoder="resnet18",
        class_names=tuple(names),
        palette=tuple((TINY_PALETTE + extra)[:num_classes]),
        preprocess=PreprocessSpec(input_size=tuple(input_size), resize_policy=resize_policy),
        metrics={
            "miou": 0.5,
            "pixel_accuracy": 0.8,
            "mean_accuracy": 0.6,
            "mean_dice": 0.6,
            "boundary_f1": 0.4,
            "per_class_iou": {n: 0.5 for n in names},
        },
        recipe={"model": {"arch": "Unet", "encoder": "resnet18"}, "note": "tests/conftest.py"},
        source_checkpoint="tests/tiny/best.pt",
    )


def build_tiny_export(out_dir: Path, seed: int = 0, **meta_overrides: Any) -> Path:
    """A small random smp Unet exported by ``training.export.export_model`` into ``out_dir``
    (parity checked on two blobby images, as a real export is on validation images)."""
    import numpy as np
    import segmentation_models_pytorch as smp
    import torch
    from PIL import Image

    from training.export import export_model

    meta = tiny_metadata(**meta_overrides)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = smp.create_model(
            "Unet",
            encoder_name="resnet18",
            encoder_weights=None,
            classes=meta.num_classes,
            encoder_depth=3,
            decoder_channels=(16, 8, 8),
        ).eval()
    rng = np.random.default_rng(seed)
    images = [
        np.asarray(Image.fromarray(rng.integers(0, 256, (6, 8, 3), np.uint8)).resize((80, 60)))
        for _ in range(2)
    ]
    with contextlib.redirect_stdout(io.StringIO()):  # the per-size parity lines
        export_model(model, meta, images, out_dir)
    return out_dir


@pytest.fixture(scope="session")
def make_export():
    """``make_export(out_dir, seed=0, num_classes=4, input_size=(64, 64), resize_policy=...)``."""
    return build_tiny_export


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory) -> Path:
    return build_tiny_export(tmp_path_factory.mktemp("tiny_export"))


@pytest.fixture(scope="session")
def tiny_archive(tiny_export, tmp_path_factory) -> Path:
    from serving.archive import ArchiveOptions, build_archive

    store = tmp_path_factory.mktemp("model_store")
    options = ArchiveOptions(
        model_name="segmenter", version="1.0", batch_size=4, max_batch_delay_ms=50
    )
    build_archive(tiny_export, store, options)
    return store


def start_test_server(model_store: Path, workdir: Path, attempts: int = 2):
    """Start on free ports (retrying once if a port got taken in between); always cleaned up."""
    atexit.register(stop, workdir)  # even if pytest is interrupted before teardown
    for attempt in range(attempts):
        try:
            return start(
                REPO / "config.properties",
                model_store=model_store,
                workdir=workdir,
                ports=Ports.free(),
                timeout_s=240,
            )
        except ServerError as exc:
            if "is busy" in str(exc) and attempt + 1 < attempts:
                continue
            pytest.fail(f"TorchServe did not start: {exc}", pytrace=False)
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def torchserve_factory(tmp_path_factory):
    """``start(model_store) -> ServerInfo``: an extra TorchServe (own free ports and workdir),
    for tests that need other archive settings; ``stop(info)`` early, else stopped at the end."""
    started: list[Path] = []

    def _start(model_store: Path):
        workdir = tmp_path_factory.mktemp("torchserve_extra")
        started.append(workdir)
        return start_test_server(model_store, workdir)

    yield _start
    for workdir in started:
        stop(workdir)


@pytest.fixture(scope="session")
def torchserve(tiny_archive, tmp_path_factory, request):
    workdir = tmp_path_factory.mktemp("torchserve")
    failed_before = request.session.testsfailed
    info = start_test_server(tiny_archive, workdir)
    try:
        yield info
    finally:
        if request.session.testsfailed > failed_before:
            print(f"\n[torchserve fixture] logs after failures:\n{_log_tail(Path(info.log_dir))}")
        stop(workdir)

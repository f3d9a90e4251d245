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
* ``_mlflow_store``  (autouse) $MLFLOW_TRACKING_URI set to a session SQLite store.
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


@pytest.fixture(scope="session", autouse=True)
def _mlflow_store(tmp_path_factory):
    """Training tracks to MLflow by default (training/tracking.py): the suite's runs go to a
    SQLite store of its own (subprocesses inherit the variable), never to the checkout's
    runs/mlruns nor to a server a developer's shell points at."""
    uri = "sqlite:///" + str(tmp_path_factory.mktemp("mlruns") / "mlflow.db")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        yield uri


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


class LabelledScenes:
    """Synthetic scenes (``training.synthetic``) with labels folded into ``num_classes``: the
    calibration images and labelled val split an ``onnx_int8`` export of the tiny model needs."""

    def __init__(self, num_classes: int, count: int, size=(60, 80), seed: int = 0) -> None:
        from training.synthetic import generate_scene

        scenes = [generate_scene(seed, i, size) for i in range(count)]
        self.samples = [(rgb, (mask % num_classes).astype(mask.dtype)) for rgb, mask in scenes]

    def __len__(self) -> int:
        return len(self.samples)

    def load_raw(self, i: int):
        rgb, mask = self.samples[i]
        return rgb, mask, f"scene_{i}"


def build_tiny_export(
    out_dir: Path, seed: int = 0, runtimes: tuple[str, ...] | None = None, **meta_overrides: Any
) -> Path:
    """A small random smp Unet exported by ``training.export.export_model`` into ``out_dir``
    (parity checked on two blobby images, as a real export is on validation images).

    ``runtimes`` (default TorchScript only): e.g. ``("torchscript", "onnx", "onnx_int8")``;
    INT8 is calibrated on 4 synthetic scenes and its mIoU measured on 4 others, with the drop
    limit lifted (random weights: the figure is measured, not judged).
    """
    import numpy as np
    import segmentation_models_pytorch as smp
    import torch
    from PIL import Image

    from training.export import Int8Calibration, export_model

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
    # The drift baseline on in-distribution images: synthetic scenes, as a real export measures
    # it on the val split (tests/k8s/test_monitoring_live.py sends the same kind of scenes).
    drift = [rgb for rgb, _ in LabelledScenes(meta.num_classes, 16, (96, 128), seed + 3).samples]
    int8 = None
    if runtimes and "onnx_int8" in runtimes:
        calibration = LabelledScenes(meta.num_classes, 4, seed=seed + 1)
        int8 = Int8Calibration(
            images=[rgb for rgb, _ in calibration.samples],
            val_dataset=LabelledScenes(meta.num_classes, 4, seed=seed + 2),
            max_miou_drop=1.0,
            batch_size=4,
        )
    with contextlib.redirect_stdout(io.StringIO()):  # the per-size parity lines
        export_model(model, meta, images, out_dir, runtimes=runtimes, int8=int8, drift_images=drift)
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


def start_test_server(
    model_store: Path, workdir: Path, attempts: int = 2, overrides: dict[str, str] | None = None
):
    """Start on free ports (retrying once if a port got taken in between); always cleaned up.
    ``overrides``: config.properties keys, e.g. ``load_models`` for several archives."""
    # Tests reason about one worker per model (which requests share a forward, which pid dies);
    # the derived default (one per core, handler.sizing) is tested in tests/serving/test_sizing.py.
    from loadtest.fault_server import ONE_WORKER, write_server_config

    atexit.register(stop, workdir)  # even if pytest is interrupted before teardown
    config = write_server_config(
        workdir / "config" / "config.properties", {**ONE_WORKER, **(overrides or {})}
    )
    for attempt in range(attempts):
        try:
            return start(
                config,
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
    """``start(model_store, overrides=None) -> ServerInfo``: an extra TorchServe (own free ports
    and workdir, config.properties ``overrides``), for tests that need other archive settings
    or several models; ``stop(info)`` early, else stopped at the end."""
    started: list[Path] = []

    def _start(model_store: Path, overrides: dict[str, str] | None = None):
        workdir = tmp_path_factory.mktemp("torchserve_extra")
        started.append(workdir)
        return start_test_server(model_store, workdir, overrides=overrides)

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

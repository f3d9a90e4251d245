"""Every runtime behind the same handler: one export, three archives, one real TorchServe.

The tiny model is exported once with ``torchscript``, ``onnx`` and ``onnx_int8``; each runtime
is archived on its own (``--runtime``) and all three are served by one TorchServe. Every served
mask must equal, bit for bit, the mask of that runtime's offline predictor
(``Predictor.from_export(export_dir, runtime=...)``), which loads through the same
``handler.runtime.load_model``; the decode/preprocess/postprocess code is the handler's own.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml

pytestmark = [pytest.mark.serving, pytest.mark.slow]

RUNTIMES = ("torchscript", "onnx", "onnx_int8")
FILES = {"torchscript": "model.pt", "onnx": "model.onnx", "onnx_int8": "model.int8.onnx"}
SIZES = [(64, 64), (48, 80), (120, 40), (211, 157)]


@pytest.fixture(scope="module")
def runtime_export(tmp_path_factory, make_export) -> Path:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    return make_export(tmp_path_factory.mktemp("runtimes") / "export", runtimes=RUNTIMES)


@pytest.fixture(scope="module")
def runtime_store(runtime_export, tmp_path_factory) -> Path:
    from serving.archive import ArchiveOptions, build_archive

    store = tmp_path_factory.mktemp("runtime_store")
    for runtime in RUNTIMES:
        options = ArchiveOptions(
            model_name=f"seg_{runtime}", batch_size=4, max_batch_delay_ms=50, runtime=runtime
        )
        build_archive(runtime_export, store, options)
    return store


@pytest.fixture(scope="module")
def runtime_server(runtime_store, torchserve_factory):
    models = ",".join(f"seg_{r}=seg_{r}.mar" for r in RUNTIMES)
    return torchserve_factory(runtime_store, {"load_models": models})


def test_each_archive_carries_only_its_runtime_and_records_it(runtime_store):
    for runtime in RUNTIMES:
        mar = runtime_store / f"seg_{runtime}.mar"
        with zipfile.ZipFile(mar) as z:
            names = set(z.namelist())
            config = yaml.safe_load(z.read("model-config.yaml"))
            serialized = json.loads(z.read("MAR-INF/MANIFEST.json"))["model"]["serializedFile"]
        assert serialized == FILES[runtime] and "metadata.json" in names
        assert not (set(FILES.values()) - {FILES[runtime]}) & names  # no other model file
        assert config["handler"]["runtime"] == runtime
        manifest = json.loads((runtime_store / f"seg_{runtime}.manifest.json").read_text())
        record = manifest["runtime"]
        assert record["name"] == runtime and record["file"] == FILES[runtime]
        assert record["requested"] == runtime and record["parity"]["sizes"]
    int8 = json.loads((runtime_store / "seg_onnx_int8.manifest.json").read_text())["runtime"]
    for key in ("miou_drop", "val_miou", "val_miou_fp32"):
        assert np.isfinite(int8[key]), key
    assert int8["miou_drop"] == pytest.approx(int8["val_miou_fp32"] - int8["val_miou"])
    assert 0 < int8["parity"]["argmax_agreement"] <= 1


def test_auto_times_every_runtime_and_packs_the_fastest(runtime_export, tmp_path):
    from serving.archive import ArchiveOptions, build_archive

    mar = build_archive(runtime_export, tmp_path, ArchiveOptions(model_name="seg_auto"))
    record = json.loads((tmp_path / "seg_auto.manifest.json").read_text())["runtime"]
    timings = record["timings_ms"]
    assert record["requested"] == "auto" and sorted(timings) == sorted(RUNTIMES)
    assert record["name"] == min(timings, key=timings.__getitem__)
    assert record["device"] == "cpu" and record["input"] == [1, 3, 64, 64]
    with zipfile.ZipFile(mar) as z:
        assert (
            json.loads(z.read("MAR-INF/MANIFEST.json"))["model"]["serializedFile"]
            == (FILES[record["name"]])
        )


def test_served_masks_equal_each_runtimes_offline_predictor(
    runtime_server, runtime_export, helpers
):
    from training.predict import Predictor

    images = [helpers.random_image(h, w, seed) for seed, (h, w) in enumerate(SIZES)]
    served: dict[str, list[np.ndarray]] = {}
    for runtime in RUNTIMES:
        predictor = Predictor.from_export(runtime_export, runtime=runtime)
        served[runtime] = []
        for image in images:
            response = helpers.rest_predict(
                runtime_server, helpers.png_bytes(image), model=f"seg_{runtime}"
            )
            assert response.status_code == 200, (runtime, response.text)
            got = helpers.decode_png(response.content)
            np.testing.assert_array_equal(got, predictor.predict(image)[0], err_msg=runtime)
            served[runtime].append(got)
    assert len(set(np.unique(np.concatenate([m.ravel() for m in served["onnx"]])))) >= 2
    # The INT8 archive really runs the quantised model: its masks are not TorchScript's.
    assert any(
        (a != b).any() for a, b in zip(served["onnx_int8"], served["torchscript"], strict=True)
    )
    log = "".join(p.read_text(errors="replace") for p in Path(runtime_server.log_dir).glob("*.log"))
    for runtime, provider in (("onnx", "CPUExecutionProvider"), ("onnx_int8", "CPU")):
        assert f"segserve runtime {runtime} on {provider}" in log

"""Fixtures for the serving tests: offline reference predictions, test images, gRPC stubs."""

from __future__ import annotations

import importlib
import io
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import ts
from PIL import Image


def png_bytes(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def random_image(height: int, width: int, seed: int) -> np.ndarray:
    """Smooth-ish random RGB: blobs give the random model several classes to choose from."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(height // 8, 2), max(width // 8, 2), 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.BILINEAR))


class Reference:
    """Offline masks from ``training.predict.Predictor``, the one offline reference.

    ``batched=True`` runs the images as one ``predict_batch`` (N >= 2): on CPU, oneDNN may pick
    another convolution kernel for N == 1 than for N > 1 (logits differ by ~1e-6), so a served
    batch is compared with an offline batch and a single request with a single forward.
    """

    def __init__(self, export_dir: Path) -> None:
        from training.predict import Predictor

        self.predictor = Predictor.from_export(export_dir)
        self.meta = self.predictor.metadata

    def predict(self, images: list[np.ndarray], batched: bool = False) -> list[np.ndarray]:
        if batched:
            return [mask for mask, _ in self.predictor.predict_batch(images)]
        return [self.predictor.predict(image)[0] for image in images]


@pytest.fixture(scope="session")
def reference(tiny_export) -> Reference:
    return Reference(tiny_export)


@pytest.fixture(scope="session")
def grpc_stubs(tmp_path_factory):
    """(inference_pb2, inference_pb2_grpc) generated from the protos inside model-server.jar."""
    from grpc_tools import protoc

    out = tmp_path_factory.mktemp("grpc_stubs")
    jar = Path(ts.__file__).parent / "frontend" / "model-server.jar"
    with zipfile.ZipFile(jar) as z:
        # google/rpc/status.proto only to compile against: its Python module ships with
        # googleapis-common-protos.
        for name in ("inference.proto", "management.proto", "google/rpc/status.proto"):
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_bytes(z.read(name))
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    rc = protoc.main(
        [
            "protoc",
            f"-I{out}",
            f"-I{include}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            str(out / "inference.proto"),
        ]
    )
    assert rc == 0, "protoc failed on inference.proto"
    sys.path.insert(0, str(out))
    try:
        return importlib.import_module("inference_pb2"), importlib.import_module(
            "inference_pb2_grpc"
        )
    finally:
        sys.path.remove(str(out))


def rest_predict(
    info,
    body: bytes | None = None,
    *,
    output: str | None = None,
    headers=None,
    key: str | None = "inference",
    model: str = "segmenter",
    timeout: float = 60,
):
    """POST one image: raw body, or multipart ``data`` + ``output`` when ``output`` is given."""
    import requests

    headers = dict(headers or {})
    if key == "inference":
        headers["Authorization"] = f"Bearer {info.inference_key}"
    elif key:
        headers["Authorization"] = f"Bearer {key}"
    url = f"{info.inference_url}/predictions/{model}"
    if output is None:
        return requests.post(url, data=body, headers=headers, timeout=timeout)
    return requests.post(
        url,
        files={"data": ("image", body)},
        data={"output": output},
        headers=headers,
        timeout=timeout,
    )


def decode_png(content: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(content)))


def scrape(info) -> dict:
    """{family name: [samples]} from the metrics port (no token needed there)."""
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(f"{info.metrics_url}/metrics", timeout=10).text
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


@pytest.fixture(scope="session")
def helpers():
    """Plain functions shared by the serving tests (importlib mode: no test-module imports)."""

    class Helpers:
        pass

    h = Helpers()
    h.png_bytes, h.random_image, h.rest_predict = png_bytes, random_image, rest_predict
    h.decode_png, h.scrape = decode_png, scrape
    return h

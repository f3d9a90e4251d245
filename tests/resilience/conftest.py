"""Fixtures for the resilience tests: a hostile input corpus, an offline reference, servers with
special configs (small queue, model API on, small max_request_size).

* ``corpus``          the hostile/odd inputs, generated here (never stored): ``list[Case]``;
* ``offline``         ``offline(body) -> mask`` with the same export, decoder and preprocessing;
* ``special_server``  ``special_server(store, overrides) -> ServerInfo``: a TorchServe started
                      from a copy of config.properties with ``overrides`` (stopped at the end);
* ``scene_images``    a few PNG scenes (bytes) for traffic loops.
"""

from __future__ import annotations

import atexit
import io
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from loadtest.fault_server import ONE_WORKER, write_server_config
from loadtest.hostile import png_claiming
from serving.server import Ports, ServerError, start, stop


def smooth_image(height: int, width: int, seed: int) -> np.ndarray:
    """Blobby random RGB, so the random model predicts several classes."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(height // 8, 2), max(width // 8, 2), 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.BILINEAR))


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


png_bomb = png_claiming


@dataclass(frozen=True)
class Case:
    """One request of the corpus and what the server must answer.

    ``size`` (H, W) for a valid image: a 200 mask of exactly that size; else ``status`` and the
    error ``type`` (the handler's reason, or TorchServe's own exception type) are expected.
    """

    name: str
    body: bytes
    size: tuple[int, int] | None = None
    status: int = 200
    error_type: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    # multipart fields instead of a raw body (bytes values are files)
    fields: dict[str, bytes | str] | None = None
    grpc: bool = True  # part of the gRPC subset


def _valid_cases() -> list[Case]:
    rgb = smooth_image(48, 80, 1)
    base = Image.fromarray(rgb)
    cases = [
        Case("png", encode(base, "PNG"), (48, 80)),
        Case("1x1", encode(Image.fromarray(smooth_image(8, 8, 2)[:1, :1]), "PNG"), (1, 1)),
        Case("1x4000", encode(Image.fromarray(smooth_image(8, 4000, 3)[:1]), "PNG"), (1, 4000)),
        Case("4000x1", encode(Image.fromarray(smooth_image(4000, 8, 4)[:, :1]), "PNG"), (4000, 1)),
        Case("grey16", encode(Image.fromarray(np.uint16(rgb[..., 0]) * 257), "PNG"), (48, 80)),
        Case("palette", encode(base.quantize(16), "PNG"), (48, 80)),
        Case("cmyk_jpeg", encode(base.convert("CMYK"), "JPEG", quality=90), (48, 80), grpc=False),
        Case("rgba", encode(base.convert("RGBA"), "PNG"), (48, 80), grpc=False),
    ]
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    rotated = encode(base, "JPEG", quality=90, exif=exif.tobytes())
    cases.append(Case("exif_rotated_jpeg", rotated, (80, 48)))
    frames = [Image.fromarray(smooth_image(40, 56, s)) for s in (5, 6, 7)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    cases.append(Case("animated_gif", gif.getvalue(), (40, 56), grpc=False))
    return cases


def _invalid_cases() -> list[Case]:
    rng = np.random.default_rng(0)
    image = Image.fromarray(smooth_image(64, 64, 8))
    jpeg, png = encode(image, "JPEG", quality=90), encode(image, "PNG")
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr("image.png", png)
    svg = b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect/></svg>'
    return [
        Case("empty", b"", status=400, error_type="empty"),
        Case("random_bytes", rng.bytes(4096), status=415, error_type="not_an_image"),
        Case("truncated_jpeg", jpeg[: len(jpeg) // 2], status=400, error_type="truncated"),
        Case("truncated_png", png[: len(png) // 2], status=400, error_type="truncated"),
        Case("html", b"<!DOCTYPE html><html><body>hi</body></html>", status=415,
             error_type="not_an_image"),
        Case("svg", svg, status=415, error_type="not_an_image"),
        Case("zip", zipped.getvalue(), status=415, error_type="not_an_image", grpc=False),
        Case("pdf", b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF", status=415,
             error_type="not_an_image"),
        Case("png_bomb_100000x100000", png_bomb(100_000, 100_000), status=413,
             error_type="too_many_pixels"),
        # Under Pillow's own bomb limit, over the handler's max_pixels (40 M): our check.
        Case("png_claims_10000x5000", png_bomb(10_000, 5_000), status=413,
             error_type="too_many_pixels"),
        Case("text_plain_body", b"hello, I am not an image", status=415,
             error_type="not_an_image", headers={"Content-Type": "text/plain"}, grpc=False),
        # A real image under a wrong Content-Type is still an image: TorchServe's worker tries
        # to decode text/* and JSON bodies, fails, and forwards the bytes (a 200, not a 415).
        Case("png_sent_as_text_plain", png, (64, 64), headers={"Content-Type": "text/plain"},
             grpc=False),
        Case("png_sent_as_json", png, (64, 64), headers={"Content-Type": "application/json"},
             grpc=False),
        Case("json_without_image", b'{"picture": "x"}', status=415, error_type="not_an_image",
             headers={"Content-Type": "application/json"}, grpc=False),
        Case("multipart_without_image", b"", status=400, error_type="empty",
             fields={"output": "mask"}, grpc=False),
        Case("unknown_output", b"", status=400, error_type="bad_request",
             fields={"data": png, "output": "segments"}),
    ]  # fmt: skip


@pytest.fixture(scope="session")
def corpus() -> list[Case]:
    cases = _valid_cases() + _invalid_cases()
    assert len({c.name for c in cases}) == len(cases)
    return cases


class Offline:
    """The served pipeline run in-process: ``decode_image`` then the offline reference,
    ``training.predict.Predictor`` (the shared loader, preprocessing and post-processing)."""

    def __init__(self, export_dir: Path) -> None:
        from training.predict import Predictor

        self.predictor = Predictor.from_export(export_dir)
        self.meta = self.predictor.metadata

    def __call__(self, body: bytes) -> np.ndarray:
        from handler.imaging import decode_image

        mask, _ = self.predictor.predict(decode_image(body, self.predictor.max_pixels))
        return mask


@pytest.fixture(scope="session")
def offline(tiny_export) -> Offline:
    return Offline(tiny_export)


@pytest.fixture(scope="session")
def scene_images() -> list[bytes]:
    return [encode(Image.fromarray(smooth_image(64, 96, s)), "PNG") for s in range(6)]


@pytest.fixture(scope="session")
def special_server(tmp_path_factory):
    """``special_server(store, overrides) -> ServerInfo`` on free ports; ``stop(info.workdir)``
    early to free the CPU, else stopped at session end."""
    started: list[str] = []

    def _start(store: Path, overrides: dict[str, str]):
        root = tmp_path_factory.mktemp("special")
        config = write_server_config(root / "config.properties", {**ONE_WORKER, **overrides})
        workdir = root / "server"
        atexit.register(stop, workdir)
        started.append(str(workdir))
        for attempt in range(2):
            try:
                return start(config, store, workdir, Ports.free(), timeout_s=240)
            except ServerError as exc:
                if "is busy" in str(exc) and attempt == 0:
                    continue
                pytest.fail(f"TorchServe did not start: {exc}", pytrace=False)
        raise AssertionError("unreachable")

    yield _start
    for workdir in started:
        stop(workdir)

"""The Gradio page: upload (or pick a sample) → overlay, colour mask, legend, chart, heat map.

A thin adapter: the drawing is :mod:`ui.answer`, the TorchServe call is :mod:`ui.backend`.
Gradio was chosen over Streamlit because it is built around exactly this loop (an input
component, a function, output components), queues requests per event instead of re-running
a whole script per interaction, streams webcam frames with one flag, and mounts in a FastAPI
app, which gives the page a ``/healthz`` for Kubernetes probes next to it.

The bytes of an uploaded file go to TorchServe untouched (``gr.File``, not ``gr.Image``,
which would decode them in the browser and hide the server's message for a bad file). The
page decodes the input for display only after the server accepted it, with the server's own
decoder (handler.imaging), so the overlay lines up with the mask pixel for pixel.
"""

from __future__ import annotations

import io
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from html import escape
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import pandas as pd
from fastapi import FastAPI
from PIL import Image

from client.outputs import list_images, output_path
from handler.errors import InputError
from handler.imaging import decode_image
from ui.answer import (
    Segmentation,
    colour_mask,
    fraction_rows,
    heat_map,
    legend_html,
    overlay,
    summary_html,
)
from ui.backend import Backend, PageError
from ui.config import PageConfig

log = logging.getLogger(__name__)

# Fonts the browser already has: the default theme would fetch Google Fonts, which an
# offline cluster or test cannot reach (and a demo should not wait for).
THEME = gr.themes.Default(
    font=["ui-sans-serif", "system-ui", "sans-serif"],
    font_mono=["ui-monospace", "monospace"],
)
CSS = """
#segserve-legend { border-collapse: collapse; }
#segserve-legend td, #segserve-legend th { padding: 2px 8px; text-align: left; }
#segserve-legend .swatch { display: inline-block; width: 1em; height: 1em;
                           border: 1px solid #888; vertical-align: middle; }
.segserve-error { color: #b00020; font-weight: 600; }
"""
# Mask files offered for download are kept this long, then removed on a later request.
DOWNLOAD_MAX_AGE_S = 1800
PageOutputs = tuple[Any, ...]


def status_html(message: str, error: bool) -> str:
    """The status line: the error text (role=alert, for screen readers) or a success note.

    >>> status_html("bad <file>", error=True)
    '<div id="segserve-error" class="segserve-error" role="alert">bad &lt;file&gt;</div>'
    """
    if error:
        return (
            f'<div id="segserve-error" class="segserve-error" role="alert">{escape(message)}</div>'
        )
    return f'<div id="segserve-ok">{escape(message)}</div>'


def sample_paths(folder: Path | None) -> list[Path]:
    """The sample images offered under the upload box (none if the folder is missing)."""
    if folder is None or not folder.is_dir():
        return []
    try:
        return list_images(folder)
    except ValueError:
        return []


class Downloads:
    """A folder of mask PNGs for the download box, pruned by age so it stays bounded."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or Path(tempfile.mkdtemp(prefix="segserve-ui-"))

    def save(self, name: str, content: bytes) -> Path:
        """Write ``content`` as ``<stem>.mask.png`` in a fresh folder; prune the old ones."""
        cutoff = time.time() - DOWNLOAD_MAX_AGE_S
        # Made here, not once: a tmp cleaner may remove the folder under a long-running page.
        self.root.mkdir(parents=True, exist_ok=True)
        for old in self.root.iterdir():
            if old.stat().st_mtime < cutoff:
                shutil.rmtree(old, ignore_errors=True)
        folder = Path(tempfile.mkdtemp(dir=self.root))
        path = output_path(folder, Path(Path(name).name or "image"), "mask")
        path.write_bytes(content)
        return path


def _input_rgb(data: bytes, seg: Segmentation) -> np.ndarray:
    # The server decoded these bytes already; the answer's size bounds this decode.
    rgb = decode_image(data, max_pixels=max(seg.width * seg.height, 1))
    if rgb.shape[:2] != seg.mask.shape:
        raise PageError(f"the input decodes to {rgb.shape[1]}x{rgb.shape[0]}, the mask differs")
    return rgb


def _chart(seg: Segmentation) -> Any:
    rows = fraction_rows(seg)
    frame = pd.DataFrame({"class": rows["class"], "pixel fraction": rows["pixel fraction"]})
    return gr.update(value=frame, color_map=dict(zip(rows["class"], rows["color"], strict=True)))


class Page:
    """The event handlers, bound to one :class:`Backend`."""

    def __init__(self, config: PageConfig, backend: Backend, downloads: Downloads) -> None:
        self.config = config
        self.backend = backend
        self.downloads = downloads

    def empty(self, message: str = "", error: bool = False) -> PageOutputs:
        status = status_html(message, error) if message else ""
        return (None, status, "", "", None, None, None, None, None, None)

    def segment_file(self, path: str | None, opacity: float) -> PageOutputs:
        """(state, status, summary, legend, chart, download, input, overlay, mask, heat)."""
        if not path:
            return self.empty()
        try:
            data = Path(path).read_bytes()
            answer = self.backend.predict(data)
            seg = answer.segmentation
            rgb = _input_rgb(data, seg)
        except PageError as exc:
            return self.empty(str(exc), error=True)
        except InputError as exc:  # the server accepted what the page cannot decode
            return self.empty(f"The page could not show this image: {exc.message}", error=True)
        except Exception:  # never leave the person with a spinner: say it, log the rest
            log.exception("segmenting %s failed", path)
            return self.empty("The page failed on this file; its log has the details.", True)
        heat = None if seg.confidence_map is None else heat_map(seg.confidence_map)
        return (
            (rgb, seg),
            status_html(f"Segmented {Path(path).name}.", error=False),
            summary_html(seg, answer.latency_ms, self.config.protocol),
            legend_html(seg),
            _chart(seg),
            str(self.downloads.save(Path(path).name, seg.mask_png)),
            rgb,
            overlay(rgb, seg, opacity),
            colour_mask(seg),
            heat,
        )

    def reblend(self, state: tuple[np.ndarray, Segmentation] | None, opacity: float) -> Any:
        """The overlay at a new opacity, from the last answer (no new request)."""
        if state is None:
            return None
        rgb, seg = state
        return overlay(rgb, seg, opacity)

    def segment_frame(self, frame: np.ndarray | None, opacity: float) -> tuple[Any, str]:
        """One webcam frame: JPEG-encoded and sent through the same client as an upload."""
        if frame is None:
            return None, ""
        buf = io.BytesIO()
        Image.fromarray(frame.astype(np.uint8)).convert("RGB").save(buf, "JPEG", quality=90)
        try:
            answer = self.backend.predict(buf.getvalue())
            seg = answer.segmentation
            rgb = _input_rgb(buf.getvalue(), seg)
        except PageError as exc:
            return None, status_html(str(exc), error=True)
        except Exception:
            log.exception("segmenting a webcam frame failed")
            return None, status_html("The page failed on this frame; see its log.", True)
        return overlay(rgb, seg, opacity), summary_html(seg, answer.latency_ms, "webcam")


def _image(label: str, elem_id: str) -> gr.Image:
    # PNG, not Gradio's default WebP: the page shows the mask's colours exactly.
    return gr.Image(label=label, elem_id=elem_id, format="png", interactive=False, type="numpy")


def build_page(config: PageConfig, backend: Backend, downloads: Downloads) -> gr.Blocks:
    """The Gradio Blocks of the page; the token never enters it (only ``backend`` holds it)."""
    page = Page(config, backend, downloads)
    samples = sample_paths(config.samples)
    with gr.Blocks(title="segserve", analytics_enabled=False, delete_cache=(600, 1800)) as blocks:
        gr.Markdown(
            "## segserve: try the served segmentation model\n"
            f"Predictions come from TorchServe ({escape(backend.target)}), model "
            f"`{escape(config.model_name)}`; classes and colours are the model's own."
        )
        state = gr.State(None)
        with gr.Tab("Image"):
            with gr.Row():
                with gr.Column(scale=1):
                    upload = gr.File(label="Image file", elem_id="segserve-upload")
                    if samples:
                        gr.Examples([[str(p)] for p in samples], inputs=upload, label="Samples")
                    opacity = gr.Slider(0, 1, value=0.5, step=0.05, label="Overlay opacity",
                                        elem_id="segserve-opacity")  # fmt: skip
                    status = gr.HTML(elem_id="segserve-status")
                    summary = gr.HTML(elem_id="segserve-summary-box")
                    legend = gr.HTML(elem_id="segserve-legend-box")
                    chart = gr.BarPlot(x="class", y="pixel fraction", color="class",
                                       y_lim=[0, 1], label="Pixels per class",
                                       elem_id="segserve-chart")  # fmt: skip
                    download = gr.File(label="Mask PNG (class ids)", elem_id="segserve-download")
                with gr.Column(scale=2):
                    with gr.Row():
                        input_view = _image("Input", "segserve-input")
                        overlay_view = _image("Overlay", "segserve-overlay")
                    with gr.Row():
                        mask_view = _image("Colour mask", "segserve-mask")
                        heat_view = _image("Confidence (dark: low, yellow: high)", "segserve-heat")
        with gr.Tab("Webcam"):
            with gr.Row():
                camera = gr.Image(sources=["webcam"], streaming=True, type="numpy",
                                  label="Webcam", elem_id="segserve-webcam")  # fmt: skip
                camera_view = _image("Overlay", "segserve-webcam-overlay")
            camera_status = gr.HTML(elem_id="segserve-webcam-status")
        outputs = [state, status, summary, legend, chart, download,
                   input_view, overlay_view, mask_view, heat_view]  # fmt: skip
        upload.change(page.segment_file, [upload, opacity], outputs, concurrency_limit=4)
        opacity.change(page.reblend, [state, opacity], overlay_view)
        camera.stream(page.segment_frame, [camera, opacity], [camera_view, camera_status],
                      stream_every=config.webcam_interval_s, concurrency_limit=1)  # fmt: skip
    return blocks


def health() -> dict[str, str]:
    """``GET /healthz``: the page process answers (TorchServe is not asked)."""
    return {"status": "ok"}


def build_app(
    config: PageConfig, backend: Backend | None = None, downloads: Downloads | None = None
) -> FastAPI:
    """The ASGI app: ``/healthz`` plus the page at ``/``."""
    backend = backend or Backend(config)
    downloads = downloads or Downloads()
    app = FastAPI(title="segserve page", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_api_route("/healthz", health, methods=["GET"])
    allowed = [str(downloads.root)] + ([str(config.samples)] if config.samples else [])
    return gr.mount_gradio_app(
        app,
        build_page(config, backend, downloads),
        path="",
        allowed_paths=allowed,
        max_file_size=config.max_upload_mb * 1024 * 1024,
        ssr_mode=False,
        theme=THEME,
        css=CSS,
        footer_links=[],
    )


def serve(config: PageConfig, announce: Callable[[str], None] = print) -> None:
    """Run the page until interrupted; prints its URL first."""
    import uvicorn

    backend = Backend(config)
    try:
        health = f"TorchServe says {backend.ping()}"
    except PageError as exc:  # the page still starts: it says so per request until it answers
        health = f"warning: {exc}"
    app = build_app(config, backend)
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::") else config.host
    announce(
        f"segserve page: http://{host}:{config.port}/ (predictions: {backend.target}; {health})"
    )
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning")

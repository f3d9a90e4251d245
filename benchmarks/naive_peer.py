"""The naive peer segserve is benchmarked against: a typical FastAPI ``/predict`` endpoint.

What such services usually do, on purpose: decode with PIL, resize with PIL, one forward per
request (no batching), argmax at model resolution then resize the mask back (nearest), and
answer JSON with the mask as a base64 PNG. ``/predict_list`` answers like TorchServe's stock
image_segmenter: the mask as a JSON list of class ids per pixel.

It loads the same TorchScript file as segserve, so only the serving path differs.

Example:
    python -m benchmarks.naive_peer --model runs/default/export/model.pt --port 8090
    curl -F file=@cat.png http://127.0.0.1:8090/predict
"""

from __future__ import annotations

import argparse
import base64
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, File, UploadFile
from PIL import Image


def load(model_path: Path, device: str = "cpu") -> tuple[Any, dict[str, Any]]:
    """The TorchScript module (on ``device``) and the metadata embedded in it."""
    extra = {"metadata.json": ""}
    # The same loader as the handler, so the peer runs the same executor (a fair comparison).
    from handler.runtime import load_scripted_model

    model = load_scripted_model(model_path, device, extra_files=extra)
    meta = json.loads(extra["metadata.json"]) if extra["metadata.json"] else {}
    return model, meta


def segment(
    model: Any, meta: dict[str, Any], image_bytes: bytes, device: str = "cpu"
) -> np.ndarray:
    """PIL decode → resize → normalise → forward (on ``device``) → argmax → nearest resize
    back."""
    pre = meta.get("preprocess", {})
    h, w = pre.get("input_size", [128, 128])
    mean = np.array(pre.get("mean", [0.485, 0.456, 0.406]), dtype=np.float32)
    std = np.array(pre.get("std", [0.229, 0.224, 0.225]), dtype=np.float32)
    img = Image.open(io.BytesIO(image_bytes)).convert("RGB")
    size = img.size
    x = np.asarray(img.resize((w, h), Image.BILINEAR), dtype=np.float32) / 255.0
    x = torch.from_numpy(((x - mean) / std).transpose(2, 0, 1).copy())[None].to(device)
    with torch.inference_mode():
        mask = model(x)[0].argmax(0).to(torch.uint8).cpu().numpy()
    return np.asarray(Image.fromarray(mask).resize(size, Image.NEAREST))


def create_app(model_path: Path, device: str = "cpu") -> Any:
    torch.set_num_threads(1)  # one request at a time per worker, like the TorchServe worker
    model, meta = load(model_path, device)
    app = FastAPI(title="naive segmentation peer")

    @app.post("/predict")
    def predict(file: UploadFile = File(...)) -> dict[str, Any]:  # noqa: B008 - FastAPI idiom
        mask = segment(model, meta, file.file.read(), device)
        buf = io.BytesIO()
        Image.fromarray(mask).save(buf, format="PNG")
        return {"mask_png_base64": base64.b64encode(buf.getvalue()).decode()}

    @app.post("/predict_list")
    def predict_list(file: UploadFile = File(...)) -> list[list[int]]:  # noqa: B008
        return segment(model, meta, file.file.read(), device).tolist()

    @app.get("/ping")
    def ping() -> dict[str, str]:
        return {"status": "Healthy"}

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.naive_peer")
    parser.add_argument("--model", type=Path, required=True, help="TorchScript model.pt")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--device", default="cpu", help="where the forward runs: cpu or cuda")
    args = parser.parse_args(argv)
    if not args.model.is_file():
        raise SystemExit(f"error: --model {args.model} does not exist")
    import uvicorn

    uvicorn.run(
        create_app(args.model, args.device), host=args.host, port=args.port, log_level="warning"
    )


if __name__ == "__main__":
    main()

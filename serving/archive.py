"""Pack an export (model.pt + metadata.json) and the handler into ``<name>.mar`` + manifest.

``python -m serving.archive --export-dir runs/default/export --out-dir model_archives``

Inside the archive (what TorchServe extracts into the model dir, which is on the worker's
``sys.path``)::

    segmenter_handler.py     entry point (the one class TorchServe instantiates)
    handler/                 the handler package: imports resolve as ``handler.imaging`` ...
    model.pt                 TorchScript
    metadata.json            classes, palette, preprocessing (read by the handler)
    model-config.yaml        workers, batching, timeouts, device, handler switches
    MAR-INF/MANIFEST.json

Next to it, ``<name>.manifest.json``: sha256 of the .mar, name, version, metrics from the
metadata, source checkpoint, creation time, torch/TorchServe versions.

Self-contained: nothing from ``training/`` is imported or packed.

Example:
    >>> opts = ArchiveOptions(model_name="segmenter", batch_size=4)
    >>> model_config(opts)["batchSize"]
    4
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import yaml

from handler.artifact import METADATA_FILE, MODEL_FILE, MetadataError, ModelMetadata, load_metadata
from handler.imaging import DEFAULT_MAX_PIXELS
from serving.properties import DEFAULT_MODEL_NAME

HANDLER_DIR = Path(__file__).resolve().parent.parent / "handler"
ENTRY_POINT = "segmenter_handler.py"
DEVICE_TYPES = ("gpu", "cpu")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-.]*$")


class ArchiveError(RuntimeError):
    """The archive cannot be built; the message says what is missing and how to fix it."""


@dataclass(frozen=True)
class ArchiveOptions:
    """Everything ``model-config.yaml`` and the archive name are made of."""

    model_name: str = DEFAULT_MODEL_NAME
    version: str | None = None  # None: the metadata's model_version
    batch_size: int = 8
    max_batch_delay_ms: int = 10
    min_workers: int = 1
    max_workers: int = 1
    response_timeout_s: int = 120
    startup_timeout_s: int = 120
    device_type: str = "gpu"  # TorchServe falls back to CPU when the host has no GPU
    max_pixels: int = DEFAULT_MAX_PIXELS
    cuda_half: bool | None = None  # None: the metadata's serving.cuda_half
    cuda_channels_last: bool | None = None
    extra_handler_options: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if not _NAME_RE.match(self.model_name):
            raise ArchiveError(
                f"--model-name {self.model_name!r}: use letters, digits, '_', '-' or '.', "
                "starting with a letter or digit"
            )
        checks = [
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.max_batch_delay_ms >= 0, "--max-batch-delay must be >= 0 (milliseconds)"),
            (self.min_workers >= 1, f"--min-workers must be >= 1, got {self.min_workers}"),
            (self.max_workers >= self.min_workers, "--max-workers must be >= --min-workers"),
            (self.response_timeout_s >= 1, "--response-timeout must be >= 1 (seconds)"),
            (self.startup_timeout_s >= 1, "--startup-timeout must be >= 1 (seconds)"),
            (self.max_pixels >= 1, "--max-pixels must be >= 1"),
            (
                self.device_type in DEVICE_TYPES,
                f"--device-type {self.device_type!r} is not one of {list(DEVICE_TYPES)}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ArchiveError(message)


def model_config(options: ArchiveOptions, meta: ModelMetadata | None = None) -> dict[str, Any]:
    """The ``model-config.yaml`` inside the archive (keys spelt as TorchServe reads them)."""
    handler: dict[str, Any] = {"max_pixels": options.max_pixels}
    half, channels_last = options.cuda_half, options.cuda_channels_last
    if half is None:
        half = meta.serving.cuda_half if meta is not None else False
    if channels_last is None:
        channels_last = meta.serving.cuda_channels_last if meta is not None else False
    handler["cuda_half"] = bool(half)
    handler["cuda_channels_last"] = bool(channels_last)
    handler.update(options.extra_handler_options)
    return {
        "minWorkers": options.min_workers,
        "maxWorkers": options.max_workers,
        "batchSize": options.batch_size,
        "maxBatchDelay": options.max_batch_delay_ms,
        "responseTimeout": options.response_timeout_s,
        "startupTimeout": options.startup_timeout_s,
        "deviceType": options.device_type,
        "handler": handler,
    }


def check_export_dir(export_dir: Path) -> tuple[Path, ModelMetadata]:
    """``model.pt`` and a valid ``metadata.json`` in ``export_dir``, or an ArchiveError."""
    hint = "run `make export` (or `python -m training export --run-dir RUN_DIR`) first"
    if not export_dir.is_dir():
        raise ArchiveError(f"export dir {export_dir} does not exist: {hint}")
    model_pt = export_dir / MODEL_FILE
    if not model_pt.is_file():
        raise ArchiveError(f"{model_pt} is missing: {hint}")
    try:
        meta = load_metadata(export_dir / METADATA_FILE)
    except MetadataError as exc:
        raise ArchiveError(f"{exc} ({hint})") from None
    return model_pt, meta


def _stage_handler(stage: Path) -> None:
    """Copy the handler package (Python files + metrics YAML) without caches."""
    target = stage / "handler"
    target.mkdir(parents=True)
    for path in sorted(HANDLER_DIR.iterdir()):
        if path.suffix in (".py", ".yaml") and path.is_file():
            shutil.copy2(path, target / path.name)


def _package_version(name: str) -> str:
    try:
        return importlib_metadata.version(name)
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _run_archiver(args: list[str], tmp: Path) -> None:
    # torch-model-archiver stages files in $TMPDIR/<model-name>; a private TMPDIR keeps two
    # concurrent builds of the same name (tests, make archive) from clobbering each other.
    env = dict(os.environ, TMPDIR=str(tmp))
    cmd = [sys.executable, "-m", "model_archiver.model_packaging", *args]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise ArchiveError(
            f"torch-model-archiver failed (exit {result.returncode}):\n"
            f"{result.stdout[-2000:]}{result.stderr[-2000:]}"
        )


def write_manifest(
    mar: Path, options: ArchiveOptions, meta: ModelMetadata, version: str, config: dict
) -> Path:
    """``<name>.manifest.json`` next to the .mar: what it is, where it came from."""
    import torch

    manifest = {
        "name": options.model_name,
        "version": version,
        "mar": mar.name,
        "sha256": _sha256(mar),
        "size_bytes": mar.stat().st_size,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "metrics": dict(meta.metrics),
        "source_checkpoint": meta.source_checkpoint,
        "model": {
            "architecture": meta.architecture,
            "encoder": meta.encoder,
            "num_classes": meta.num_classes,
            "class_names": list(meta.class_names),
            "preprocess": meta.preprocess.to_dict(),
        },
        "model_config": config,
        "versions": {
            "torch": torch.__version__,
            "torchserve": _package_version("torchserve"),
            "torch_model_archiver": _package_version("torch-model-archiver"),
            "python": platform.python_version(),
        },
    }
    path = mar.with_name(f"{options.model_name}.manifest.json")
    path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return path


def build_archive(export_dir: str | Path, out_dir: str | Path, options: ArchiveOptions) -> Path:
    """Build ``out_dir/<name>.mar`` (atomically replaced) + manifest; returns the .mar path."""
    options.validate()
    model_pt, meta = check_export_dir(Path(export_dir))
    version = options.version or meta.model_version or "1.0"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = model_config(options, meta)
    with tempfile.TemporaryDirectory(prefix="segserve-archive-") as tmp_name:
        tmp = Path(tmp_name)
        stage = tmp / "extra"
        _stage_handler(stage)
        shutil.copy2(model_pt.with_name(METADATA_FILE), stage / METADATA_FILE)
        config_file = tmp / "model-config.yaml"
        config_file.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        built = tmp / "out"
        built.mkdir()
        _run_archiver(
            [
                "--model-name", options.model_name,
                "--version", version,
                "--serialized-file", str(model_pt),
                "--handler", str(HANDLER_DIR / ENTRY_POINT),
                "--extra-files", str(stage),
                "--config-file", str(config_file),
                "--export-path", str(built),
                "--force",
            ],
            tmp,
        )  # fmt: skip
        mar = out_dir / f"{options.model_name}.mar"
        os.replace(built / mar.name, mar)
    write_manifest(mar, options, meta, version, config)
    return mar


def _parser() -> argparse.ArgumentParser:
    d = ArchiveOptions()
    p = argparse.ArgumentParser(
        prog="python -m serving.archive", description=__doc__.split("\n")[0]
    )
    p.add_argument("--export-dir", type=Path, required=True, help="holds model.pt + metadata.json")
    p.add_argument("--out-dir", type=Path, default=Path("model_archives"), help="the model store")
    p.add_argument("--model-name", default=d.model_name)
    p.add_argument("--version", default=None, help="default: metadata model_version")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--max-batch-delay", type=int, default=d.max_batch_delay_ms, help="ms")
    p.add_argument("--min-workers", type=int, default=d.min_workers)
    p.add_argument("--max-workers", type=int, default=d.max_workers)
    p.add_argument("--response-timeout", type=int, default=d.response_timeout_s, help="s")
    p.add_argument("--startup-timeout", type=int, default=d.startup_timeout_s, help="s")
    p.add_argument("--device-type", default=d.device_type, choices=DEVICE_TYPES)
    p.add_argument("--max-pixels", type=int, default=d.max_pixels, help="decode limit per image")
    p.add_argument("--cuda-half", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--cuda-channels-last", action=argparse.BooleanOptionalAction, default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    options = ArchiveOptions(
        model_name=args.model_name,
        version=args.version,
        batch_size=args.batch_size,
        max_batch_delay_ms=args.max_batch_delay,
        min_workers=args.min_workers,
        max_workers=args.max_workers,
        response_timeout_s=args.response_timeout,
        startup_timeout_s=args.startup_timeout,
        device_type=args.device_type,
        max_pixels=args.max_pixels,
        cuda_half=args.cuda_half,
        cuda_channels_last=args.cuda_channels_last,
    )
    try:
        mar = build_archive(args.export_dir, args.out_dir, options)
    except ArchiveError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    manifest = json.loads(mar.with_name(f"{options.model_name}.manifest.json").read_text())
    print(f"wrote {mar} ({manifest['size_bytes']:,} bytes, sha256 {manifest['sha256'][:12]}…)")
    print(f"config: {json.dumps(asdict(options) | {'version': manifest['version']})}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Pack one runtime of an export and the handler into ``<name>.mar`` + manifest.

``python -m serving.archive --export-dir runs/default/export --out-dir model_archives``

Inside the archive (what TorchServe extracts into the model dir, which is on the worker's
``sys.path``)::

    segmenter_handler.py     entry point (the one class TorchServe instantiates)
    handler/                 the handler package: imports resolve as ``handler.imaging`` ...
    model.pt | model.onnx | model.int8.onnx
                             the chosen runtime's model file only (MANIFEST's serializedFile)
    metadata.json            classes, palette, preprocessing (read by the handler)
    MODEL_CARD.md            the run's model card (``--model-card``; ``python -m training card``)
    model-config.yaml        workers, batching, timeouts, device, handler switches (``runtime``)
    MAR-INF/MANIFEST.json

``--runtime`` (``ArchiveOptions.runtime``) is ``torchscript``, ``onnx``, ``onnx_int8`` or ``auto``
(the default): every runtime the export carries that passed its export check is timed in this
process on the export's input size (batch-1 forwards taken in turns, median, on CUDA when
``--device-type gpu`` and CUDA is here, else CPU) and the fastest is packed; the timings go
into the manifest.

Next to it, ``<name>.manifest.json``: sha256 of the .mar, name, version, metrics from the
metadata, source checkpoint, creation time, torch/TorchServe versions, and ``runtime``: its
name, file, parity figures (INT8: argmax agreement, val mIoU and the measured ``miou_drop``)
and how it was chosen; ``model_card``: the packed card's path in the archive and sha256 (null
when none was packed).

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
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import yaml

from handler.artifact import (
    METADATA_FILE,
    MODEL_CARD_FILE,
    MODEL_FILE,
    RUNTIMES,
    TORCHSCRIPT,
    MetadataError,
    ModelMetadata,
    load_metadata,
    runtime_export,
)
from handler.drift import DRIFT_EVERY_S, drift_interval
from handler.imaging import DEFAULT_MAX_PIXELS
from serving.properties import DEFAULT_MODEL_NAME

HANDLER_DIR = Path(__file__).resolve().parent.parent / "handler"
ENTRY_POINT = "segmenter_handler.py"
DEVICE_TYPES = ("gpu", "cpu")
AUTO = "auto"
RUNTIME_CHOICES = (*RUNTIMES, AUTO)
TIMED_FORWARDS = 7  # per runtime for --runtime auto, after two warm-up forwards
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-.]*$")


class ArchiveError(RuntimeError):
    """The archive cannot be built; the message says what is missing and how to fix it."""


@dataclass(frozen=True)
class ArchiveOptions:
    """Everything ``model-config.yaml`` and the archive name are made of."""

    model_name: str = DEFAULT_MODEL_NAME
    version: str | None = None  # None: the metadata's model_version
    batch_size: int = 8
    # Waiting for batch-mates only helps when more requests are about to arrive; under load the
    # queue already holds them, and at low load every wait is pure latency (docs/performance.md).
    max_batch_delay_ms: int = 1
    # None: not pinned in the archive, so TorchServe starts its default (one worker per core,
    # or per GPU; handler.sizing sets each worker's torch threads to match).
    min_workers: int | None = None
    max_workers: int | None = None
    threads: int | None = None  # torch intra-op threads per worker; None: handler.sizing
    response_timeout_s: int = 120
    startup_timeout_s: int = 120
    device_type: str = "gpu"  # TorchServe falls back to CPU when the host has no GPU
    max_pixels: int = DEFAULT_MAX_PIXELS
    cuda_half: bool | None = None  # None: the metadata's serving.cuda_half
    cuda_channels_last: bool | None = None
    cuda_jpeg_decode: bool = True  # plain JPEGs decoded by nvJPEG on a CUDA worker's GPU
    drift_every_s: float = DRIFT_EVERY_S  # one drift observation per worker per this; 0: all
    runtime: str = AUTO  # torchscript | onnx | onnx_int8 | auto (the fastest that passed parity)
    extra_handler_options: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if not _NAME_RE.match(self.model_name):
            raise ArchiveError(
                f"--model-name {self.model_name!r}: use letters, digits, '_', '-' or '.', "
                "starting with a letter or digit"
            )
        checks = [
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (
                self.max_batch_delay_ms >= 1,
                "--max-batch-delay must be >= 1 (milliseconds): TorchServe 0.12 reads 0 as "
                "unset and waits its default 100 ms for batch-mates on every request",
            ),
            (
                self.min_workers is None or self.min_workers >= 1,
                f"--min-workers must be >= 1, got {self.min_workers}",
            ),
            (
                self.max_workers is None or self.max_workers >= (self.min_workers or 1),
                "--max-workers must be >= --min-workers",
            ),
            (self.threads is None or self.threads >= 1, "--threads must be >= 1"),
            (self.response_timeout_s >= 1, "--response-timeout must be >= 1 (seconds)"),
            (self.startup_timeout_s >= 1, "--startup-timeout must be >= 1 (seconds)"),
            (self.max_pixels >= 1, "--max-pixels must be >= 1"),
            (
                self.device_type in DEVICE_TYPES,
                f"--device-type {self.device_type!r} is not one of {list(DEVICE_TYPES)}",
            ),
            (
                self.runtime in RUNTIME_CHOICES,
                f"--runtime {self.runtime!r} is not one of {list(RUNTIME_CHOICES)}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ArchiveError(message)
        try:
            drift_interval({"drift_every_s": self.drift_every_s})
        except ValueError:
            raise ArchiveError(
                f"--drift-every-s must be a number of seconds >= 0 (0 = observe every image), "
                f"got {self.drift_every_s!r}"
            ) from None


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
    handler["cuda_jpeg_decode"] = bool(options.cuda_jpeg_decode)
    handler["drift_every_s"] = float(options.drift_every_s)
    if options.threads is not None:
        handler["threads"] = options.threads
    if options.runtime != AUTO:  # build_archive resolves auto before writing the config
        handler["runtime"] = options.runtime
    handler.update(options.extra_handler_options)
    workers: dict[str, Any] = {}
    if options.min_workers is not None or options.max_workers is not None:
        workers["minWorkers"] = options.min_workers or 1
        workers["maxWorkers"] = options.max_workers or options.min_workers
    return {
        **workers,
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


def runtime_model_file(export_dir: Path, meta: ModelMetadata, runtime: str) -> Path:
    """The export's model file for ``runtime``, or an ArchiveError naming the file and the fix.

    A runtime other than TorchScript must also have passed its export check (the exporter
    writes no other, so this only refuses an export edited by hand).
    """
    try:
        section = runtime_export(meta, runtime)
    except MetadataError as exc:
        raise ArchiveError(f"{export_dir}: {exc}") from None
    path = export_dir / section.file
    if not path.is_file():
        raise ArchiveError(
            f"{path} is missing although metadata.json lists {runtime}: re-run the export "
            f"(`make export RUNTIMES=...` with {runtime})"
        )
    if runtime != TORCHSCRIPT and not section.passed:
        raise ArchiveError(
            f"{path}: the export's {runtime} check did not pass ({dict(section.parity)}); "
            "re-export it or archive another runtime"
        )
    return path


def timing_device(options: ArchiveOptions) -> str:
    """Where ``--runtime auto`` times: the GPU the archive targets when this host has one."""
    import torch

    return "cuda" if options.device_type == "gpu" and torch.cuda.is_available() else "cpu"


def choose_runtime(
    export_dir: Path, meta: ModelMetadata, options: ArchiveOptions
) -> tuple[str, Path, dict[str, Any]]:
    """(runtime, its model file, how it was chosen) for ``options.runtime``.

    ``auto``: the runtimes the export lists whose file is there and whose check passed are
    timed (``handler.runtime.time_runtimes``) and the fastest wins; with one candidate nothing
    is timed; with none (an export without parity figures) it is TorchScript, as before
    runtimes existed.
    """
    if options.runtime != AUTO:
        path = runtime_model_file(export_dir, meta, options.runtime)
        return options.runtime, path, {"requested": options.runtime}
    listed = meta.export.runtimes if meta.export is not None else {}
    candidates = {
        name: export_dir / rt.file
        for name, rt in listed.items()
        if rt.passed and (export_dir / rt.file).is_file()
    }
    selection: dict[str, Any] = {"requested": AUTO, "candidates": sorted(candidates)}
    if len(candidates) <= 1:
        chosen = next(iter(candidates), TORCHSCRIPT)
        selection["reason"] = "the only runtime in the export that passed its check"
        return chosen, runtime_model_file(export_dir, meta, chosen), selection
    from handler.runtime import time_runtimes

    device = timing_device(options)
    size = meta.preprocess.input_size
    timed = time_runtimes(candidates, size, device, TIMED_FORWARDS)
    timings = {name: round(ms, 3) for name, ms in timed.items()}
    chosen = min(timings, key=timings.__getitem__)
    import torch

    selection.update(
        reason="fastest median batch-1 forward in-process",
        timings_ms=timings,
        input=[1, 3, *size],
        device=device,
        threads=torch.get_num_threads(),
        forwards=TIMED_FORWARDS,
    )
    print(f"--runtime auto on {device}: {timings} ms per forward -> {chosen}")
    return chosen, candidates[chosen], selection


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
    mar: Path,
    options: ArchiveOptions,
    meta: ModelMetadata,
    version: str,
    config: dict,
    selection: dict[str, Any] | None = None,
    model_card: Path | None = None,
) -> Path:
    """``<name>.manifest.json`` next to the .mar: what it is, where it came from, which runtime
    (with its parity figures and, for INT8, the measured mIoU drop) and how it was chosen, and
    the model card packed with it (``model_card``: the file staged into the archive)."""
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
        "runtime": _runtime_record(meta, config, selection),
        "model_card": None
        if model_card is None
        else {
            "path": MODEL_CARD_FILE,
            "sha256": _sha256(model_card),
            "size_bytes": model_card.stat().st_size,
        },
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


def _runtime_record(
    meta: ModelMetadata, config: dict, selection: dict[str, Any] | None
) -> dict[str, Any]:
    name = config.get("handler", {}).get("runtime", TORCHSCRIPT)
    return {"name": name, **runtime_export(meta, name).to_dict(), **(selection or {})}


def build_archive(
    export_dir: str | Path,
    out_dir: str | Path,
    options: ArchiveOptions,
    model_card: str | Path | None = None,
) -> Path:
    """Build ``out_dir/<name>.mar`` (atomically replaced) + manifest; returns the .mar path.

    ``model_card``: a Markdown file packed as ``MODEL_CARD.md`` and named in the manifest.
    """
    options.validate()
    if model_card is not None and not Path(model_card).is_file():
        raise ArchiveError(
            f"--model-card {model_card}: no such file; write it with `python -m training card "
            "--run-dir RUN_DIR` (`make card`), or leave --model-card out"
        )
    model_pt, meta = check_export_dir(Path(export_dir))
    runtime, model_file, selection = choose_runtime(Path(export_dir), meta, options)
    options = replace(options, runtime=runtime)
    version = options.version or meta.model_version or "1.0"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = model_config(options, meta)
    with tempfile.TemporaryDirectory(prefix="segserve-archive-") as tmp_name:
        tmp = Path(tmp_name)
        stage = tmp / "extra"
        _stage_handler(stage)
        shutil.copy2(model_pt.with_name(METADATA_FILE), stage / METADATA_FILE)
        card = None
        if model_card is not None:
            # The staged copy is what gets packed and hashed: the card cannot change in between.
            card = stage / MODEL_CARD_FILE
            shutil.copy2(model_card, card)
        config_file = tmp / "model-config.yaml"
        config_file.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        built = tmp / "out"
        built.mkdir()
        _run_archiver(
            [
                "--model-name", options.model_name,
                "--version", version,
                "--serialized-file", str(model_file),
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
        write_manifest(mar, options, meta, version, config, selection, card)
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
    p.add_argument(
        "--min-workers", type=int, default=d.min_workers, help="default: TorchServe's (cores/GPUs)"
    )
    p.add_argument("--max-workers", type=int, default=d.max_workers, help="default: --min-workers")
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads per worker")
    p.add_argument("--response-timeout", type=int, default=d.response_timeout_s, help="s")
    p.add_argument("--startup-timeout", type=int, default=d.startup_timeout_s, help="s")
    p.add_argument("--device-type", default=d.device_type, choices=DEVICE_TYPES)
    p.add_argument("--max-pixels", type=int, default=d.max_pixels, help="decode limit per image")
    p.add_argument("--cuda-half", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--cuda-channels-last", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument(
        "--cuda-jpeg-decode",
        action=argparse.BooleanOptionalAction,
        default=d.cuda_jpeg_decode,
        help="decode plain JPEGs with nvJPEG on a CUDA worker's GPU",
    )
    p.add_argument(
        "--drift-every-s",
        type=float,
        default=d.drift_every_s,
        help="seconds between a worker's drift observations (0: every image)",
    )
    p.add_argument(
        "--model-card",
        type=Path,
        default=None,
        help="a model card (python -m training card) to pack as MODEL_CARD.md",
    )
    p.add_argument(
        "--runtime",
        default=d.runtime,
        choices=RUNTIME_CHOICES,
        help="the model file to pack; auto: the fastest here that passed the export's check",
    )
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
        threads=args.threads,
        response_timeout_s=args.response_timeout,
        startup_timeout_s=args.startup_timeout,
        device_type=args.device_type,
        max_pixels=args.max_pixels,
        cuda_half=args.cuda_half,
        cuda_channels_last=args.cuda_channels_last,
        cuda_jpeg_decode=args.cuda_jpeg_decode,
        drift_every_s=args.drift_every_s,
        runtime=args.runtime,
    )
    try:
        mar = build_archive(args.export_dir, args.out_dir, options, args.model_card)
    except ArchiveError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    manifest = json.loads(mar.with_name(f"{options.model_name}.manifest.json").read_text())
    print(f"wrote {mar} ({manifest['size_bytes']:,} bytes, sha256 {manifest['sha256'][:12]}…)")
    runtime = manifest["runtime"]
    drop = f", val mIoU drop {runtime['miou_drop']:.4f}" if "miou_drop" in runtime else ""
    print(f"runtime: {runtime['name']} ({runtime['file']}{drop})")
    print(f"config: {json.dumps(asdict(options) | {'version': manifest['version']})}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The artifact contract: what an export (``model.pt`` + ``metadata.json``) is, in one place.

Training builds a :class:`ModelMetadata` (``training.resolve.build_metadata``), the exporter
(``training.export.write_export``) is the only writer of the two files, and the handler, the
archiver and the offline ``Predictor`` read them back with :func:`load_metadata`. The JSON
layout (``schema_version`` 1, docs/architecture.md) is :meth:`ModelMetadata.to_dict`; reading it
back is :func:`parse_metadata`, which checks every field and names the bad one. Keys this
version does not know are ignored, so an older reader can still serve a newer export's model.

Example:
    >>> meta = parse_metadata({
    ...     "schema_version": 1, "model_name": "segmenter", "model_version": "1.0",
    ...     "num_classes": 2, "class_names": ["background", "cat"],
    ...     "palette": [[0, 0, 0], [255, 0, 0]],
    ...     "preprocess": {"input_size": [64, 64]},
    ... })
    >>> meta.num_classes, meta.preprocess.input_size, meta.serving.cuda_half
    (2, (64, 64), False)
    >>> parse_metadata(meta.to_dict()) == meta
    True
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from handler.preprocessing import PreprocessSpec

SCHEMA_VERSION = 1
MODEL_FILE = "model.pt"
METADATA_FILE = "metadata.json"
# The run's model card (training/card.py writes it, serving/archive.py packs it beside the
# metadata); the handler never reads it.
MODEL_CARD_FILE = "MODEL_CARD.md"

# The runtimes an export can carry and the file each one's model is in (docs/architecture.md
# "Runtimes"). TorchScript is always there: it embeds the metadata and is the fp32 reference.
TORCHSCRIPT, ONNX, ONNX_INT8 = "torchscript", "onnx", "onnx_int8"
RUNTIME_FILES = {TORCHSCRIPT: MODEL_FILE, ONNX: "model.onnx", ONNX_INT8: "model.int8.onnx"}
RUNTIMES = tuple(RUNTIME_FILES)
ONNX_FILE, INT8_FILE = RUNTIME_FILES[ONNX], RUNTIME_FILES[ONNX_INT8]


class MetadataError(ValueError):
    """``metadata.json`` is missing, unreadable or inconsistent; the message names the field."""


@dataclass(frozen=True)
class ServingOptions:
    """Switches the handler honours on CUDA only (CPU always runs exact fp32)."""

    cuda_half: bool = False
    cuda_channels_last: bool = False

    def to_dict(self) -> dict[str, bool]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class RuntimeExport:
    """One runtime's model file in an export and the figures that say it may be served.

    fp32 runtimes (``torchscript``, ``onnx``): ``parity`` holds the max logit difference to
    the eager model and ``argmax_equal`` (the export fails unless every pixel agrees). INT8
    (``onnx_int8``): ``parity`` holds the argmax agreement fraction (no hard equality) and the
    recipe's ``max_miou_drop``; ``val_miou``/``val_miou_fp32``/``miou_drop`` are the
    validation-split mIoU of the INT8 and the TorchScript model and their difference.

    >>> RuntimeExport("model.int8.onnx", {"max_miou_drop": 0.05}, 0.80, 0.82, 0.02).passed
    True
    """

    file: str
    parity: Mapping[str, Any] = field(default_factory=dict)
    val_miou: float | None = None
    val_miou_fp32: float | None = None
    miou_drop: float | None = None

    @property
    def passed(self) -> bool:
        """True when the export-time check holds: argmax equal (fp32) or the mIoU drop within
        ``parity.max_miou_drop`` (INT8)."""
        if self.miou_drop is not None:
            limit = self.parity.get("max_miou_drop")
            return isinstance(limit, (int, float)) and self.miou_drop <= limit
        return self.parity.get("argmax_equal") is True

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"file": self.file, "parity": dict(self.parity)}
        for name in ("val_miou", "val_miou_fp32", "miou_drop"):
            if getattr(self, name) is not None:
                data[name] = getattr(self, name)
        return data


@dataclass(frozen=True)
class DriftReference:
    """What the model predicts on its validation split: the baseline live traffic is compared
    with (drift monitoring). Per class, the mean share of an image's pixels over every image,
    and the mean confidence over the class's pixels over the images where it appears: the
    statistics of the handler's ``segserve_class_pixel_fraction`` and
    ``segserve_class_confidence`` histograms (sum / count), measured the same way.
    """

    class_pixel_fraction: Mapping[str, float]
    class_confidence: Mapping[str, float]  # classes never predicted have no entry
    images: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "class_pixel_fraction": dict(self.class_pixel_fraction),
            "class_confidence": dict(self.class_confidence),
            "images": self.images,
        }


@dataclass(frozen=True)
class ExportInfo:
    """How the export was made: ``model.pt``'s format and method, the torch version, and one
    :class:`RuntimeExport` per runtime the export carries (``torchscript`` always)."""

    format: str = "torchscript"
    method: str = "trace"
    torch_version: str = ""
    runtimes: Mapping[str, RuntimeExport] = field(default_factory=dict)

    @property
    def parity(self) -> Mapping[str, Any]:
        """TorchScript's parity figures (``{}`` when the export has none)."""
        ts = self.runtimes.get(TORCHSCRIPT)
        return ts.parity if ts is not None else {}

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "method": self.method,
            "torch_version": self.torch_version,
            "runtimes": {name: rt.to_dict() for name, rt in self.runtimes.items()},
        }


@dataclass(frozen=True)
class ModelMetadata:
    """Everything an export says about its model; ``to_dict()`` is the ``metadata.json``."""

    model_name: str
    model_version: str
    class_names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    preprocess: PreprocessSpec
    ignore_index: int = 255
    architecture: str = ""
    encoder: str = ""
    encoder_weights: str | None = None
    metrics: Mapping[str, Any] = field(default_factory=dict)
    recipe: Mapping[str, Any] = field(default_factory=dict)  # the resolved training recipe
    source_checkpoint: str | None = None
    serving: ServingOptions = ServingOptions()
    export: ExportInfo | None = None  # None until the exporter has written model.pt
    drift_reference: DriftReference | None = None  # measured by the exporter on val images

    def __post_init__(self) -> None:
        # Built in code (training, tests) as well as parsed: the same checks, tuples stored.
        names = [str(n) for n in self.class_names]
        _check_classes(names, len(names))
        palette = _parse_palette([[int(c) for c in rgb] for rgb in self.palette], len(names))
        object.__setattr__(self, "class_names", tuple(names))
        object.__setattr__(self, "palette", palette)
        drift = self.drift_reference
        if drift is not None and set(drift.class_pixel_fraction) != set(names):
            raise MetadataError(
                f"metadata 'drift_reference'.class_pixel_fraction needs every class {names}, "
                f"got {sorted(drift.class_pixel_fraction)}"
            )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_dict(self) -> dict[str, Any]:
        """The ``metadata.json`` object (key order as written since schema_version 1)."""
        data: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "model_name": self.model_name,
            "model_version": self.model_version,
            "architecture": self.architecture,
            "encoder": self.encoder,
            "encoder_weights": self.encoder_weights,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "palette": [list(rgb) for rgb in self.palette],
            "ignore_index": self.ignore_index,
            "preprocess": self.preprocess.to_dict(),
            "metrics": dict(self.metrics),
            "recipe": dict(self.recipe),
            "source_checkpoint": self.source_checkpoint,
            "serving": self.serving.to_dict(),
        }
        if self.export is not None:
            data["export"] = self.export.to_dict()
        if self.drift_reference is not None:
            data["drift_reference"] = self.drift_reference.to_dict()
        return data

    def to_json(self) -> str:
        """The exact text of ``metadata.json`` (and of the copy embedded in ``model.pt``)."""
        return json.dumps(self.to_dict(), indent=2)


def _require(data: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    if key not in data:
        raise MetadataError(f"metadata lacks {key!r}: re-export the model with `make export`")
    value = data[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise MetadataError(f"metadata {key!r} must be {kind}, got {value!r}")
    return value


def _check_classes(names: Any, num_classes: int) -> None:
    if num_classes < 2:
        raise MetadataError(f"metadata 'num_classes' must be >= 2, got {num_classes}")
    if not isinstance(names, list) or len(names) != num_classes:
        ok = False
    else:
        ok = all(isinstance(n, str) and n for n in names)
    if not ok:
        raise MetadataError(
            f"metadata 'class_names' needs num_classes={num_classes} non-empty strings, "
            f"got {names!r}"
        )
    if len(set(names)) != len(names):
        raise MetadataError(f"metadata 'class_names' has duplicates: {names!r}")


def _parse_palette(raw: Any, num_classes: int) -> tuple[tuple[int, int, int], ...]:
    if not isinstance(raw, list) or len(raw) != num_classes:
        got = len(raw) if isinstance(raw, list) else type(raw).__name__
        raise MetadataError(
            f"metadata 'palette' needs num_classes={num_classes} entries, got {got}"
        )
    palette = []
    for i, colour in enumerate(raw):
        ok = isinstance(colour, list) and len(colour) == 3
        ok = ok and all(isinstance(c, int) and not isinstance(c, bool) for c in colour)
        if not ok or not all(0 <= c <= 255 for c in colour):
            raise MetadataError(
                f"metadata 'palette'[{i}] must be [r, g, b] in 0..255, got {colour}"
            )
        palette.append((colour[0], colour[1], colour[2]))
    return tuple(palette)


def _parse_serving(raw: Any) -> ServingOptions:
    if raw is None:
        return ServingOptions()
    if not isinstance(raw, Mapping):
        raise MetadataError(f"metadata 'serving' must be an object, got {raw!r}")
    known = [f.name for f in fields(ServingOptions)]
    unknown = set(raw) - set(known)
    if unknown:
        raise MetadataError(
            f"metadata 'serving' has unknown keys {sorted(unknown)}; valid: {known}"
        )
    return ServingOptions(**{k: bool(raw[k]) for k in known if k in raw})


def _parse_runtime(name: str, raw: Any) -> RuntimeExport:
    where = f"metadata 'export.runtimes.{name}'"
    if not isinstance(raw, Mapping):
        raise MetadataError(f"{where} must be an object, got {raw!r}")
    file, parity = raw.get("file"), raw.get("parity")
    parity = {} if parity is None else parity
    if not isinstance(file, str) or not file or Path(file).name != file:
        raise MetadataError(f"{where}.file must be a file name in the export, got {file!r}")
    if not isinstance(parity, Mapping):
        raise MetadataError(f"{where}.parity must be an object, got {parity!r}")
    figures = {}
    for key in ("val_miou", "val_miou_fp32", "miou_drop"):
        value = raw.get(key)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
            raise MetadataError(f"{where}.{key} must be a number, got {value!r}")
        figures[key] = None if value is None else float(value)
    return RuntimeExport(file=file, parity=dict(parity), **figures)


def _parse_runtimes(raw: Mapping[str, Any]) -> dict[str, RuntimeExport]:
    runtimes = raw.get("runtimes")
    if runtimes is None:
        # An export from before the runtimes section: TorchScript's parity at the top level,
        # ONNX (if written) under "onnx".
        parity, onnx = raw.get("parity") or {}, raw.get("onnx")
        legacy: dict[str, Any] = {TORCHSCRIPT: {"file": MODEL_FILE, "parity": parity}}
        if onnx is not None:
            if not isinstance(onnx, Mapping):
                raise MetadataError(f"metadata 'export.onnx' must be an object, got {onnx!r}")
            legacy[ONNX] = {"file": ONNX_FILE, **onnx}
        runtimes = legacy
    if not isinstance(runtimes, Mapping):
        raise MetadataError(f"metadata 'export.runtimes' must be an object, got {runtimes!r}")
    # Runtimes this version does not know are skipped: it can still serve the ones it knows.
    return {n: _parse_runtime(n, runtimes[n]) for n in RUNTIMES if n in runtimes}


def _parse_export(raw: Any) -> ExportInfo | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise MetadataError(f"metadata 'export' must be an object, got {raw!r}")
    return ExportInfo(
        format=str(raw.get("format", "torchscript")),
        method=str(raw.get("method", "trace")),
        torch_version=str(raw.get("torch_version", "")),
        runtimes=_parse_runtimes(raw),
    )


def _parse_drift(raw: Any, class_names: tuple[str, ...]) -> DriftReference | None:
    if raw is None:
        return None
    where = "metadata 'drift_reference'"
    if not isinstance(raw, Mapping):
        raise MetadataError(f"{where} must be an object, got {raw!r}")
    parsed = {}
    for key in ("class_pixel_fraction", "class_confidence"):
        values = raw.get(key)
        if not isinstance(values, Mapping) or not set(values) <= set(class_names):
            raise MetadataError(f"{where}.{key} must map class names to numbers, got {values!r}")
        if not all(isinstance(v, int | float) and 0 <= v <= 1 for v in values.values()):
            raise MetadataError(f"{where}.{key} values must be in [0, 1], got {values!r}")
        parsed[key] = {name: float(values[name]) for name in class_names if name in values}
    if set(parsed["class_pixel_fraction"]) != set(class_names):
        raise MetadataError(f"{where}.class_pixel_fraction needs every class {list(class_names)}")
    images = raw.get("images")
    if not isinstance(images, int) or isinstance(images, bool) or images < 1:
        raise MetadataError(f"{where}.images must be a positive integer, got {images!r}")
    return DriftReference(parsed["class_pixel_fraction"], parsed["class_confidence"], images)


def _mapping(data: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key) or {}
    return dict(value) if isinstance(value, Mapping) else {}


def parse_metadata(data: Mapping[str, Any]) -> ModelMetadata:
    """Validate a metadata dict (``num_classes == len(class_names) == len(palette)``, ...)."""
    if not isinstance(data, Mapping):
        raise MetadataError(f"metadata must be a JSON object, got {type(data).__name__}")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise MetadataError(
            f"metadata 'schema_version' is {version!r}; this handler reads {SCHEMA_VERSION}"
        )
    num_classes = _require(data, "num_classes", int)
    names = _require(data, "class_names", list)
    _check_classes(names, num_classes)
    try:
        preprocess = PreprocessSpec.from_dict(_require(data, "preprocess", Mapping))
    except (TypeError, ValueError) as exc:
        raise MetadataError(f"metadata 'preprocess' is invalid: {exc}") from None
    weights, source = data.get("encoder_weights"), data.get("source_checkpoint")
    return ModelMetadata(
        model_name=str(_require(data, "model_name", str)),
        model_version=str(data.get("model_version", "")),
        class_names=tuple(names),
        palette=_parse_palette(data.get("palette"), num_classes),
        preprocess=preprocess,
        ignore_index=int(data.get("ignore_index", 255)),
        architecture=str(data.get("architecture", "")),
        encoder=str(data.get("encoder", "")),
        encoder_weights=None if weights is None else str(weights),
        metrics=_mapping(data, "metrics"),
        recipe=_mapping(data, "recipe"),
        source_checkpoint=None if source is None else str(source),
        serving=_parse_serving(data.get("serving")),
        export=_parse_export(data.get("export")),
        drift_reference=_parse_drift(data.get("drift_reference"), tuple(names)),
    )


def runtime_export(meta: ModelMetadata, runtime: str) -> RuntimeExport:
    """``meta``'s section for ``runtime``, or a :class:`MetadataError` that says how to get it.

    >>> meta = parse_metadata({"schema_version": 1, "model_name": "m", "num_classes": 2,
    ...     "class_names": ["a", "b"], "palette": [[0, 0, 0], [1, 1, 1]],
    ...     "preprocess": {"input_size": [32, 32]}})
    >>> runtime_export(meta, "torchscript").file
    'model.pt'
    >>> try:
    ...     runtime_export(meta, "onnx")
    ... except MetadataError as exc:
    ...     print(str(exc)[:71])
    export has no model.onnx: re-export with export.runtimes including onnx
    """
    if runtime not in RUNTIMES:
        raise MetadataError(f"runtime {runtime!r} is not one of {list(RUNTIMES)}")
    runtimes = meta.export.runtimes if meta.export is not None else {}
    if runtime in runtimes:
        return runtimes[runtime]
    if runtime == TORCHSCRIPT:  # every export has model.pt, figures or not
        return RuntimeExport(MODEL_FILE)
    raise MetadataError(
        f"export has no {RUNTIME_FILES[runtime]}: re-export with export.runtimes including "
        f"{runtime} (`make export RUNTIMES=torchscript,{runtime}`)"
    )


def load_metadata(path: str | Path) -> ModelMetadata:
    """Read and validate ``metadata.json``; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise MetadataError(f"{path} not found: export the model first (`make export`)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MetadataError(f"{path} is not readable JSON: {exc}") from None
    try:
        return parse_metadata(data)
    except MetadataError as exc:
        raise MetadataError(f"{path}: {exc}") from None

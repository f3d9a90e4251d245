"""The model metadata (``metadata.json``, schema_version 1): parsed and checked once.

Training writes it, the archive carries it, the handler reads it; nothing downstream
hardcodes classes, sizes or colours. Every check names the bad field and what it must be.

Example:
    >>> meta = parse_metadata({
    ...     "schema_version": 1, "model_name": "segmenter", "model_version": "1.0",
    ...     "num_classes": 2, "class_names": ["background", "cat"],
    ...     "palette": [[0, 0, 0], [255, 0, 0]],
    ...     "preprocess": {"input_size": [64, 64]},
    ... })
    >>> meta.num_classes, meta.preprocess.input_size, meta.serving.cuda_half
    (2, (64, 64), False)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from handler.preprocessing import PreprocessSpec

SCHEMA_VERSION = 1


class MetadataError(ValueError):
    """``metadata.json`` is missing, unreadable or inconsistent; the message names the field."""


@dataclass(frozen=True)
class ServingOptions:
    """Switches the handler honours on CUDA only (CPU always runs exact fp32)."""

    cuda_half: bool = False
    cuda_channels_last: bool = False


@dataclass(frozen=True)
class ModelMetadata:
    """What the handler needs to know about the model it serves."""

    model_name: str
    model_version: str
    num_classes: int
    class_names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    preprocess: PreprocessSpec
    ignore_index: int = 255
    architecture: str = ""
    encoder: str = ""
    metrics: Mapping[str, Any] = field(default_factory=dict)
    source_checkpoint: str = ""
    serving: ServingOptions = ServingOptions()
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)


def _require(data: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    if key not in data:
        raise MetadataError(f"metadata lacks {key!r}: re-export the model with `make export`")
    value = data[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise MetadataError(f"metadata {key!r} must be {kind}, got {value!r}")
    return value


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
    unknown = set(raw) - {"cuda_half", "cuda_channels_last"}
    if unknown:
        raise MetadataError(
            f"metadata 'serving' has unknown keys {sorted(unknown)}; "
            "valid: ['cuda_half', 'cuda_channels_last']"
        )
    return ServingOptions(
        cuda_half=bool(raw.get("cuda_half", False)),
        cuda_channels_last=bool(raw.get("cuda_channels_last", False)),
    )


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
    if num_classes < 2:
        raise MetadataError(f"metadata 'num_classes' must be >= 2, got {num_classes}")
    names = _require(data, "class_names", list)
    if len(names) != num_classes or not all(isinstance(n, str) and n for n in names):
        raise MetadataError(
            f"metadata 'class_names' needs num_classes={num_classes} non-empty strings, "
            f"got {names!r}"
        )
    if len(set(names)) != len(names):
        raise MetadataError(f"metadata 'class_names' has duplicates: {names!r}")
    try:
        preprocess = PreprocessSpec.from_dict(_require(data, "preprocess", Mapping))
    except (TypeError, ValueError) as exc:
        raise MetadataError(f"metadata 'preprocess' is invalid: {exc}") from None
    metrics = data.get("metrics") or {}
    return ModelMetadata(
        model_name=str(_require(data, "model_name", str)),
        model_version=str(data.get("model_version", "")),
        num_classes=num_classes,
        class_names=tuple(names),
        palette=_parse_palette(data.get("palette"), num_classes),
        preprocess=preprocess,
        ignore_index=int(data.get("ignore_index", 255)),
        architecture=str(data.get("architecture", "")),
        encoder=str(data.get("encoder", "")),
        metrics=dict(metrics) if isinstance(metrics, Mapping) else {},
        source_checkpoint=str(data.get("source_checkpoint", "")),
        serving=_parse_serving(data.get("serving")),
        raw=dict(data),
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

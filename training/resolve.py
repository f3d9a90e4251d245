"""Recipe + dataset info → the model's :class:`~handler.artifact.ModelMetadata` (without its
``export`` section, which the exporter adds).

:func:`resolve_preprocess_spec` is the one place where input size, resize policy and mean/std
are decided; training's transforms, the checkpoint, the export and the serving handler all
take the resulting :class:`~handler.preprocessing.PreprocessSpec` from here, never their own.

Example:
    >>> from training.config import Recipe
    >>> spec = resolve_preprocess_spec(Recipe())
    >>> spec.input_size, spec.mean
    ((128, 128), (0.485, 0.456, 0.406))
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

import segmentation_models_pytorch as smp

from handler.artifact import ModelMetadata
from handler.preprocessing import IMAGENET_MEAN, IMAGENET_STD, PreprocessSpec
from training.config import BISENET_ARCH, Recipe
from training.model import output_stride


class DatasetInfoLike(Protocol):
    """What metadata needs from ``training.datasets.DatasetInfo``."""

    class_names: Any
    palette: Any
    ignore_index: int


def encoder_normalisation(
    encoder: str, weights: str | None
) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The mean/std the encoder's pretrained weights were trained with, or None if unknown.

    Never touches the network: smp 0.6 reads these from a ``config.json`` on the Hugging Face
    hub, so only a cached copy (fetched along with the weights) is used. timm encoders carry
    theirs in the installed package.
    """
    if weights is None:
        return None  # random init: no statistics to match
    try:
        if encoder.startswith("tu-"):
            import timm

            cfg = timm.models.get_pretrained_cfg(encoder[3:])
            mean, std = cfg.mean, cfg.std
        else:
            import json

            from huggingface_hub import hf_hub_download

            settings = smp.encoders.encoders[encoder]["pretrained_settings"][weights]
            path = hf_hub_download(
                settings["repo_id"],
                filename="config.json",
                revision=settings["revision"],
                local_files_only=True,
            )
            with open(path) as f:
                data = json.load(f)
            mean, std = data["mean"], data["std"]
            if list(data.get("input_range", [0, 1])) != [0, 1]:
                return None  # our prepare_image scales to [0, 1]; other ranges don't apply
    except Exception:  # not cached, no such model, malformed config: fall back to ImageNet
        return None
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def resolve_preprocess_spec(recipe: Recipe) -> PreprocessSpec:
    """Input size, resize policy and normalisation: the recipe's values, else the encoder's,
    else ImageNet's.

    Example:
        >>> from training.config import recipe_from_dict
        >>> r = recipe_from_dict({"data": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}})
        >>> resolve_preprocess_spec(r).std
        (0.25, 0.25, 0.25)
    """
    data = recipe.data
    if data.mean is not None and data.std is not None:
        mean, std = tuple(data.mean), tuple(data.std)
    else:
        found = encoder_normalisation(recipe.model.encoder, recipe.model.encoder_weights)
        mean, std = found if found else (IMAGENET_MEAN, IMAGENET_STD)
    return PreprocessSpec(
        input_size=tuple(data.input_size),
        resize_policy=data.resize_policy,
        # the model's total downsampling: the handler pads every batch to a multiple of it
        size_divisor=output_stride(recipe.model),
        mean=mean,
        std=std,
    )


def _finite(value: Any) -> Any:
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def metrics_summary(metrics: dict | None, class_names: Sequence[str]) -> dict[str, Any]:
    """Validation metrics → the metadata's ``metrics`` section (per-class IoU keyed by name).

    ``nan`` (a class absent from the validation set) becomes ``None``: JSON has no NaN.
    """
    if not metrics:
        return {}
    out: dict[str, Any] = {}
    for key in ("miou", "pixel_accuracy", "mean_accuracy", "mean_dice", "boundary_f1"):
        if key in metrics:
            out[key] = _finite(metrics[key])
    if "per_class_iou" in metrics:
        per_class = metrics["per_class_iou"]
        if isinstance(per_class, dict):
            out["per_class_iou"] = {k: _finite(v) for k, v in per_class.items()}
        else:
            out["per_class_iou"] = {
                n: _finite(v) for n, v in zip(class_names, per_class, strict=False)
            }
    return out


def build_metadata(
    recipe: Recipe,
    info: DatasetInfoLike,
    spec: PreprocessSpec,
    metrics: dict | None,
    source_checkpoint: str | None,
) -> ModelMetadata:
    """The model metadata, every field but ``export`` (set by the exporter).

    Example:
        >>> from types import SimpleNamespace
        >>> info = SimpleNamespace(class_names=["bg", "fg"], palette=[[0, 0, 0], [255, 0, 0]],
        ...                        ignore_index=255)
        >>> meta = build_metadata(Recipe(), info, resolve_preprocess_spec(Recipe()), None, None)
        >>> meta.num_classes, meta.to_dict()["preprocess"]["input_size"]
        (2, [128, 128])
    """
    class_names = [str(n) for n in info.class_names]
    palette = [[int(c) for c in rgb] for rgb in info.palette]
    if len(palette) != len(class_names) or any(len(rgb) != 3 for rgb in palette):
        raise ValueError(
            f"dataset info: {len(class_names)} class names but {len(palette)} palette entries; "
            "need one RGB triple per class"
        )
    return ModelMetadata(
        model_name=recipe.export.model_name,
        model_version=recipe.export.model_version,
        architecture=recipe.model.arch,
        # BiSeNetV2 has no separate encoder (model.encoder does not apply to it)
        encoder="" if recipe.model.arch.lower() == BISENET_ARCH.lower() else recipe.model.encoder,
        encoder_weights=recipe.model.encoder_weights,
        class_names=tuple(class_names),
        palette=tuple(tuple(rgb) for rgb in palette),
        ignore_index=int(info.ignore_index),
        preprocess=spec,
        metrics=metrics_summary(metrics, class_names),
        recipe=recipe.to_dict(),
        source_checkpoint=source_checkpoint,
    )

"""Build any segmentation_models_pytorch model from the recipe, and rebuild one from a checkpoint.

There is no model registry of our own: ``smp.create_model`` is the registry, and its lists of
architectures and encoders are what an error message offers. The one architecture smp lacks,
the real-time BiSeNetV2 (``training/bisenet.py``), is the single other choice of
``model.arch``, built here by the same :func:`build_model`. Pretrained encoder weights are
downloaded by smp from the Hugging Face hub; offline that download retries for ~23 s and ends
in a bare traceback, so :func:`build_model` checks first and fails fast with the fix.

Example:
    >>> from training.config import ModelConfig
    >>> model = build_model(ModelConfig(arch="Unet", encoder="resnet18"), num_classes=3)
    >>> model(torch.zeros(1, 3, 64, 64)).shape
    torch.Size([1, 3, 64, 64])
"""

from __future__ import annotations

import inspect
import os
import socket
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import segmentation_models_pytorch as smp
import torch

from handler.preprocessing import SIZE_DIVISOR
from training.bisenet import BiSeNetV2
from training.config import BISENET_ARCH, ConfigError, DistillConfig, ModelConfig, recipe_from_dict

PROBE_TIMEOUT_S = 3.0


def architectures() -> list[str]:
    """smp's architecture names, spelt as their classes (``Unet``, ``DeepLabV3Plus``...), and
    ``BiSeNetV2``."""
    by_lower = {name.lower(): name for name in dir(smp) if name[:1].isupper()}
    return [by_lower.get(key, key) for key in smp.MODEL_ARCHITECTURES_MAPPING] + [BISENET_ARCH]


def is_bisenet(cfg: ModelConfig) -> bool:
    """``model.arch`` names BiSeNetV2 (any case, like smp's names).

    >>> is_bisenet(ModelConfig(arch="bisenetv2")), is_bisenet(ModelConfig(arch="Unet"))
    (True, False)
    """
    return cfg.arch.lower() == BISENET_ARCH.lower()


def output_stride(cfg: ModelConfig) -> int:
    """The multiple H and W must be padded to (the metadata's ``preprocess.size_divisor``).

    >>> output_stride(ModelConfig(arch="BiSeNetV2")), output_stride(ModelConfig())
    (32, 32)
    """
    return BiSeNetV2.output_stride if is_bisenet(cfg) else SIZE_DIVISOR


def check_model_config(cfg: ModelConfig) -> None:
    """Raise :class:`ConfigError` for an unknown architecture, encoder or weights name."""
    if is_bisenet(cfg):
        _check_bisenet(cfg)
        return
    if cfg.arch.lower() not in smp.MODEL_ARCHITECTURES_MAPPING:
        raise ConfigError(
            f"model.arch: {cfg.arch!r} is not an smp architecture; choose one of {architectures()}"
        )
    _check_kwargs(cfg)
    if cfg.encoder.startswith("tu-"):
        _check_timm_encoder(cfg.encoder)
        return
    names = smp.encoders.get_encoder_names()
    if cfg.encoder not in names:
        raise ConfigError(
            f"model.encoder: {cfg.encoder!r} is not an smp encoder; choose one of {names} "
            "or a timm model as 'tu-<name>'"
        )
    if cfg.encoder_weights is not None:
        available = list(smp.encoders.encoders[cfg.encoder]["pretrained_settings"])
        if cfg.encoder_weights not in available:
            raise ConfigError(
                f"model.encoder_weights: {cfg.encoder_weights!r} does not exist for "
                f"{cfg.encoder}; choose one of {available} or null"
            )


# Set by the recipe's own fields, or would change the output away from raw per-class logits
# that the loss, the metrics and the serving handler all expect.
_RESERVED_KWARGS = {
    "encoder_name",
    "encoder_weights",
    "classes",
    "in_channels",
    "activation",
    "aux_params",
}


def _check_kwargs(cfg: ModelConfig) -> None:
    """smp forwards unknown kwargs to the encoder, which silently drops them: refuse instead."""
    cls = smp.MODEL_ARCHITECTURES_MAPPING[cfg.arch.lower()]
    params = inspect.signature(cls.__init__).parameters
    allowed = sorted(
        n
        for n, p in params.items()
        if n != "self" and n not in _RESERVED_KWARGS and p.kind is not p.VAR_KEYWORD
    )
    for key in cfg.kwargs:
        if key in _RESERVED_KWARGS:
            raise ConfigError(
                f"model.kwargs.{key}: set by segserve itself (the model must return raw logits "
                "for every class); remove it"
            )
        if key not in allowed and not cfg.encoder.startswith("tu-"):
            raise ConfigError(
                f"model.kwargs.{key}: {cfg.arch} takes no such argument; allowed: {allowed}"
            )


def _check_bisenet(cfg: ModelConfig) -> None:
    """BiSeNetV2 is its own backbone: no smp encoder, no pretrained weights; its kwargs are
    :class:`~training.bisenet.BiSeNetV2`'s (``num_classes`` is the dataset's)."""
    if cfg.encoder != ModelConfig().encoder:
        raise ConfigError(
            f"model.encoder: {cfg.encoder!r} does not apply to {BISENET_ARCH} (its detail and "
            "semantic branches are its backbone); remove model.encoder, or pick an smp arch"
        )
    if cfg.encoder_weights is not None:
        raise ConfigError(
            f"model.encoder_weights: {BISENET_ARCH} has no pretrained encoder (it trains from "
            "scratch); set model.encoder_weights: null"
        )
    params = inspect.signature(BiSeNetV2.__init__).parameters
    allowed = sorted(n for n in params if n not in ("self", "num_classes"))
    for key in cfg.kwargs:
        if key in _RESERVED_KWARGS or key == "num_classes":
            raise ConfigError(
                f"model.kwargs.{key}: set by segserve itself (the model must return raw logits "
                "for every class); remove it"
            )
        if key not in allowed:
            raise ConfigError(
                f"model.kwargs.{key}: {BISENET_ARCH} takes no such argument; allowed: {allowed}"
            )


def _check_timm_encoder(encoder: str) -> None:
    import timm

    name = encoder[3:].split(".")[0]
    if not timm.list_models(name):
        raise ConfigError(
            f"model.encoder: {encoder!r}: timm has no model {name!r}; "
            "see timm.list_models() for the names"
        )


def offline_message(encoder: str) -> str:
    return (
        f"model.encoder_weights: pretrained weights for {encoder} need internet; "
        "set model.encoder_weights: null or pre-download to $TORCH_HOME "
        "(smp 0.6 keeps them in the Hugging Face cache, $HF_HOME)"
    )


def _weights_cached(encoder: str, weights: str) -> bool:
    """True when smp's download of these weights would be served from the local cache."""
    if encoder.startswith("tu-"):
        return False  # timm resolves its own file names; only the network probe decides
    from huggingface_hub import hf_hub_download

    settings = smp.encoders.encoders[encoder]["pretrained_settings"][weights]
    try:
        for filename in ("config.json", "model.safetensors"):
            hf_hub_download(
                settings["repo_id"],
                filename=filename,
                revision=settings["revision"],
                local_files_only=True,
            )
    except Exception:  # any miss (not cached, no cache dir) means "would download"
        return False
    return True


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Can we open a TCP connection to the Hugging Face hub within ``timeout`` seconds?

    Name resolution has no timeout of its own, so the probe runs in a daemon thread.
    """
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or 443
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def ensure_weights_available(cfg: ModelConfig) -> None:
    """Fail in seconds, with the fix, when pretrained weights cannot be had."""
    if cfg.encoder_weights is None or _weights_cached(cfg.encoder, cfg.encoder_weights):
        return
    if not hub_reachable():
        raise ConfigError(offline_message(cfg.encoder))


def build_model(cfg: ModelConfig, num_classes: int) -> torch.nn.Module:
    """``smp.create_model`` from the recipe's model section, with errors that name the fix.

    Example:
        >>> m = build_model(ModelConfig(arch="FPN", encoder="resnet18"), num_classes=4)
        >>> m(torch.zeros(2, 3, 64, 64)).shape
        torch.Size([2, 4, 64, 64])
    """
    if num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
    check_model_config(cfg)
    if is_bisenet(cfg):
        try:
            return BiSeNetV2(num_classes, **cfg.kwargs)
        except (TypeError, ValueError) as exc:
            raise ConfigError(
                f"model.kwargs: cannot build {BISENET_ARCH} with {cfg.kwargs}: {exc}"
            ) from None
    ensure_weights_available(cfg)
    weights: Any = cfg.encoder_weights
    if cfg.encoder.startswith("tu-") and weights is not None:
        weights = True  # timm encoders take a bool; the variant is part of the name
    try:
        return smp.create_model(
            arch=cfg.arch,
            encoder_name=cfg.encoder,
            encoder_weights=weights,
            classes=num_classes,
            **cfg.kwargs,
        )
    except (TypeError, ValueError, KeyError, AssertionError, RuntimeError) as exc:
        raise ConfigError(
            f"model: smp cannot build {cfg.arch} with encoder {cfg.encoder} and "
            f"kwargs {cfg.kwargs}: {exc}"
        ) from None
    except OSError as exc:  # download failures (requests / huggingface_hub errors are OSErrors)
        raise ConfigError(f"{offline_message(cfg.encoder)} ({type(exc).__name__})") from None


def model_from_checkpoint(ckpt: dict) -> torch.nn.Module:
    """Rebuild the trained model from a checkpoint dict: CPU, eval mode, weights loaded.

    The architecture comes from the recipe stored in the checkpoint; pretrained weights are
    never downloaded again since the checkpoint already holds every weight.

    Example:
        >>> from training.checkpoint import load_checkpoint
        >>> model = model_from_checkpoint(load_checkpoint("runs/default/checkpoints/best.pt"))
        ... # doctest: +SKIP
    """
    for key in ("model", "recipe", "metadata"):
        if key not in ckpt:
            raise ConfigError(f"checkpoint lacks {key!r}: not written by segserve training")
    recipe = recipe_from_dict(ckpt["recipe"])
    recipe.model.encoder_weights = None
    model = build_model(recipe.model, int(ckpt["metadata"]["num_classes"]))
    model.load_state_dict(ckpt["model"])
    return model.to("cpu").eval()


def load_teacher(
    cfg: DistillConfig,
    class_names: Sequence[str],
    mean_std: tuple[Sequence[float], Sequence[float]],
    device: torch.device | str = "cpu",
) -> torch.nn.Module:
    """The distillation teacher: ``cfg.teacher``'s best checkpoint rebuilt, frozen, in eval
    mode, on ``device``; errors name ``train.distill.teacher`` and the fix.

    ``class_names`` and ``mean_std`` are the student's: the teacher must predict the same
    classes in the same order, from images normalised the same way (it sees the student's
    batches).
    """
    from training.checkpoint import CheckpointError, load_checkpoint

    key = "train.distill.teacher"
    run = Path(cfg.teacher)
    if not run.is_dir():
        raise ConfigError(
            f"{key}: {str(run)!r} is not a directory; give the run dir of a trained teacher "
            "(the --run-dir it was trained into)"
        )
    best = run / "checkpoints" / "best.pt"
    try:
        ckpt = load_checkpoint(best)
    except CheckpointError as exc:
        raise ConfigError(f"{key}: {exc} (train the teacher run first)") from None
    theirs = [str(n) for n in ckpt["metadata"].get("class_names", [])]
    if len(theirs) != len(class_names):
        raise ConfigError(
            f"{key}: {best} predicts {len(theirs)} classes, this recipe's data has "
            f"{len(class_names)}; distil from a teacher trained on the same classes (same "
            "data.kind and data.class_map)"
        )
    if theirs != [str(n) for n in class_names]:
        raise ConfigError(
            f"{key}: {best} predicts the classes {theirs}, this recipe's data has "
            f"{list(class_names)}; the teacher's classes must match, in order"
        )
    preprocess = ckpt["metadata"].get("preprocess", {})
    theirs_norm = (list(preprocess.get("mean", [])), list(preprocess.get("std", [])))
    ours_norm = (list(mean_std[0]), list(mean_std[1]))
    if [[float(v) for v in t] for t in theirs_norm] != [[float(v) for v in t] for t in ours_norm]:
        raise ConfigError(
            f"{key}: {best} was trained on images normalised with mean/std {theirs_norm}, this "
            f"recipe's are {ours_norm}; set data.mean and data.std to the teacher's"
        )
    # Building draws initial weights (overwritten by the checkpoint's) from torch's RNG; fork it
    # so the student's run sees the same random stream with or without a teacher.
    with torch.random.fork_rng(devices=[]):
        teacher = model_from_checkpoint(ckpt)
    for p in teacher.parameters():
        p.requires_grad_(False)  # frozen: no gradient, no optimiser state, no DDP sync
    return teacher.to(device).eval()

"""The page's one typed config: where TorchServe is, how to reach it, where the page listens.

Built from an optional YAML file (the same keys as the fields below) and the CLI's flags
(flags win); :func:`page_config` validates once, with messages that name the key.

Example:
    >>> page_config({"protocol": "grpc", "port": 7861}).grpc_target
    '127.0.0.1:7070'
    >>> page_config({"protocol": "soap"})
    Traceback (most recent call last):
    ...
    ui.config.PageConfigError: protocol: 'soap' is not one of ['rest', 'grpc']
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from client.grpc_client import DEFAULT_INFERENCE_TARGET
from client.rest import DEFAULT_INFERENCE_URL
from serving.properties import DEFAULT_MODEL_NAME

PROTOCOLS = ("rest", "grpc")
# Where `make demo` writes its sample images (training/synthetic.py via `training samples`).
DEFAULT_SAMPLES = Path("runs/default/samples")


class PageConfigError(ValueError):
    """A bad page setting; the message names the key and what it accepts."""


@dataclass(frozen=True)
class PageConfig:
    """Every setting of the page (``python -m ui --help`` lists the flags)."""

    inference_url: str = DEFAULT_INFERENCE_URL
    protocol: str = "rest"
    grpc_target: str = DEFAULT_INFERENCE_TARGET
    model_name: str = DEFAULT_MODEL_NAME
    # A bare token or TorchServe's key_file.json; None: $SEGSERVE_TOKEN, then ./key_file.json.
    token_file: Path | None = None
    host: str = "127.0.0.1"
    port: int = 7860
    samples: Path | None = DEFAULT_SAMPLES
    timeout_s: float = 30.0
    # The page's own upload limit. Above TorchServe's max_request_size (32 MiB in
    # config.properties) on purpose: a file between the two reaches the server, whose refusal
    # is the message the person sees; only a file past this one is stopped by the page.
    max_upload_mb: int = 64
    # Seconds between webcam frames sent for segmentation.
    webcam_interval_s: float = 0.5


def _fail(key: str, message: str) -> PageConfigError:
    return PageConfigError(f"{key}: {message}")


def _check(cfg: PageConfig) -> PageConfig:
    if cfg.protocol not in PROTOCOLS:
        raise _fail("protocol", f"{cfg.protocol!r} is not one of {list(PROTOCOLS)}")
    if not cfg.inference_url.startswith(("http://", "https://")):
        raise _fail("inference_url", f"{cfg.inference_url!r} must start with http:// or https://")
    if ":" not in cfg.grpc_target:
        raise _fail("grpc_target", f"{cfg.grpc_target!r} must be host:port")
    if not 0 < cfg.port < 65536:
        raise _fail("port", f"{cfg.port} is not a TCP port (1..65535)")
    for key in ("timeout_s", "webcam_interval_s"):
        if getattr(cfg, key) <= 0:
            raise _fail(key, f"must be > 0, got {getattr(cfg, key)}")
    if cfg.max_upload_mb < 1:
        raise _fail("max_upload_mb", f"must be >= 1, got {cfg.max_upload_mb}")
    if cfg.token_file is not None and not cfg.token_file.is_file():
        raise _fail("token_file", f"{cfg.token_file} is not a file")
    return cfg


def page_config(values: dict[str, Any] | None = None) -> PageConfig:
    """A validated :class:`PageConfig` from a mapping of field names (None values skipped)."""
    fields = {f.name: f for f in dataclasses.fields(PageConfig)}
    kwargs: dict[str, Any] = {}
    for key, value in (values or {}).items():
        if key not in fields:
            raise _fail(key, f"unknown setting; the settings are {sorted(fields)}")
        if value is None:
            continue
        default = fields[key].default
        try:
            if key in ("token_file", "samples"):
                kwargs[key] = Path(value)
            elif isinstance(default, (int, float)) and not isinstance(default, bool):
                kwargs[key] = type(default)(value)
            else:
                kwargs[key] = str(value)
        except (TypeError, ValueError):
            raise _fail(key, f"{value!r} is not a {type(default).__name__}") from None
    return _check(PageConfig(**kwargs))


def load_page_config(path: Path | None, overrides: dict[str, Any]) -> PageConfig:
    """``path``'s YAML mapping (if given) with ``overrides`` on top, validated."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise PageConfigError(f"{path}: not a readable YAML file ({exc})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise PageConfigError(f"{path}: must be a mapping of settings, got {type(loaded)}")
        values.update(loaded or {})
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return page_config(values)
    except PageConfigError as exc:
        where = f"{path}: " if path is not None else ""
        raise PageConfigError(f"{where}{exc}") from None

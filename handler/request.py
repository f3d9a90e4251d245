"""Find the image bytes and the wanted output format in one TorchServe request item.

How a request reaches the handler in TorchServe 0.12 (read from ``ts/service.py`` and the
frontend): each batch item is a dict of *input parameters*, headers are separate
(``context.get_all_request_header(idx)``), and query strings never arrive at all.

* REST, raw body: ``{"body": bytes}``; a ``text/*`` body arrives as ``str`` and an
  ``application/json`` body already parsed (dict/list).
* REST, multipart form: one key per field, e.g. ``{"data": bytes, "output": "color"}``.
* gRPC ``Predictions``: one key per entry of the ``input`` map, values are ``bytes``.

Output format, first match wins: the ``output`` field (multipart / gRPC / JSON), the
``X-Segserve-Output`` header, the ``Accept`` header (``image/png`` → mask, ``image/jpeg`` →
overlay_jpeg, ``application/json`` → json), else ``mask``.

Example:
    >>> req = parse_request({"data": b"\\x89PNG...", "output": b"color"}, headers={})
    >>> req.output, req.content_type, len(req.image)
    ('color', 'image/png', 7)
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from handler.errors import InputError, quote_input

OUTPUT_FORMATS = ("mask", "color", "overlay", "overlay_jpeg", "json")
DEFAULT_OUTPUT = "mask"
CONTENT_TYPES = {
    "mask": "image/png",
    "color": "image/png",
    "overlay": "image/png",
    "overlay_jpeg": "image/jpeg",
    "json": "application/json",
}
ACCEPT_FORMATS = {
    "image/png": "mask",
    "image/*": "mask",
    "*/*": DEFAULT_OUTPUT,
    "image/jpeg": "overlay_jpeg",
    "application/json": "json",
}
IMAGE_KEYS = ("data", "body", "image", "file")
OUTPUT_KEY = "output"
OUTPUT_HEADER = "x-segserve-output"


@dataclass(frozen=True)
class ParsedRequest:
    """The image file's bytes and how the answer must be encoded."""

    image: bytes
    output: str

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.output]


def _as_text(value: Any) -> str:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


def check_output(name: str, source: str) -> str:
    """``name`` normalised if it is a known format, else a 400 listing the valid ones."""
    output = name.strip().lower().replace("-", "_")
    if output not in OUTPUT_FORMATS:
        raise InputError(
            "bad_request", f"{source} {quote_input(name)} is not one of {list(OUTPUT_FORMATS)}"
        )
    return output


def output_from_accept(accept: str) -> str | None:
    """Format for an ``Accept`` header (q-values honoured); None when it is empty."""
    ranked = []
    for position, part in enumerate(p for p in accept.split(",") if p.strip()):
        media, *params = (x.strip() for x in part.split(";"))
        quality = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        if quality > 0:
            ranked.append((-quality, position, media.lower()))
    if not ranked:
        return None
    for _, _, media in sorted(ranked):
        if media in ACCEPT_FORMATS:
            return ACCEPT_FORMATS[media]
    raise InputError(
        "bad_request",
        f"Accept {quote_input(accept)} names nothing this model returns; use one of "
        f"{sorted(k for k in ACCEPT_FORMATS if '*' not in k)} or send the field "
        f"'output' as one of {list(OUTPUT_FORMATS)}",
    )


def _header(headers: Mapping[str, Any], name: str) -> str | None:
    # HTTP header names are case-insensitive; TorchServe passes them as the client spelt them,
    # mixed with per-parameter dicts ({"data": {"content-type": ...}}) that are skipped here.
    for key, value in headers.items():
        if isinstance(key, str) and key.lower() == name and isinstance(value, str):
            return value
    return None


def choose_output(item: Mapping[str, Any], headers: Mapping[str, Any]) -> str:
    """The output format for one request (see the module docstring for precedence)."""
    body = item.get("body")
    if isinstance(body, Mapping) and OUTPUT_KEY in body:
        return check_output(_as_text(body[OUTPUT_KEY]), "JSON field 'output'")
    if item.get(OUTPUT_KEY) is not None:
        return check_output(_as_text(item[OUTPUT_KEY]), "field 'output'")
    explicit = _header(headers, OUTPUT_HEADER)
    if explicit:
        return check_output(explicit, "header X-Segserve-Output")
    accept = _header(headers, "accept")
    return (output_from_accept(accept) if accept else None) or DEFAULT_OUTPUT


def _from_json(payload: Any) -> bytes:
    """A JSON body: ``{"image": "<base64>"}`` (also "data"); anything else is a 415."""
    if isinstance(payload, Mapping):
        for key in IMAGE_KEYS:
            if isinstance(payload.get(key), str):
                try:
                    return base64.b64decode(payload[key], validate=True)
                except (binascii.Error, ValueError):
                    raise InputError(
                        "bad_request", f"JSON field {key!r} is not valid base64"
                    ) from None
    raise InputError(
        "not_an_image",
        "the body is JSON without an 'image' field: send raw image bytes "
        "(Content-Type: application/octet-stream or image/*), a multipart field 'data', "
        'or JSON {"image": "<base64>"}',
    )


def _field_names(item: Mapping[str, Any], most: int = 8) -> str:
    """The request's field names for a message: escaped, bounded in length and number."""
    names = sorted(quote_input(k, limit=32) for k in item)
    shown = ", ".join(names[:most])
    return shown if len(names) <= most else f"{shown}, ... ({len(names)} fields)"


def pick_image_bytes(item: Mapping[str, Any]) -> bytes:
    """The image bytes of a request item, whatever way they were sent."""
    keys = [k for k in IMAGE_KEYS if item.get(k) is not None]
    if not keys:
        others = [k for k in item if k != OUTPUT_KEY]
        if len(others) != 1:
            raise InputError(
                "empty",
                f"no image in the request (fields: {_field_names(item)}); send the image as the "
                f"body, or as a multipart/gRPC field named one of {list(IMAGE_KEYS)}",
            )
        keys = others
    value = item[keys[0]]
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        # TorchServe decodes text/* bodies to str before the handler sees them.
        raise InputError(
            "not_an_image",
            "the body arrived as text (Content-Type text/*): send the image file's bytes "
            "with Content-Type application/octet-stream or image/*",
        )
    return _from_json(value)


def parse_request(item: Mapping[str, Any], headers: Mapping[str, Any]) -> ParsedRequest:
    """Both parts of a request, or an :class:`InputError` naming what is wrong."""
    if not isinstance(item, Mapping):
        raise InputError("bad_request", f"unexpected request item {type(item).__name__}")
    output = choose_output(item, headers)
    return ParsedRequest(image=pick_image_bytes(item), output=output)

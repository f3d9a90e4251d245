"""The one error type the handler answers a bad request with, and how input is echoed in it.

An :class:`InputError` carries a machine-readable ``reason`` (also the ``Reason`` label of
``segserve_rejected_inputs_total``), a message that says what to fix, and the HTTP status the
client gets for *its* request only; batch-mates are answered normally.

What reaches TorchServe's wire protocol must be short ASCII: TorchServe 0.12 frames the
per-request status phrase by its length in *characters* but sends it as UTF-8 bytes
(``ts/protocol/otf_message_handler.py``), so one non-ASCII character desynchronises the
worker's stream and kills it with its whole batch, and a long phrase breaks the HTTP status
line. The phrase is therefore always the standard reason phrase of the status
(:attr:`InputError.phrase`); the detail travels in the JSON body, whose text is ASCII-escaped
by ``json.dumps``. Client input quoted in a message goes through :func:`quote_input`, which
bounds and escapes it.

Example:
    >>> err = InputError("empty", "the request body is empty: send the image bytes")
    >>> err.status, err.phrase, err.body()["type"]
    (400, 'Bad Request', 'empty')
    >>> quote_input("masqu\\u00e9")
    "'masqu\\\\xe9'"
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

# The Reason values of segserve_rejected_inputs_total (docs/architecture.md).
REASONS = (
    "empty",
    "not_an_image",
    "too_many_pixels",
    "decode_limit",
    "truncated",
    "bad_request",
    "unencodable",
    "response_too_large",
    "model_output",
    "internal",
)
DEFAULT_STATUS = {
    "empty": 400,
    "not_an_image": 415,
    "too_many_pixels": 413,
    "decode_limit": 413,
    "truncated": 400,
    "bad_request": 400,
    "unencodable": 400,
    "response_too_large": 413,
    "model_output": 500,
    "internal": 500,
}
# How much of a client's value an error message quotes; the rest is counted, not echoed.
QUOTE_LIMIT = 64


def quote_input(value: Any, limit: int = QUOTE_LIMIT) -> str:
    """A client-supplied value for an error message: ASCII-escaped, at most ``limit`` chars.

    Bytes are decoded as UTF-8 with replacement first, so invalid UTF-8 cannot leak through.

    >>> quote_input(b"\\xff\\x00ok")
    "'\\\\ufffd\\\\x00ok'"
    >>> quote_input("x" * 100, limit=8)
    "'xxxxxxxx'... (100 characters)"

    The limit bounds the escaped text: an astral character escapes to ten ASCII characters.

    >>> quote_input("\\U0001d598" * 3, limit=24)
    "'\\\\U0001d598\\\\U0001d598'... (3 characters)"
    """
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("utf-8", "replace")
    text = value if isinstance(value, str) else str(value)
    kept = text[:limit]
    while len(ascii(kept)) > limit + 2:  # + the quotes; at most `limit` rounds
        kept = kept[:-1]
    quoted = ascii(kept)
    return quoted if kept == text else f"{quoted}... ({len(text)} characters)"


def status_phrase(status: int) -> str:
    """The standard ASCII reason phrase of an HTTP status ("Error" for unknown codes).

    >>> status_phrase(415), status_phrase(599)
    ('Unsupported Media Type', 'Error')
    """
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


class InputError(ValueError):
    """A request the handler refuses: 4xx (or a 5xx of its own), never a dead worker."""

    def __init__(self, reason: str, message: str, status: int | None = None) -> None:
        if reason not in REASONS:
            raise ValueError(f"InputError reason {reason!r} is not one of {list(REASONS)}")
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.status = DEFAULT_STATUS[reason] if status is None else int(status)

    @property
    def phrase(self) -> str:
        """What goes into ``context.set_response_status``: short, ASCII, never client input."""
        return status_phrase(self.status)

    def body(self) -> dict[str, Any]:
        """The JSON error body, shaped like TorchServe's own errors (code, type, message)."""
        return {"code": self.status, "type": self.reason, "message": self.message}

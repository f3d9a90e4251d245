"""The one error type the handler answers a bad request with.

An :class:`InputError` carries a machine-readable ``reason`` (also the ``Reason`` label of
``segserve_rejected_inputs_total``), a message that says what to fix, and the HTTP status the
client gets for *its* request only; batch-mates are answered normally.

Example:
    >>> err = InputError("empty", "the request body is empty: send the image bytes")
    >>> err.status, err.body()["type"]
    (400, 'empty')
"""

from __future__ import annotations

from typing import Any

# The Reason values of segserve_rejected_inputs_total (docs/architecture.md).
REASONS = ("empty", "not_an_image", "too_many_pixels", "truncated", "bad_request")
DEFAULT_STATUS = {
    "empty": 400,
    "not_an_image": 415,
    "too_many_pixels": 413,
    "truncated": 400,
    "bad_request": 400,
}


class InputError(ValueError):
    """A request the handler refuses: 4xx for that request, never a dead worker."""

    def __init__(self, reason: str, message: str, status: int | None = None) -> None:
        if reason not in REASONS:
            raise ValueError(f"InputError reason {reason!r} is not one of {list(REASONS)}")
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.status = DEFAULT_STATUS[reason] if status is None else int(status)

    def body(self) -> dict[str, Any]:
        """The JSON error body, shaped like TorchServe's own errors (code, type, message)."""
        return {"code": self.status, "type": self.reason, "message": self.message}

"""The model's workers on a running TorchServe: their pids, and waiting until they are READY.

Both read the management API through ``serving.server.describe_workers`` and
``serving.server.wait_workers_ready``, the one place that knows what a described worker looks
like (TorchServe's own startup wait uses them too). ``info`` is a ``serving.server.ServerInfo``.

Example:
    >>> old = wait_workers_ready(info)           # doctest: +SKIP
    >>> worker_pids(info) == old                 # doctest: +SKIP
    True
"""

from __future__ import annotations

from typing import Any

from loadtest.errors import ChaosError
from serving import server
from serving.properties import DEFAULT_MODEL_NAME

# One request to the management API; it answers at once even while the workers are busy.
REQUEST_TIMEOUT_S = 10.0


def worker_pids(info: Any, model: str = DEFAULT_MODEL_NAME) -> list[int]:
    """Pids of the model's workers, from the management API's describe output.

    Raises :class:`serving.server.ServerError` when the API does not answer 200.
    """
    workers = server.describe_workers(
        info.management_url, info.management_key, model, REQUEST_TIMEOUT_S
    )
    return [int(w["pid"]) for w in workers if w.get("pid")]


def wait_workers_ready(
    info: Any, model: str = DEFAULT_MODEL_NAME, timeout_s: float = 120
) -> list[int]:
    """Pids once every worker of ``model`` is READY (raises ChaosError after ``timeout_s``)."""
    try:
        workers = server.wait_workers_ready(
            info.management_url,
            info.management_key,
            model,
            timeout_s,
            request_timeout=REQUEST_TIMEOUT_S,
        )
    except server.ServerError as exc:
        raise ChaosError(str(exc)) from None
    return [int(w["pid"]) for w in workers]

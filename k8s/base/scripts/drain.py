"""preStop hook: let a TorchServe pod finish its work before Kubernetes sends SIGTERM.

1. Sleep ``--settle-seconds``: the pod is already NotReady and leaving the Service's endpoints,
   but kube-proxy, gateways and gRPC clients need a few seconds to stop sending to it.
2. Poll the management API until no model has queued requests (``jobQueueStatus.pendingRequests``
   of ``GET /models/<name>``) for ``--quiet-polls`` polls in a row, then wait
   ``--inflight-seconds`` for the batch already inside a worker (TorchServe exposes no busy flag).
3. Give up at ``--timeout-seconds`` (kept below terminationGracePeriodSeconds; the manifest
   test checks it covers the model's responseTimeout).

It always exits 0: a failing preStop only adds an event, and SIGTERM follows anyway.

Example:
    python drain.py --management-url http://127.0.0.1:8081 --settle-seconds 10 --timeout-seconds 130
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def pending_requests(descriptions: Sequence[Mapping[str, Any]]) -> int:
    """Queued requests over every version of a model (``GET /models/<name>`` body).

    >>> pending_requests([{"jobQueueStatus": {"pendingRequests": 3}}, {}])
    3
    """
    return sum(int(d.get("jobQueueStatus", {}).get("pendingRequests", 0)) for d in descriptions)


def _get_json(url: str, timeout: float, key: str | None) -> Any:
    request = urllib.request.Request(url)
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (local URL)
        return json.loads(response.read())


def total_pending(management_url: str, timeout: float = 3.0, key: str | None = None) -> int:
    """Queued requests over all registered models."""
    base = management_url.rstrip("/")
    models = _get_json(f"{base}/models?limit=1000", timeout, key).get("models", [])
    return sum(
        pending_requests(_get_json(f"{base}/models/{m['modelName']}", timeout, key)) for m in models
    )


def wait_until_drained(
    probe: Callable[[], int],
    timeout_s: float,
    quiet_polls: int = 2,
    poll_s: float = 1.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> bool:
    """True once ``probe()`` returned 0 ``quiet_polls`` times in a row, False on timeout.

    A probe that raises (server already gone) counts as drained: nothing is left to wait for.

    >>> wait_until_drained(iter([2, 0, 0]).__next__, 10, sleep=lambda s: None)
    True
    """
    deadline, quiet = clock() + timeout_s, 0
    while clock() < deadline:
        try:
            quiet = quiet + 1 if probe() == 0 else 0
        except OSError:
            return True
        if quiet >= quiet_polls:
            return True
        sleep(poll_s)
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--management-url", default="http://127.0.0.1:8081")
    parser.add_argument("--settle-seconds", type=float, default=10.0)
    parser.add_argument("--timeout-seconds", type=float, default=130.0)
    parser.add_argument("--inflight-seconds", type=float, default=5.0)
    parser.add_argument("--quiet-polls", type=int, default=2)
    parser.add_argument("--management-key", default=None, help="only if token auth is enabled")
    args = parser.parse_args(argv)
    started = time.monotonic()
    time.sleep(args.settle_seconds)
    left = max(0.0, args.timeout_seconds - args.settle_seconds)
    drained = wait_until_drained(
        lambda: total_pending(args.management_url, key=args.management_key),
        timeout_s=left,
        quiet_polls=args.quiet_polls,
    )
    if drained:
        time.sleep(
            min(
                args.inflight_seconds, max(0.0, args.timeout_seconds - (time.monotonic() - started))
            )
        )
    state = "drained" if drained else "timed out with requests still queued"
    print(f"drain: {state} after {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

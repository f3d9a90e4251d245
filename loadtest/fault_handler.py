"""Fault injection for the resilience tests and `make chaos`: the real handler plus a sleep.

``loadtest.fault_server.add_fault_handler`` packs this file into a copy of an archive as its entry
point, next to the archived ``segmenter_handler.py``; a production archive never contains it.
Everything the subclass serves is the production code path. TorchServe instantiates the
one class *defined* in the entry-point module (the imported ``SegmenterHandler`` does not count).
"""

from __future__ import annotations

import time

try:  # inside an extracted .mar: the entry point sits beside segmenter_handler.py
    from segmenter_handler import SegmenterHandler
except ImportError:  # in the repository (imported for linting and doctests)
    from handler.segmenter_handler import SegmenterHandler

# loadtest.fault_server.FAULT_HEADER as TorchServe passes header names on (compared lower-case).
FAULT_HEADER = "x-segserve-fault-sleep"
MAX_SLEEP_S = 600.0


def requested_sleep(headers_per_request: list[dict]) -> float:
    """The largest fault-header value of a batch in seconds, capped; 0 when none is valid.

    >>> requested_sleep([{"X-Segserve-Fault-Sleep": "1.5"}, {"x-segserve-fault-sleep": "x"}, {}])
    1.5
    """
    delays = [0.0]
    for headers in headers_per_request:
        for key, value in (headers or {}).items():
            if isinstance(key, str) and key.lower() == FAULT_HEADER:
                try:
                    delays.append(float(value))
                except (TypeError, ValueError):
                    pass
    return min(max(delays), MAX_SLEEP_S)


class FaultInjectingHandler(SegmenterHandler):
    """Sleeps for the largest ``X-Segserve-Fault-Sleep`` of the batch, then handles it."""

    def handle(self, data, context):
        headers = [context.get_all_request_header(idx) for idx in range(len(data))]
        time.sleep(requested_sleep(headers))
        return super().handle(data, context)

"""Retry idempotent calls with capped exponential backoff and jitter.

Only errors marked ``retryable`` are retried (connection refused, 502/503/504, gRPC UNAVAILABLE):
a 4xx means the request is wrong and sending it again cannot help.

Example:
    >>> policy = RetryPolicy(attempts=4, base_delay=0.1, max_delay=0.3, jitter=0.0)
    >>> [round(d, 2) for d in policy.delays()]
    [0.1, 0.2, 0.3]
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from client.errors import ClientError

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` counts the first try; ``jitter`` is the random fraction taken off a delay."""

    attempts: int = 4
    base_delay: float = 0.2
    max_delay: float = 5.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {self.attempts}")
        if self.base_delay < 0 or self.max_delay < 0:
            raise ValueError("base_delay and max_delay must be >= 0")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError(f"jitter must be in [0, 1], got {self.jitter}")

    def delays(self, rng: random.Random | None = None) -> Iterator[float]:
        """The pauses between attempts: ``attempts - 1`` values.

        Jitter spreads clients that failed together so they do not all come back at once.
        """
        rng = rng or random.Random()
        for i in range(self.attempts - 1):
            delay = min(self.max_delay, self.base_delay * 2**i)
            yield delay * (1.0 - self.jitter * rng.random())


NO_RETRY = RetryPolicy(attempts=1)


def call_with_retry(
    fn: Callable[[], T],
    policy: RetryPolicy,
    sleep: Callable[[float], None] = time.sleep,
    on_retry: Callable[[int, ClientError, float], None] | None = None,
) -> T:
    """Call ``fn`` until it succeeds, raises a non-retryable error, or attempts run out.

    A server's ``Retry-After`` (``error.retry_after``) lengthens the pause, capped at
    ``policy.max_delay``. The last error is re-raised unchanged.
    """
    delays = policy.delays()
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except ClientError as exc:
            if not exc.retryable:
                raise
            delay = next(delays, None)
            if delay is None:
                raise
            retry_after = getattr(exc, "retry_after", None)
            if retry_after:
                delay = min(policy.max_delay, max(delay, float(retry_after)))
            if on_retry is not None:
                on_retry(attempt, exc, delay)
            sleep(delay)

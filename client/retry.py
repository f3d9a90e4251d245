"""Retry idempotent calls with capped exponential backoff and jitter.

Only errors marked ``retryable`` are retried (connection refused, 502/503/504, gRPC UNAVAILABLE,
a killed worker): a 4xx means the request is wrong and sending it again cannot help.

A killed worker (:class:`client.errors.WorkerDied`, HTTP 507 "Worker died.") fails every request
of its batch; each is retried at most ``worker_died_retries`` times, whatever ``attempts`` says:
a request that was *in* two dying workers in a row is more likely their cause than their victim
(a poison input that makes the OOM killer strike), and it must not take the whole pool down.

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

from client.errors import ClientError, WorkerDied

T = TypeVar("T")
# ``on_retry(attempt, error, delay)``: called before the pause that precedes another attempt.
RetryCallback = Callable[[int, ClientError, float], None]


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` counts the first try; ``jitter`` is the random fraction taken off a delay.

    ``worker_died_retries`` bounds the retries after a killed worker (within ``attempts``);
    ``only_worker_died`` retries nothing else (a load test that must still count 503s).
    """

    attempts: int = 4
    base_delay: float = 0.2
    max_delay: float = 5.0
    jitter: float = 0.5
    worker_died_retries: int = 1
    only_worker_died: bool = False

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {self.attempts}")
        if self.base_delay < 0 or self.max_delay < 0:
            raise ValueError("base_delay and max_delay must be >= 0")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError(f"jitter must be in [0, 1], got {self.jitter}")
        if self.worker_died_retries < 0:
            raise ValueError(f"worker_died_retries must be >= 0, got {self.worker_died_retries}")

    def allows(self, error: ClientError, worker_deaths: int) -> bool:
        """Whether ``error`` may be retried after ``worker_deaths`` killed workers (this one
        included); ``attempts`` is checked separately."""
        if not error.retryable:
            return False
        if isinstance(error, WorkerDied):
            return worker_deaths <= self.worker_died_retries
        return not self.only_worker_died

    def delays(self, rng: random.Random | None = None) -> Iterator[float]:
        """The pauses between attempts: ``attempts - 1`` values.

        Jitter spreads clients that failed together so they do not all come back at once.
        """
        rng = rng or random.Random()
        for i in range(self.attempts - 1):
            delay = min(self.max_delay, self.base_delay * 2**i)
            yield delay * (1.0 - self.jitter * rng.random())


NO_RETRY = RetryPolicy(attempts=1)
# Retry a killed worker's requests once and nothing else: what the Locust users send, so a
# load test still counts every 503 and 5xx but not the bystanders of a worker kill.
WORKER_DIED_ONLY = RetryPolicy(attempts=2, worker_died_retries=1, only_worker_died=True)


def call_with_retry(
    fn: Callable[[], T],
    policy: RetryPolicy,
    sleep: Callable[[float], None] = time.sleep,
    on_retry: RetryCallback | None = None,
) -> T:
    """Call ``fn`` until it succeeds, raises an error ``policy`` does not retry, or attempts
    run out.

    A server's ``Retry-After`` (``error.retry_after``) lengthens the pause, capped at
    ``policy.max_delay``. The last error is re-raised unchanged.
    """
    delays = policy.delays()
    attempt = deaths = 0
    while True:
        attempt += 1
        try:
            return fn()
        except ClientError as exc:
            deaths += isinstance(exc, WorkerDied) and exc.killed
            if not policy.allows(exc, deaths):
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

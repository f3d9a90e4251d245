"""Pure statistics over request :class:`~loadtest.traffic.Outcome` lists: counts, latency
percentiles, success rates, recovery after a fault, requests in flight, worker restarts.

Example:
    >>> outcomes = [Outcome(0.0, 0.1, 200), Outcome(0.5, 0.6, 200), Outcome(1.0, 1.2, 503)]
    >>> summarize(outcomes)["failed"], summarize(outcomes)["statuses"]
    (1, {'200': 2, '503': 1})
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from loadtest.traffic import Outcome

if TYPE_CHECKING:
    from loadtest.traffic import ClientSender


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of ``values``; 0.0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100.0 * len(ordered) + 0.5)))
    return float(ordered[rank - 1])


def summarize(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    """Request count, failures, statuses and latency percentiles (ms) of successful requests."""
    latencies = [1000.0 * (o.end - o.start) for o in outcomes if o.ok]
    statuses = Counter(str(o.status) for o in outcomes)
    return {
        "requests": len(outcomes),
        "ok": sum(o.ok for o in outcomes),
        "failed": sum(not o.ok for o in outcomes),
        "statuses": dict(sorted(statuses.items())),
        "p50_ms": round(percentile(latencies, 50), 1),
        "p95_ms": round(percentile(latencies, 95), 1),
    }


def success_rate(outcomes: Sequence[Outcome], t0: float, t1: float) -> float:
    """Successful completions per second in ``[t0, t1)``."""
    if t1 <= t0:
        return 0.0
    return sum(1 for o in outcomes if o.ok and t0 <= o.end < t1) / (t1 - t0)


def recovery_figures(
    outcomes: Sequence[Outcome], t_event: float, window_s: float = 2.0, fraction: float = 0.8
) -> dict[str, float | None]:
    """How traffic came back after a fault at ``t_event`` (monotonic seconds).

    * ``first_success_s``: from the event to the completion of the first successful request
      *sent after* it (a request sent before may have been answered by the dying worker);
    * ``steady_s``: from the event to the start of the first ``window_s`` window whose
      success rate is at least ``fraction`` of the rate before the event (so it may lead the
      real return by up to ``window_s * (1 - fraction)``);
    * ``baseline_rps``: successes per second before the event.

    Example:
        >>> before = [Outcome(t / 10, t / 10 + 0.1, 200) for t in range(100)]    # 10/s to t=10
        >>> after = [Outcome(13 + t / 10, 13.1 + t / 10, 200) for t in range(50)]
        >>> recovery_figures(before + after, t_event=10.0)
        {'baseline_rps': 10.0, 'first_success_s': 3.1, 'steady_s': 2.7}
    """
    first_start = min((o.start for o in outcomes), default=t_event)
    baseline = success_rate(outcomes, first_start + 0.1 * (t_event - first_start), t_event)
    after = [o.end for o in outcomes if o.ok and o.start >= t_event]
    first = round(min(after) - t_event, 2) if after else None
    steady = None
    last_end = max((o.end for o in outcomes), default=t_event)
    t = t_event
    while t + window_s <= last_end + 1e-9 and baseline > 0:
        if success_rate(outcomes, t, t + window_s) >= fraction * baseline:
            steady = round(t - t_event, 2)
            break
        t += 0.1
    return {"baseline_rps": round(baseline, 2), "first_success_s": first, "steady_s": steady}


def in_flight_at(outcomes: Sequence[Outcome], t: float) -> int:
    """Requests started before ``t`` and not finished at ``t``."""
    return sum(1 for o in outcomes if o.start <= t < o.end)


def client_figures(sender: ClientSender, outcomes: Sequence[Outcome]) -> dict[str, Any]:
    """What the user of the client saw (``failed``) and what its retries absorbed."""
    return {
        "requests": len(outcomes),
        "failed": sum(not o.ok for o in outcomes),
        "retried": len(sender.retried),
        "retried_errors": sorted(set(sender.retried)),
        "failure_messages": sorted({o.error[:120] for o in outcomes if not o.ok}),
    }


def pid_changes(pid_sets: Sequence[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """The worker pid sets in the order seen, each repeat of the one before dropped: every
    set after the first is a worker restart.

    Example:
        >>> pid_changes([(7,), (7,), (8,), (8,), (7,)])
        [(7,), (8,), (7,)]
    """
    changes: list[tuple[int, ...]] = []
    for pids in pid_sets:
        if not changes or pids != changes[-1]:
            changes.append(pids)
    return changes

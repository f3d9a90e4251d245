"""Fault scenarios against a real TorchServe: kill a worker, overload the queue, time a model out.

``python -m loadtest.chaos --export-dir runs/default/export`` (``make chaos``) builds fault
archives from an export, starts one TorchServe per scenario on free ports, runs

* **worker_kill**: a bounded threaded request loop; SIGKILL the worker mid-run. Checks that the
  failed requests are no more than those in flight at the kill, and measures the seconds to the
  first success sent after the kill and to steady throughput again. Beside it, REST and gRPC
  loops through the segserve client (which retries a killed worker's requests) must see no
  failure: the report gives the raw failures and those left after the client's retries;
* **overload**: ``job_queue_size`` small, a slow request holds the worker, a burst beyond the
  queue. Checks that the excess gets 503s *before* any accepted request completes (refused at
  once, not queued), that accepted requests succeed, and that a client retrying with backoff
  turns every 503 into a success;
* **timeout**: one request slower than the archive's ``responseTimeout``. Checks that it fails
  with a 5xx in bounded time, that TorchServe restarts the worker and that it serves again;
* **hostile_traffic** (:mod:`loadtest.hostile`): Locust's REST + gRPC users while a stream of
  hostile requests (odd text in every field and header, a 70000 px wide overlay_jpeg, random
  bytes, a PNG bomb) cycles. Checks 0 good-request failures, 0 worker restarts and that every
  hostile answer is a 2xx or 4xx; measures the good requests' p95;

then prints a report (requests, failures, in-flight bound, recovery seconds) and writes it to
``--out``. Exit status 0 when every check holds, 1 otherwise, 2 when the run could not start.

The slowness is injected by a handler subclass packed into the fault archives
(`loadtest/fault_handler.py`): it sleeps for the seconds in the request header
``X-Segserve-Fault-Sleep`` before the normal handler runs. Production archives never contain it.

The scenarios are built from :mod:`loadtest.traffic` (request loops), :mod:`loadtest.stats`
(the figures), :mod:`loadtest.fault_server` (fault archives, configs, servers) and
:mod:`loadtest.workers` (worker pids, READY).

Example:
    >>> result = ScenarioResult("overload", {"burst": 12}, {"excess refused with 503": True})
    >>> print(report_markdown([result]))
    # segserve chaos report
    <BLANKLINE>
    ## overload: PASS
    <BLANKLINE>
    - burst: 12
    <BLANKLINE>
    - [x] excess refused with 503
    <BLANKLINE>
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loadtest.errors import ChaosError
from loadtest.fault_server import FAULT_HEADER, start_fault_server
from loadtest.stats import client_figures, recovery_figures, summarize
from loadtest.traffic import ClientSender, TrafficLoop, post_image
from loadtest.workers import wait_workers_ready
from serving.properties import DEFAULT_MODEL_NAME

RESULTS = Path("loadtest/results")


# --- scenarios ----------------------------------------------------------------------------


@dataclass
class ScenarioResult:
    """Figures of one scenario and the checks it passed or failed (name → ok)."""

    name: str
    figures: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, bool] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(self.checks.values())


def worker_kill(
    info: Any,
    images: Sequence[bytes],
    batch_size: int,
    concurrency: int = 8,
    warmup_s: float = 4.0,
    after_s: float = 12.0,
    model: str = DEFAULT_MODEL_NAME,
    client_concurrency: int = 2,
    client_policy: Any = None,
) -> ScenarioResult:
    """SIGKILL the (single) worker under request loops; bound the failures, time recovery.

    Two kinds of traffic run together: a raw loop (``concurrency`` threads, plain requests,
    no retry) whose failures are bounded and whose recovery is timed, and, per protocol,
    ``client_concurrency`` threads through the segserve client with ``client_policy``, which
    retries the killed batch's requests: its users must see no failure at all.
    """
    from client.retry import RetryPolicy

    old_pids = wait_workers_ready(info, model)
    policy = client_policy or RetryPolicy(attempts=4, base_delay=0.2, max_delay=2.0)
    protocols = ("rest", "grpc") if client_concurrency else ()
    senders = [ClientSender(info, p, policy, model) for p in protocols]
    client_loops = [
        TrafficLoop(info, images, client_concurrency, model, request=sender).start()
        for sender in senders
    ]
    loop = TrafficLoop(info, images, concurrency, model).start()
    time.sleep(warmup_s)
    in_flight = loop.in_flight()
    t_kill = time.monotonic()
    for pid in old_pids:
        os.kill(pid, signal.SIGKILL)
    time.sleep(after_s)
    new_pids = wait_workers_ready(info, model)
    outcomes = loop.stop()
    client = {
        s.protocol: client_figures(s, cl.stop())
        for s, cl in zip(senders, client_loops, strict=True)
    }
    for sender in senders:
        sender.close()
    failed = [o for o in outcomes if not o.ok]
    # The dead worker held at most one batch: its requests fail, the queue's wait and succeed.
    # (A request sent a few ms after the SIGKILL may still join that batch before the frontend
    # notices, so the bound is the batch, not "sent before the kill".)
    bound = batch_size * len(old_pids)
    recovery = recovery_figures(outcomes, t_kill)
    back = t_kill + recovery["first_success_s"] if recovery["first_success_s"] else float("inf")
    client_retried = sum(c["retried"] for c in client.values())
    figures = {
        **summarize(outcomes),
        "concurrency": concurrency,
        "killed_pids": old_pids,
        "new_pids": new_pids,
        "in_flight_at_kill": in_flight,
        "failure_bound": bound,
        "failures_sent_after_kill": sum(1 for o in failed if o.start >= t_kill),
        "failure_messages": sorted({o.error[:120] for o in failed}),
        **recovery,
        # Raw: requests that failed on the wire (the raw loop's, the client's retried attempts);
        # after retries: what the client's users saw.
        "raw_failures": len(failed) + client_retried,
        "failures_after_client_retries": sum(c["failed"] for c in client.values()),
        **{f"client_{protocol}": c for protocol, c in client.items()},
    }
    checks = {
        "worker restarted (new pid)": bool(new_pids) and not set(new_pids) & set(old_pids),
        "failures <= one batch of the killed worker": len(failed) <= bound,
        "failures <= requests in flight at the kill": len(failed) <= max(in_flight, 1),
        "no failure after the new worker answered": all(o.end <= back for o in failed),
        "a request sent after the kill succeeded": figures["first_success_s"] is not None,
        "throughput back to steady state": figures["steady_s"] is not None,
    }
    if client:
        checks["0 failures through the client's retries (REST + gRPC)"] = figures[
            "failures_after_client_retries"
        ] == 0 and all(c["requests"] > 0 for c in client.values())
    return ScenarioResult("worker_kill", figures, checks)


def overload(
    info: Any,
    images: Sequence[bytes],
    queue_size: int,
    burst: int = 12,
    hold_s: float = 2.0,
    retry_clients: int = 6,
    model: str = DEFAULT_MODEL_NAME,
) -> ScenarioResult:
    """A burst beyond ``job_queue_size`` while a slow request holds the worker."""
    from client.errors import ClientError
    from client.rest import RestClient
    from client.retry import RetryPolicy

    wait_workers_ready(info, model)
    # Every request of the burst is slow, so the queue is still full while the excess arrives.
    slow = {FAULT_HEADER: str(hold_s)}
    with ThreadPoolExecutor(burst) as pool:
        outcomes = list(
            pool.map(lambda i: post_image(info, images[i % len(images)], model, slow), range(burst))
        )
    accepted = [o for o in outcomes if o.ok]
    refused = [o for o in outcomes if o.status == 503]
    first_done = min((o.end for o in accepted), default=float("inf"))
    # Clients that retry with backoff: a 503 is "busy", not "broken".
    policy = RetryPolicy(attempts=12, base_delay=0.25, max_delay=2.0, jitter=0.5)
    retried: list[str] = []

    def with_retry(i: int) -> str:
        client = RestClient(
            info.inference_url, model_name=model, token=info.inference_key, retry=policy
        )
        try:
            return "ok" if client.predict(images[i % len(images)]).content else "empty"
        except ClientError as exc:
            return f"{type(exc).__name__}: {str(exc)[:100]}"
        finally:
            client.close()

    with ThreadPoolExecutor(retry_clients) as pool:
        retried = list(pool.map(with_retry, range(retry_clients)))
    figures = {
        **summarize(outcomes),
        "queue_size": queue_size,
        "burst": burst,
        "refused_503": len(refused),
        "max_503_latency_ms": round(1000 * max((o.end - o.start for o in refused), default=0), 1),
        "first_accepted_done_ms": round(1000 * (first_done - min(o.start for o in outcomes)), 1),
        "retrying_clients": retry_clients,
        "retrying_clients_ok": retried.count("ok"),
        "retry_errors": [r for r in retried if r != "ok"],
    }
    checks = {
        "excess refused with 503": len(refused) > 0,
        "only 200 or 503": len(accepted) + len(refused) == len(outcomes),
        "503s answered before any accepted request completed": all(
            o.end < first_done for o in refused
        ),
        "accepted requests completed": len(accepted) >= 1,
        "retry with backoff turned every 503 into a success": retried.count("ok") == retry_clients,
    }
    return ScenarioResult("overload", figures, checks)


def response_timeout(
    info: Any,
    images: Sequence[bytes],
    timeout_s: int,
    sleep_s: float,
    model: str = DEFAULT_MODEL_NAME,
) -> ScenarioResult:
    """One request slower than ``responseTimeout``: a bounded 5xx, a new worker, service again."""
    old_pids = wait_workers_ready(info, model)
    slow = post_image(info, images[0], model, {FAULT_HEADER: str(sleep_s)}, timeout=sleep_s + 60)
    # Right after the 5xx the management API may still list the dying worker as READY: wait
    # (bounded) for the replacement, so "no restart" is a finding, not a race.
    deadline = time.monotonic() + 60
    new_pids = wait_workers_ready(info, model)
    while set(new_pids) & set(old_pids) and time.monotonic() < deadline:
        time.sleep(0.25)
        new_pids = wait_workers_ready(info, model)
    t_ready = time.monotonic()
    after = [post_image(info, image, model) for image in images[:3]]
    figures = {
        "response_timeout_s": timeout_s,
        "handler_sleep_s": sleep_s,
        "slow_status": slow.status,
        "slow_message": slow.error[:200],
        "slow_seconds": round(slow.end - slow.start, 2),
        "old_pids": old_pids,
        "new_pids": new_pids,
        "worker_back_s": round(t_ready - slow.end, 2),
        "after_statuses": [o.status for o in after],
    }
    checks = {
        "slow request failed with a 5xx": 500 <= slow.status < 600,
        "failed before the handler would have finished": slow.end - slow.start < sleep_s,
        "worker restarted (new pid)": not set(new_pids) & set(old_pids),
        "serves again after the restart": all(o.ok for o in after),
    }
    return ScenarioResult("timeout", figures, checks)


# --- the scripted run (make chaos) -----------------------------------------------------------


def run_all(
    export_dir: Path,
    work: Path,
    images: Sequence[bytes],
    kill_after_s: float = 12.0,
    hostile_s: float = 30.0,
    out: Path | None = None,
):
    """Run the four scenarios, each on its own fresh TorchServe; returns their results.

    ``out`` keeps the hostile scenario's Locust CSVs (default: under ``work``, deleted).
    """
    from loadtest import hostile
    from serving.server import stop

    bad = hostile.rest_requests(images[0]) + hostile.grpc_requests(images[0])
    locust_dir = (out or work) / "hostile_traffic"

    plans: list[tuple[str, dict, dict, Callable[[Any], ScenarioResult]]] = [
        (
            "worker_kill",
            {},
            {"batch_size": 4, "max_batch_delay_ms": 20},
            lambda info: worker_kill(info, images, batch_size=4, after_s=kill_after_s),
        ),
        (
            "overload",
            {"job_queue_size": "2"},
            {"batch_size": 1, "max_batch_delay_ms": 1},
            lambda info: overload(info, images, queue_size=2),
        ),
        (
            "timeout",
            {},
            {"batch_size": 1, "max_batch_delay_ms": 1, "response_timeout_s": 2},
            lambda info: response_timeout(info, images, timeout_s=2, sleep_s=8.0),
        ),
        (
            "hostile_traffic",
            {},
            {"batch_size": 4, "max_batch_delay_ms": 20},
            lambda info: hostile.hostile_traffic(
                info, bad, duration_s=hostile_s, users=4, out_dir=locust_dir
            ),
        ),
    ]
    results = []
    for name, config, options, scenario in plans:
        info = start_fault_server(export_dir, work, name, config, **options)
        try:
            results.append(scenario(info))
        finally:
            stop(info.workdir)
    return results


def report_markdown(results: Sequence[ScenarioResult]) -> str:
    """The human report: one section per scenario, figures then checks."""
    lines = ["# segserve chaos report", ""]
    for result in results:
        lines += [f"## {result.name}: {'PASS' if result.passed else 'FAIL'}", ""]
        lines += [f"- {k}: {json.dumps(v)}" for k, v in result.figures.items()]
        lines.append("")
        lines += [f"- [{'x' if ok else ' '}] {check}" for check, ok in result.checks.items()]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.chaos", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--export-dir", type=Path, default=Path("runs/default/export"))
    parser.add_argument(
        "--out", type=Path, default=None, help="default: loadtest/results/chaos-<UTC>"
    )
    parser.add_argument("--image-size", type=int, default=128, help="synthetic image side, px")
    parser.add_argument(
        "--kill-after", type=float, default=12.0, help="seconds of traffic after the kill"
    )
    parser.add_argument(
        "--hostile-duration", type=float, default=30.0, help="seconds of hostile traffic"
    )
    args = parser.parse_args(argv)
    if not (args.export_dir / "model.pt").is_file():
        print(
            f"error: {args.export_dir}/model.pt not found: run `make train export` first "
            "(or pass --export-dir)",
            file=sys.stderr,
        )
        return 2
    from loadtest.images import load_images

    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or RESULTS / f"chaos-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    images = load_images(None, n=8, size=(args.image_size, args.image_size))
    try:
        with tempfile.TemporaryDirectory(prefix="segserve-chaos-") as work:
            results = run_all(
                args.export_dir.resolve(),
                Path(work),
                images,
                args.kill_after,
                args.hostile_duration,
                out=out,
            )
    except ChaosError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = report_markdown(results)
    (out / "report.md").write_text(text, encoding="utf-8")
    (out / "report.json").write_text(
        json.dumps([asdict(r) | {"passed": r.passed} for r in results], indent=2), encoding="utf-8"
    )
    print(text)
    print(f"report: {out / 'report.md'}")
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

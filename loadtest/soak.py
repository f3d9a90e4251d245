"""Soak test: a bounded Locust run with memory sampled, judged on failures and RSS slopes.

``python -m loadtest.soak --duration 10m`` (``make soak``) starts TorchServe from
config.properties (model store ``model_archives/``, free ports, its own workdir), runs the Locust
users of ``loadtest/locustfile.py`` (REST + gRPC) for ``--duration``, samples the resident
memory (RSS, psutil) of every model worker *and* of the frontend JVM each ``--sample-every``
seconds, fits a line to each series after ``--warmup`` and writes ``report.md`` /
``report.json`` (requests, raw and user-visible failures, p50/p95, worker and frontend RSS
start/end/slope, worker restarts) next to Locust's CSVs in ``--out``.

Exit status: 0 pass; 1 a request failed, a worker restarted, or an RSS slope is above its
limit (``--max-slope`` for the workers, ``--max-frontend-slope`` for the JVM, MB/min); 2 the
run could not happen (no archive, Locust did not run).

Example:
    >>> fit_slope([(0.0, 100.0), (60.0, 101.0), (120.0, 102.0)])  # (seconds, MB) → MB/min
    1.0
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loadtest.stats import pid_changes
from loadtest.workers import worker_pids
from serving.properties import DEFAULT_MODEL_NAME

RESULTS = Path("loadtest/results")


def parse_duration(text: str) -> float:
    """Locust-style duration → seconds: ``90``, ``90s``, ``10m``, ``1h30m``.

    Example:
        >>> parse_duration("1h2m3s"), parse_duration("45")
        (3723.0, 45.0)
    """
    import re

    text = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"duration {text!r}: use e.g. 90s, 10m or 1h30m")
    return float(sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts))


def fit_slope(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of ``(seconds, MB)`` samples, in MB per minute (0.0 if < 2)."""
    if len(samples) < 2:
        return 0.0
    n = len(samples)
    mean_t = sum(t for t, _ in samples) / n
    mean_m = sum(m for _, m in samples) / n
    var = sum((t - mean_t) ** 2 for t, _ in samples)
    if var == 0:
        return 0.0
    cov = sum((t - mean_t) * (m - mean_m) for t, m in samples)
    return round(60.0 * cov / var, 4)


@dataclass(frozen=True)
class RssSample:
    """Seconds since the start, total worker RSS in MB, the worker pids seen, the frontend
    JVM's RSS in MB (None: not found)."""

    t: float
    rss_mb: float
    pids: tuple[int, ...]
    frontend_mb: float | None = None


# The JVM TorchServe's launcher starts: its main class, or the jar on its class path.
FRONTEND_MARKERS = ("org.pytorch.serve.ModelServer", "model-server.jar")


def is_frontend(cmdline: list[str]) -> bool:
    """Whether a process command line is TorchServe's frontend JVM (not a Python worker).

    Example:
        >>> is_frontend(["java", "-cp", ".:/ts/frontend/*", "org.pytorch.serve.ModelServer"])
        True
        >>> is_frontend(["python", "/ts/model_service_worker.py", "--sock-type", "unix"])
        False
    """
    return (
        bool(cmdline)
        and "java" in Path(cmdline[0]).name
        and any(marker in arg for arg in cmdline for marker in FRONTEND_MARKERS)
    )


def frontend_pid(launcher_pid: int) -> int | None:
    """Pid of the frontend JVM below the ``torchserve`` launcher that ``serving.server`` ran
    (``ServerInfo.pid``); None if it is not (or no longer) there."""
    import psutil

    try:
        children = psutil.Process(launcher_pid).children(recursive=True)
    except psutil.Error:
        return None
    for child in children:
        try:
            if is_frontend(child.cmdline()):
                return child.pid
        except psutil.Error:
            continue
    return None


def worker_rss(pids: list[int]) -> float:
    """Sum of the resident memory of ``pids`` in MB (vanished pids count 0)."""
    import psutil

    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


class RssSampler:
    """Samples the model workers' and the frontend's RSS every ``every`` seconds in a thread
    until :meth:`stop`."""

    def __init__(self, info: Any, model: str, every: float) -> None:
        self.info, self.model, self.every = info, model, every
        self.samples: list[RssSample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._t0 = time.monotonic()

    def _run(self) -> None:
        frontend = None
        while not self._stop.is_set():
            try:
                pids = worker_pids(self.info, self.model)
            except Exception:  # noqa: BLE001 - a busy management API must not end the soak
                pids = []
            frontend = frontend or frontend_pid(self.info.pid)
            if pids:
                t = time.monotonic() - self._t0
                front = round(worker_rss([frontend]), 2) if frontend else None
                rss = round(worker_rss(pids), 2)
                self.samples.append(RssSample(round(t, 2), rss, tuple(pids), front or None))
            self._stop.wait(self.every)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def stop(self) -> list[RssSample]:
        self._stop.set()
        self._thread.join(30)
        return self.samples


def judge(
    samples: list[RssSample],
    totals: dict[str, float],
    warmup_s: float,
    max_slope: float,
    max_frontend_slope: float = 5.0,
) -> dict[str, Any]:
    """Figures and verdict from the RSS samples and Locust's totals (pure, unit-tested).

    ``totals["raw_failures"]`` (failures before the Locust users' one retry of a killed
    worker's request) is what must be 0; a soak kills no worker, so a retry is a finding too.
    """
    steady = [(s.t, s.rss_mb) for s in samples if s.t >= warmup_s]
    front = [(s.t, s.frontend_mb) for s in samples if s.frontend_mb is not None]
    front_steady = [(t, mb) for t, mb in front if t >= warmup_s]
    pid_sets = [s.pids for s in samples]
    restarts = max(len(pid_changes(pid_sets)) - 1, 0)
    slope, front_slope = fit_slope(steady), fit_slope(front_steady)
    figures = {
        **totals,
        "rss_samples": len(samples),
        "rss_start_mb": samples[0].rss_mb if samples else None,
        "rss_after_warmup_mb": steady[0][1] if steady else None,
        "rss_end_mb": samples[-1].rss_mb if samples else None,
        "rss_slope_mb_per_min": slope,
        "frontend_rss_start_mb": front[0][1] if front else None,
        "frontend_rss_after_warmup_mb": front_steady[0][1] if front_steady else None,
        "frontend_rss_end_mb": front[-1][1] if front else None,
        "frontend_rss_slope_mb_per_min": front_slope,
        "worker_restarts": restarts,
    }
    failures = totals.get("raw_failures", totals.get("failures", 1))
    checks = {
        "requests were made": totals.get("requests", 0) > 0,
        "zero failed requests": failures == 0,
        "no worker restart": restarts == 0,
        f"enough RSS samples after warm-up (>= 3, got {len(steady)})": len(steady) >= 3,
        f"RSS slope <= {max_slope} MB/min": slope <= max_slope,
        f"enough frontend RSS samples after warm-up (>= 3, got {len(front_steady)})": (
            len(front_steady) >= 3
        ),
        # The JVM grows its heap under load during the warm-up; a climb after it is a leak.
        f"frontend RSS slope <= {max_frontend_slope} MB/min": front_slope <= max_frontend_slope,
    }
    return {"figures": figures, "checks": checks, "passed": all(checks.values())}


def markdown(verdict: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [f"# segserve soak: {'PASS' if verdict['passed'] else 'FAIL'}", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()] + [""]
    lines += [f"- {k}: {v}" for k, v in verdict["figures"].items()] + [""]
    lines += [f"- [{'x' if ok else ' '}] {k}" for k, ok in verdict["checks"].items()]
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtest.soak", description=__doc__.split("\n")[0])
    p.add_argument("--duration", default="10m", help="Locust run time: 90s, 10m, 1h")
    p.add_argument("--users", type=int, default=4)
    p.add_argument("--spawn-rate", type=float, default=2.0)
    p.add_argument("--rest-weight", type=int, default=1)
    p.add_argument("--grpc-weight", type=int, default=1)
    p.add_argument("--config", type=Path, default=Path("config.properties"))
    p.add_argument("--model-store", type=Path, default=Path("model_archives"))
    p.add_argument("--model-name", default=DEFAULT_MODEL_NAME)
    p.add_argument("--sample-every", type=float, default=5.0, help="seconds between RSS samples")
    p.add_argument("--warmup", default="", help="left out of the slope (default: 20%% of run)")
    p.add_argument("--max-slope", type=float, default=2.0, help="worker MB/min after warm-up")
    p.add_argument(
        "--max-frontend-slope", type=float, default=5.0, help="frontend JVM MB/min after warm-up"
    )
    p.add_argument("--out", type=Path, default=None, help="default: loadtest/results/soak-<UTC>")
    return p


def _locust(args: argparse.Namespace, info: Any, prefix: Path) -> int:
    from loadtest.run import server_locust_command

    cmd = server_locust_command(
        info,
        prefix,
        model_name=args.model_name,
        users=args.users,
        spawn_rate=args.spawn_rate,
        duration=args.duration,
        rest_weight=args.rest_weight,
        grpc_weight=args.grpc_weight,
    )
    return subprocess.run(cmd, check=False).returncode


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        duration = parse_duration(args.duration)
        warmup = parse_duration(args.warmup) if args.warmup else 0.2 * duration
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from loadtest.slo import ReportError, summarise
    from serving.server import Ports, ServerError, start, stop

    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or RESULTS / f"soak-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="segserve-soak-"))
    try:
        info = start(args.config, args.model_store, workdir, Ports.free(), timeout_s=240)
    except ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        sampler = RssSampler(info, args.model_name, args.sample_every).start()
        returncode = _locust(args, info, out / "locust")
        samples = sampler.stop()
    finally:
        stop(workdir)
    try:
        total = summarise(out / "locust_stats.csv")["total"]
    except (ReportError, KeyError, OSError) as exc:
        print(f"error: no usable Locust stats (exit {returncode}): {exc}", file=sys.stderr)
        return 2
    totals = {
        "requests": total.requests,
        "failures": total.failures,
        "raw_failures": total.raw_failures,
        "p50_ms": total.p50_ms,
        "p95_ms": total.p95_ms,
        "rps": round(total.rps, 2),
    }
    verdict = judge(samples, totals, warmup, args.max_slope, args.max_frontend_slope)
    meta = {"duration": args.duration, "users": args.users, "warm-up s": warmup}
    text = markdown(verdict, meta)
    (out / "report.md").write_text(text, encoding="utf-8")
    (out / "report.json").write_text(
        json.dumps({**verdict, "meta": meta, "samples": [asdict(s) for s in samples]}, indent=2),
        encoding="utf-8",
    )
    print(text + f"report: {out / 'report.md'}")
    return 0 if verdict["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""Turn Locust's output into an SLO verdict: per-protocol latency, throughput, error rate.

Inputs, under the ``locust --csv PREFIX --csv-full-history`` prefix:

* ``PREFIX_merged.json`` (:func:`merged_path`, written by ``loadtest/locustfile.py`` when the
  test stops): the whole-run stats entries of the process that holds them all, the master in a
  distributed run (``--processes N`` or ``--master``): Locust's master merges every worker's
  counts and response-time histograms. The figures come from it: counts are sums, percentiles
  are read off the merged histograms (Locust's own rule, :func:`percentile`), never averaged.
  It also lists the load generators, each with its own count of the attempts it sent; the
  report shows them and flags a run whose merged stats do not add up to those counts
  (:attr:`LoadGenerators.problems`: a worker lost, or its last report missing).
* ``PREFIX_stats.csv`` (whole-run totals per request name): only when there is no merged file
  (an older run judged with ``--from-csv``). Locust rewrites it once a second, so it may miss
  the run's last second.
* ``PREFIX_stats_history.csv`` (one row per second): the latency/throughput plot.

Requests of type ``grpc`` are the gRPC protocol; every other type (``POST``) is REST.

The Locust users retry, once, a request whose worker was killed under it (HTTP 507 / gRPC
RESOURCE_EXHAUSTED "Worker died."), as the segserve client does. The failed attempt is reported
under its own name, ``<name>: worker died (retried)`` (:data:`RETRIED_SUFFIX`): those rows are
*raw* failures the user never saw. They are left out of the SLO figures and reported apart
(``Summary.retried``), so a report shows both the raw failures and the user-visible ones.

Default SLO (interactive use, one image per request): p95 latency <= 300 ms and error rate
<= 1 %, checked for each protocol *and* the total. Locust stores latencies in buckets (2
significant digits above 100 ms), so a p95 of 296 ms may be reported as 300.

Example:
    >>> s = Summary("rest", requests=200, failures=1, p50_ms=40, p95_ms=90, p99_ms=120,
    ...             rps=20.0, avg_bytes=900)
    >>> [c.passed for c in check_slo({"rest": s}, Slo(p95_ms=300, error_rate=0.01))]
    [True, True]
"""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

GRPC_TYPE = "grpc"
TOTAL = "total"
# Name suffix of a failed attempt the user did not see because it was retried (locustfile.py).
RETRIED_SUFFIX = ": worker died (retried)"


MERGED_SUFFIX = "_merged.json"


class ReportError(ValueError):
    """Locust's output is missing or not what this module expects."""


def merged_path(prefix: str | Path) -> Path:
    """Where the locustfile writes the merged stats for ``--csv PREFIX``.

    >>> merged_path("results/locust").as_posix()
    'results/locust_merged.json'
    """
    return Path(f"{prefix}{MERGED_SUFFIX}")


@dataclass(frozen=True)
class Slo:
    """The service-level objective a run must meet."""

    p95_ms: float = 300.0
    error_rate: float = 0.01

    def __post_init__(self) -> None:
        if self.p95_ms <= 0:
            raise ValueError(f"--slo-p95-ms must be > 0, got {self.p95_ms}")
        if not 0.0 <= self.error_rate <= 1.0:
            raise ValueError(f"--slo-error-rate must be in [0, 1], got {self.error_rate}")


@dataclass(frozen=True)
class Summary:
    """Whole-run figures for one protocol (or the total)."""

    protocol: str
    requests: int
    failures: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    rps: float
    avg_bytes: float
    retried: int = 0  # failed attempts absorbed by a retry: not in requests or failures

    @property
    def error_rate(self) -> float:
        return self.failures / self.requests if self.requests else 0.0

    @property
    def raw_failures(self) -> int:
        """Failures before the retries: the user-visible ones plus the retried attempts."""
        return self.failures + self.retried


@dataclass(frozen=True)
class Check:
    scope: str
    metric: str
    value: float
    limit: float
    passed: bool


def protocol_of(request_type: str) -> str:
    return "grpc" if request_type == GRPC_TYPE else "rest"


def is_retried(row: dict[str, str]) -> bool:
    """A row of failed attempts that a retry turned into a later answer (not user-visible)."""
    return row.get("Name", "").endswith(RETRIED_SUFFIX)


def _num(row: dict[str, str], key: str) -> float:
    """A CSV number; Locust writes ``N/A`` for a percentile it has no sample for."""
    if key not in row:
        raise ReportError(f"Locust CSV lacks column {key!r} (columns: {sorted(row)})")
    value = row[key].strip()
    return math.nan if value in ("", "N/A") else float(value)


def read_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise ReportError(f"{path} does not exist: did Locust run with --csv?")
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _summary(
    protocol: str,
    rows: list[dict[str, str]],
    subtract: list[dict[str, str]] | None = None,
    retried: int = 0,
) -> Summary:
    """Combine rows; with several names per protocol, percentiles take the worst (upper bound).

    ``subtract``: rows that ``rows`` already count (Locust's ``Aggregated`` row holds the
    retried attempts) to take out of the counts, rate and bytes; its percentiles keep those
    few attempts. ``retried``: how many retried attempts this scope had.
    """
    subtract = subtract or []

    def total(key: str, which: list[dict[str, str]]) -> float:
        return sum(_num(r, key) for r in which)

    def size(which: list[dict[str, str]]) -> float:
        return sum(_num(r, "Average Content Size") * _num(r, "Request Count") for r in which)

    requests = int(total("Request Count", rows) - total("Request Count", subtract))
    return Summary(
        protocol=protocol,
        requests=requests,
        failures=int(total("Failure Count", rows) - total("Failure Count", subtract)),
        p50_ms=max(_num(r, "50%") for r in rows),
        p95_ms=max(_num(r, "95%") for r in rows),
        p99_ms=max(_num(r, "99%") for r in rows),
        rps=total("Requests/s", rows) - total("Requests/s", subtract),
        avg_bytes=(size(rows) - size(subtract)) / max(requests, 1),
        retried=retried,
    )


def summarise(stats_csv: Path) -> dict[str, Summary]:
    """``{"rest": ..., "grpc": ..., "total": ...}`` from ``PREFIX_stats.csv`` (protocols seen).

    Retried attempts (:data:`RETRIED_SUFFIX`) are counted in ``Summary.retried`` only.
    """
    rows = read_rows(stats_csv)
    if not rows:
        raise ReportError(f"{stats_csv} has no rows: Locust stopped before any request")
    total = [r for r in rows if r.get("Name") == "Aggregated"]
    if not total:
        raise ReportError(f"{stats_csv} has no 'Aggregated' row: not a Locust stats CSV")
    named = [r for r in rows if r.get("Name") != "Aggregated"]
    retried = [r for r in named if is_retried(r)]
    out: dict[str, Summary] = {}
    for protocol in ("rest", "grpc"):
        mine = [r for r in named if protocol_of(r["Type"]) == protocol]
        answered = [r for r in mine if not is_retried(r)]
        if answered:
            again = sum(int(_num(r, "Request Count")) for r in mine if is_retried(r))
            out[protocol] = _summary(protocol, answered, retried=again)
    count = sum(int(_num(r, "Request Count")) for r in retried)
    out[TOTAL] = _summary(TOTAL, total, subtract=retried, retried=count)
    return out


def percentile(response_times: dict[int, int], count: int, q: float) -> float:
    """Locust's percentile of a response-time histogram ``{ms bucket: requests}`` (``q`` in
    0..1, ``count`` requests in all), as its CSV computes it; NaN without requests.

    >>> percentile({10: 90, 200: 10}, 100, 0.5), percentile({10: 90, 200: 10}, 100, 0.95)
    (10.0, 200.0)
    """
    if count <= 0:
        return math.nan
    within = int(count * q)
    seen = 0
    for ms in sorted(response_times, reverse=True):
        seen += response_times[ms]
        if count - seen <= within:
            return float(ms)
    return 0.0


@dataclass(frozen=True)
class Merged:
    """Stats entries merged: Locust's ``StatsEntry.extend`` for the fields the report reads."""

    requests: int
    failures: int
    content_length: int
    response_times: dict[int, int]

    @classmethod
    def of(cls, entries: Iterable[dict[str, Any]]) -> Merged:
        times: Counter[int] = Counter()
        requests = failures = length = 0
        for e in entries:
            requests += int(e["num_requests"])
            failures += int(e["num_failures"])
            length += int(e["total_content_length"])
            times.update({int(ms): int(n) for ms, n in e["response_times"].items()})
        return cls(requests, failures, length, dict(times))


def read_merged(path: Path) -> dict[str, Any]:
    """The locustfile's merged file (ReportError when missing or not one)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        msg = f"{path} does not exist: did Locust run with loadtest/locustfile.py?"
        raise ReportError(msg) from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ReportError(f"{path} is not readable JSON: {exc}") from None
    keys = ("mode", "expected_workers", "workers", "start_time", "entries")
    if not isinstance(data, dict) or any(k not in data for k in keys):
        raise ReportError(f"{path} is not a merged stats file (keys: {list(keys)})")
    return data


def summarise_merged(data: dict[str, Any]) -> dict[str, Summary]:
    """``{"rest": ..., "grpc": ..., "total": ...}`` from :func:`read_merged`'s data.

    Each scope merges its entries' histograms; retried attempts (:data:`RETRIED_SUFFIX`) are
    left out of every figure and counted in ``Summary.retried``. Requests/s is Locust's
    ``total_rps``: requests over the run's first-to-last-request window.
    """
    entries = data["entries"]
    if not entries:
        raise ReportError("the merged stats hold no requests: Locust stopped before any")
    last = data.get("last_request_timestamp") or max(e["last_request_timestamp"] for e in entries)
    window = float(last) - float(data["start_time"])

    def summary(scope: str, mine: list[dict[str, Any]]) -> Summary:
        answered = Merged.of(e for e in mine if not e["name"].endswith(RETRIED_SUFFIX))
        retried = Merged.of(e for e in mine if e["name"].endswith(RETRIED_SUFFIX))
        n, times = answered.requests, answered.response_times
        return Summary(
            protocol=scope,
            requests=n,
            failures=answered.failures,
            p50_ms=percentile(times, n, 0.50),
            p95_ms=percentile(times, n, 0.95),
            p99_ms=percentile(times, n, 0.99),
            rps=n / window if window > 0 else 0.0,
            avg_bytes=answered.content_length / max(n, 1),
            retried=retried.requests,
        )

    out: dict[str, Summary] = {}
    for protocol in ("rest", "grpc"):
        mine = [e for e in entries if protocol_of(e["method"]) == protocol]
        if any(not e["name"].endswith(RETRIED_SUFFIX) for e in mine):
            out[protocol] = summary(protocol, mine)
    out[TOTAL] = summary(TOTAL, entries)
    return out


@dataclass(frozen=True)
class LoadGenerators:
    """The Locust processes that sent the load, with their own counts of what they sent."""

    mode: str  # "local" (one process) or "distributed" (a master and its workers)
    expected_workers: int
    workers: list[dict[str, Any]]
    merged_attempts: int  # every attempt in the merged stats, retried ones included

    @classmethod
    def of(cls, data: dict[str, Any]) -> LoadGenerators:
        merged = Merged.of(data["entries"]).requests
        return cls(data["mode"], int(data["expected_workers"]), list(data["workers"]), merged)

    @staticmethod
    def attempts(worker: dict[str, Any]) -> int:
        return sum(int(c["requests"]) for c in worker.get("counts", {}).values())

    @property
    def sent(self) -> int:
        """What the workers say they sent, summed."""
        return sum(self.attempts(w) for w in self.workers)

    @property
    def problems(self) -> list[str]:
        """Why the merged figures may not be the whole run (empty when they are)."""
        out = []
        if len(self.workers) < self.expected_workers:
            out.append(f"{len(self.workers)} worker(s) reported, {self.expected_workers} expected")
        for w in self.workers:
            if not w.get("final"):
                out.append(f"worker {w['id']} (pid {w.get('pid')}): no final stats report")
        if self.sent != self.merged_attempts:
            out.append(
                f"the merged stats hold {self.merged_attempts} attempts, the workers sent "
                f"{self.sent}"
            )
        return out

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "sent": self.sent, "problems": self.problems}


def check_slo(summaries: dict[str, Summary], slo: Slo) -> list[Check]:
    """One p95 check and one error-rate check per scope; no requests at all fails."""
    checks = []
    for scope, s in summaries.items():
        if s.requests == 0:
            checks.append(Check(scope, "requests", 0, 1, False))
            continue
        p95_ok = not math.isnan(s.p95_ms) and s.p95_ms <= slo.p95_ms
        checks.append(Check(scope, "p95_ms", s.p95_ms, slo.p95_ms, p95_ok))
        checks.append(
            Check(scope, "error_rate", s.error_rate, slo.error_rate, s.error_rate <= slo.error_rate)
        )
    return checks


def read_history(history_csv: Path) -> dict[str, dict[str, list[float]]]:
    """Per scope: seconds since start, current req/s, current p50/p95 (ms) and user count."""
    rows = read_rows(history_csv)
    if not rows:
        raise ReportError(f"{history_csv} has no rows: the run was too short to sample")
    t0 = min(int(r["Timestamp"]) for r in rows)
    series: dict[str, dict[str, list[float]]] = {}
    for r in rows:
        if is_retried(r):
            continue
        scope = TOTAL if r["Name"] == "Aggregated" else protocol_of(r["Type"])
        s = series.setdefault(scope, {k: [] for k in ("t", "rps", "p50", "p95", "users")})
        s["t"].append(int(r["Timestamp"]) - t0)
        s["rps"].append(_num(r, "Requests/s"))
        s["p50"].append(_num(r, "50%"))
        s["p95"].append(_num(r, "95%"))
        s["users"].append(_num(r, "User Count"))
    return series


def plot_history(series: dict[str, dict[str, list[float]]], slo: Slo, png: Path) -> Path:
    """Two panels over time: p50/p95 latency with the SLO line, and throughput."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (lat, thr) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    colours = {"rest": "tab:blue", "grpc": "tab:orange", TOTAL: "tab:gray"}
    for scope, s in sorted(series.items()):
        colour = colours.get(scope)
        lat.plot(s["t"], s["p95"], color=colour, label=f"{scope} p95")
        lat.plot(s["t"], s["p50"], color=colour, linestyle=":", label=f"{scope} p50")
        thr.plot(s["t"], s["rps"], color=colour, label=scope)
    lat.axhline(slo.p95_ms, color="red", linestyle="--", label=f"SLO p95 {slo.p95_ms:g} ms")
    lat.set_ylabel("latency (ms, rolling)")
    lat.legend(fontsize=7, ncol=3)
    thr.set_ylabel("requests / s")
    thr.set_xlabel("seconds since start")
    thr.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def render_markdown(
    summaries: dict[str, Summary],
    checks: list[Check],
    slo: Slo,
    meta: dict[str, Any],
    generators: LoadGenerators | None = None,
) -> str:
    passed = all(c.passed for c in checks)
    lines = [
        "# segserve load test",
        "",
        f"**SLO {'MET' if passed else 'MISSED'}**: p95 <= {slo.p95_ms:g} ms and error rate <= "
        f"{slo.error_rate:.2%}, for each protocol and in total.",
        "",
    ]
    if generators is not None and generators.problems:
        lines += [
            "**INCOMPLETE**: the figures below may miss part of the run:",
            *(f"- {p}" for p in generators.problems),
            "",
        ]
    lines += [
        *(f"- {k}: {v}" for k, v in meta.items()),
        "",
        "| scope | requests | failures | error rate | p50 ms | p95 ms | p99 ms | req/s | bytes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summaries.values():
        lines.append(
            f"| {s.protocol} | {s.requests} | {s.failures} | {s.error_rate:.2%} | {s.p50_ms:g} | "
            f"{s.p95_ms:g} | {s.p99_ms:g} | {s.rps:.2f} | {s.avg_bytes:.0f} |"
        )
    if any(s.retried for s in summaries.values()):
        lines += [
            "",
            "Raw failures include the attempts whose worker was killed under them; one retry "
            "answered those, so the user never saw them (left out of the figures above).",
            "",
            "| scope | raw failures | worker died, retried | user-visible failures |",
            "|---|---:|---:|---:|",
            *(
                f"| {s.protocol} | {s.raw_failures} | {s.retried} | {s.failures} |"
                for s in summaries.values()
            ),
        ]
    if generators is not None:
        distributed = generators.mode == "distributed"
        kind = "worker process(es) under one master" if distributed else "process"
        lines += [
            "",
            f"Load generators: {len(generators.workers)} Locust {kind}; the merged stats hold "
            f"{generators.merged_attempts} attempts (retried ones "
            f"included), the workers sent {generators.sent}.",
            "",
            "| worker | host | pid | rest attempts | grpc attempts | failed attempts | final |",
            "|---|---|---:|---:|---:|---:|---|",
        ]
        for w in generators.workers:
            counts = w.get("counts", {})
            n = {p: counts.get(p, {}).get("requests", 0) for p in ("rest", "grpc")}
            failed = sum(c.get("failures", 0) for c in counts.values())
            lines.append(
                f"| {w['id']} | {w.get('host', '?')} | {w.get('pid', '?')} | {n['rest']} | "
                f"{n['grpc']} | {failed} | {'yes' if w.get('final') else 'NO'} |"
            )
    lines += ["", "| scope | check | value | limit | result |", "|---|---|---:|---:|---|"]
    for c in checks:
        lines.append(
            f"| {c.scope} | {c.metric} | {c.value:g} | {c.limit:g} | "
            f"{'pass' if c.passed else 'FAIL'} |"
        )
    lines += ["", "![latency and throughput over time](latency_throughput.png)", ""]
    return "\n".join(lines)


def _finite(record: dict[str, Any]) -> dict[str, Any]:
    """NaN (no sample) becomes null: strict JSON has no NaN."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in record.items()}


@dataclass(frozen=True)
class Report:
    summaries: dict[str, Summary]
    checks: list[Check]
    markdown: Path
    json: Path
    plot: Path | None
    generators: LoadGenerators | None = None  # None: judged from a CSV without merged stats

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def problems(self) -> list[str]:
        """Why the figures may not cover the whole run (see LoadGenerators.problems)."""
        return self.generators.problems if self.generators else []


def write_report(csv_prefix: Path, out_dir: Path, slo: Slo, meta: dict[str, Any]) -> Report:
    """Read ``csv_prefix``'s stats (the merged file, else the stats CSV), write ``report.md``,
    ``report.json`` and the PNG."""
    generators = None
    if merged_path(csv_prefix).is_file():
        data = read_merged(merged_path(csv_prefix))
        summaries = summarise_merged(data)
        generators = LoadGenerators.of(data)
    else:
        summaries = summarise(Path(f"{csv_prefix}_stats.csv"))
    checks = check_slo(summaries, slo)
    history = Path(f"{csv_prefix}_stats_history.csv")
    plot = None
    if history.is_file() and read_rows(history):
        plot = plot_history(read_history(history), slo, out_dir / "latency_throughput.png")
    md = out_dir / "report.md"
    md.write_text(render_markdown(summaries, checks, slo, meta, generators))
    js = out_dir / "report.json"
    payload = {
        "slo": asdict(slo),
        "passed": all(c.passed for c in checks),
        "summaries": {
            k: _finite({**asdict(v), "error_rate": v.error_rate, "raw_failures": v.raw_failures})
            for k, v in summaries.items()
        },
        "checks": [_finite(asdict(c)) for c in checks],
        "load_generators": generators.as_dict() if generators else None,
        "meta": meta,
    }
    js.write_text(json.dumps(payload, indent=2, default=str, allow_nan=False) + "\n")
    return Report(summaries, checks, md, js, plot, generators)

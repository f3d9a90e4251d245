"""SLO report from Locust CSVs written by the test (Locust 2.47's exact columns), and from the
merged stats file the locustfile writes (Locust 2.47's StatsEntry.serialize fields)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from loadtest.images import ImageSourceError, load_images
from loadtest.run import main as run_main
from loadtest.slo import (
    RETRIED_SUFFIX,
    ReportError,
    Slo,
    check_slo,
    merged_path,
    read_history,
    read_merged,
    summarise,
    summarise_merged,
    write_report,
)

PCTS = ["50%", "66%", "75%", "80%", "90%", "95%", "98%", "99%", "99.9%", "99.99%", "100%"]
STATS_COLS = [
    "Type", "Name", "Request Count", "Failure Count", "Median Response Time",
    "Average Response Time", "Min Response Time", "Max Response Time",
    "Average Content Size", "Requests/s", "Failures/s", *PCTS,
]  # fmt: skip
HISTORY_COLS = [
    "Timestamp", "User Count", "Type", "Name", "Requests/s", "Failures/s", *PCTS,
    "Total Request Count", "Total Failure Count", "Total Median Response Time",
    "Total Average Response Time", "Total Min Response Time", "Total Max Response Time",
    "Total Average Content Size",
]  # fmt: skip


def _stats_row(kind: str, name: str, n: int, fails: int, p50, p95, p99, rps, size) -> list:
    pcts = [p50, p50, p50, p50, p95, p95, p99, p99, p99, p99, p99]
    return [kind, name, n, fails, p50, p50, 1, p99, size, rps, fails / 10, *pcts]


def write_csvs(prefix: Path, grpc_p95: float = 120, rest_fails: int = 0) -> Path:
    with open(f"{prefix}_stats.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(STATS_COLS)
        w.writerow(_stats_row("POST", "predict", 100, rest_fails, 40, 90, 150, 10.0, 800))
        w.writerow(_stats_row("grpc", "Predictions", 300, 0, 30, grpc_p95, 200, 30.0, 600))
        total_p95 = max(90, grpc_p95)
        w.writerow(_stats_row("", "Aggregated", 400, rest_fails, 33, total_p95, 200, 40.0, 650))
    with open(f"{prefix}_stats_history.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(HISTORY_COLS)
        for t in range(3):
            for kind, name in (("POST", "predict"), ("grpc", "Predictions"), ("", "Aggregated")):
                p = "N/A" if t == 0 else 50 + t
                w.writerow([1000 + t, 4, kind, name, t * 5.0, 0.0, *([p] * len(PCTS)), t * 10, 0,
                            40, 41, 1, 90, 700])  # fmt: skip
    return prefix


def test_summarise_per_protocol_and_total(tmp_path: Path) -> None:
    s = summarise(Path(f"{write_csvs(tmp_path / 'locust', rest_fails=2)}_stats.csv"))
    assert list(s) == ["rest", "grpc", "total"]
    assert (s["rest"].requests, s["rest"].failures, s["rest"].p95_ms) == (100, 2, 90)
    assert s["rest"].error_rate == pytest.approx(0.02)
    assert (s["grpc"].requests, s["grpc"].p99_ms, s["grpc"].rps) == (300, 200, 30.0)
    assert (s["total"].requests, s["total"].rps, s["total"].avg_bytes) == (400, 40.0, 650)


def test_slo_checks_each_scope(tmp_path: Path) -> None:
    s = summarise(Path(f"{write_csvs(tmp_path / 'locust', grpc_p95=450)}_stats.csv"))
    checks = check_slo(s, Slo(p95_ms=300, error_rate=0.01))
    failed = {(c.scope, c.metric) for c in checks if not c.passed}
    assert failed == {("grpc", "p95_ms"), ("total", "p95_ms")}
    assert len(checks) == 6


def test_error_rate_breach_fails(tmp_path: Path) -> None:
    s = summarise(Path(f"{write_csvs(tmp_path / 'locust', rest_fails=5)}_stats.csv"))
    failed = {(c.scope, c.metric) for c in check_slo(s, Slo()) if not c.passed}
    assert failed == {("rest", "error_rate"), ("total", "error_rate")}


def test_history_series(tmp_path: Path) -> None:
    write_csvs(tmp_path / "locust")
    series = read_history(Path(f"{tmp_path / 'locust'}_stats_history.csv"))
    assert sorted(series) == ["grpc", "rest", "total"]
    assert series["total"]["t"] == [0, 1, 2] and series["grpc"]["rps"] == [0.0, 5.0, 10.0]
    assert math.isnan(series["rest"]["p95"][0]) and series["rest"]["p95"][2] == 52


def test_write_report_files(tmp_path: Path) -> None:
    prefix = write_csvs(tmp_path / "locust")
    report = write_report(prefix, tmp_path, Slo(), {"users": 4})
    assert report.passed
    md = report.markdown.read_text()
    assert "SLO MET" in md and "| grpc | 300 | 0 | 0.00% | 30 | 120 | 200 | 30.00 | 600 |" in md
    assert report.plot is not None and report.plot.read_bytes()[:4] == b"\x89PNG"
    data = json.loads(report.json.read_text())
    assert data["passed"] is True and data["summaries"]["rest"]["p95_ms"] == 90


def test_runner_judges_existing_csvs_and_exit_code_follows_slo(tmp_path: Path) -> None:
    prefix = write_csvs(tmp_path / "locust")
    base = ["--from-csv", str(prefix), "--out", str(tmp_path / "r")]
    assert run_main([*base, "--slo-p95-ms", "300"]) == 0
    assert run_main([*base, "--slo-p95-ms", "100"]) == 1  # grpc p95 is 120
    assert "SLO MISSED" in (tmp_path / "r" / "report.md").read_text()
    assert run_main([*base, "--slo-error-rate", "2"]) == 2  # invalid SLO


def test_missing_or_foreign_csv_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="did Locust run with --csv"):
        summarise(tmp_path / "none_stats.csv")
    foreign = tmp_path / "x_stats.csv"
    foreign.write_text("a,b\n1,2\n")
    with pytest.raises(ReportError, match="no 'Aggregated' row"):
        summarise(foreign)
    assert run_main(["--from-csv", str(tmp_path / "none"), "--out", str(tmp_path / "r")]) == 2


def test_image_pool(tmp_path: Path) -> None:
    synthetic = load_images(None, n=3, size=(32, 48))
    assert len(synthetic) == 3 and all(b[:8] == b"\x89PNG\r\n\x1a\n" for b in synthetic)
    assert len(set(synthetic)) == 3
    (tmp_path / "a.png").write_bytes(synthetic[0])
    (tmp_path / "notes.txt").write_text("x")
    assert load_images(tmp_path, n=5) == [synthetic[0]]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageSourceError, match="holds no"):
        load_images(tmp_path / "empty", n=1)
    with pytest.raises(ImageSourceError, match="is not a folder"):
        load_images(tmp_path / "missing", n=1)
    with pytest.raises(ImageSourceError, match="must be >= 1"):
        load_images(None, n=0)


def test_retried_attempts_are_raw_failures_left_out_of_the_slo(tmp_path: Path) -> None:
    """The Locust users' retried attempts (a killed worker) are counted apart, not as errors."""
    prefix = tmp_path / "locust"
    with open(f"{prefix}_stats.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(STATS_COLS)
        w.writerow(_stats_row("POST", "predict", 100, 0, 40, 90, 150, 10.0, 800))
        w.writerow(_stats_row("POST", f"predict{RETRIED_SUFFIX}", 3, 3, 20, 30, 30, 0.3, 100))
        w.writerow(_stats_row("grpc", "Predictions", 300, 1, 30, 120, 200, 30.0, 600))
        w.writerow(_stats_row("grpc", f"Predictions{RETRIED_SUFFIX}", 2, 2, 20, 30, 30, 0.2, 0))
        w.writerow(_stats_row("", "Aggregated", 405, 6, 33, 120, 200, 40.5, 647))
    s = summarise(Path(f"{prefix}_stats.csv"))
    assert (s["rest"].requests, s["rest"].failures, s["rest"].retried) == (100, 0, 3)
    assert (s["grpc"].failures, s["grpc"].retried, s["grpc"].raw_failures) == (1, 2, 3)
    total = s["total"]
    assert (total.requests, total.failures, total.retried, total.raw_failures) == (400, 1, 5, 6)
    assert total.rps == pytest.approx(40.0)
    # 3 retried attempts of 100 bytes were in the Aggregated average: taken out again.
    assert total.avg_bytes == pytest.approx((405 * 647 - 300) / 400)
    report = write_report(prefix, tmp_path, Slo(error_rate=0.01), {})
    assert report.passed  # 1 user-visible failure in 400 requests; the 5 raw ones do not count
    md = report.markdown.read_text()
    assert "| rest | 3 | 3 | 0 |" in md and "| total | 6 | 5 | 1 |" in md
    data = json.loads(report.json.read_text())
    assert data["summaries"]["grpc"]["raw_failures"] == 3


# --- merged stats (loadtest/locustfile.py writes PREFIX_merged.json at the end of a run) -------


def _entry(method: str, name: str, times: dict[int, int], fails: int = 0, size: int = 1000):
    """One serialised Locust StatsEntry (the fields StatsEntry.serialize writes)."""
    n = sum(times.values())
    return {
        "name": name, "method": method, "last_request_timestamp": 1010.0, "start_time": 1000.0,
        "num_requests": n, "num_none_requests": 0, "num_failures": fails,
        "total_response_time": float(sum(ms * c for ms, c in times.items())),
        "max_response_time": float(max(times)), "min_response_time": float(min(times)),
        "total_content_length": size * n, "response_times": {str(k): v for k, v in times.items()},
        "num_reqs_per_sec": {}, "num_fail_per_sec": {},
    }  # fmt: skip


def _worker(wid: str, rest: int, grpc: int, final: bool = True) -> dict:
    counts = {p: {"requests": n, "failures": 0} for p, n in (("rest", rest), ("grpc", grpc)) if n}
    pid = 101 + "ab".index(wid)
    return {"id": wid, "host": "h", "pid": pid, "counts": counts, "final": final}


def write_merged(prefix: Path, workers: list[dict], entries: list[dict], expected: int = 2):
    data = {
        "mode": "distributed", "expected_workers": expected, "workers": workers,
        "start_time": 1000.0, "last_request_timestamp": 1010.0, "entries": entries,
    }  # fmt: skip
    merged_path(prefix).write_text(json.dumps(data))
    return prefix


def two_workers_run(prefix: Path, **worker_overrides) -> Path:
    """Master's merged stats of two workers: 95 fast REST answers (10 ms) and 5 slow (200 ms),
    100 gRPC at 50 ms; worker a sent 60 REST + 50 gRPC, worker b 40 + 50."""
    entries = [
        _entry("POST", "predict", {10: 95, 200: 5}, fails=1),
        _entry("grpc", "Predictions", {50: 100}, size=500),
    ]
    workers = [_worker("a", 60, 50), _worker("b", 40, 50)]
    for i, w in worker_overrides.items():
        workers[int(i[1:])] = w
    return write_merged(prefix, workers, entries)


def test_merged_stats_sum_counts_and_read_percentiles_off_the_merged_histogram(tmp_path):
    prefix = two_workers_run(tmp_path / "locust")
    s = summarise_merged(read_merged(merged_path(prefix)))
    assert (s["rest"].requests, s["rest"].failures) == (100, 1)
    assert (s["rest"].p50_ms, s["rest"].p95_ms, s["rest"].p99_ms) == (10, 200, 200)
    assert (s["grpc"].requests, s["grpc"].p95_ms, s["grpc"].avg_bytes) == (100, 50, 500)
    total = s["total"]
    assert (total.requests, total.failures) == (200, 1)
    # 195 of 200 within 50 ms: the merged p95 is 50 ms (REST's alone is 200, the mean of the
    # per-protocol p95s would be 125)
    assert (total.p50_ms, total.p95_ms, total.p99_ms) == (50, 50, 200)
    assert total.rps == pytest.approx(20.0) and s["rest"].rps == pytest.approx(10.0)


def test_report_prefers_merged_stats_and_lists_the_workers(tmp_path):
    prefix = two_workers_run(tmp_path / "locust")
    write_csvs(prefix)  # a stale CSV beside it (400 requests) must not be what is reported
    report = write_report(prefix, tmp_path, Slo(p95_ms=300, error_rate=0.02), {})
    assert report.summaries["total"].requests == 200 and report.problems == []
    md = report.markdown.read_text()
    assert "Load generators: 2 Locust worker process(es) under one master" in md
    assert "| a | h | 101 | 60 | 50 | 0 | yes |" in md and "INCOMPLETE" not in md
    data = json.loads(report.json.read_text())
    gens = data["load_generators"]
    assert (gens["sent"], gens["merged_attempts"], len(gens["workers"])) == (200, 200, 2)


def test_merged_retried_attempts_are_kept_out_of_the_figures(tmp_path):
    entries = [
        _entry("POST", "predict", {10: 100}),
        _entry("POST", f"predict{RETRIED_SUFFIX}", {5000: 3}, fails=3),
        _entry("grpc", "Predictions", {20: 50}),
    ]
    prefix = write_merged(tmp_path / "locust", [_worker("a", 103, 50)], entries, expected=1)
    s = summarise_merged(read_merged(merged_path(prefix)))
    assert (s["rest"].requests, s["rest"].failures, s["rest"].retried) == (100, 0, 3)
    # the retried attempts' 5 s are in no percentile
    assert (s["total"].requests, s["total"].retried, s["total"].p99_ms) == (150, 3, 20)
    assert write_report(prefix, tmp_path, Slo(), {}).problems == []  # 153 attempts = 153 sent


@pytest.mark.parametrize(
    ("override", "problem"),
    [
        ({"w1": _worker("b", 40, 50, final=False)}, "worker b (pid 102): no final stats report"),
        ({"w1": _worker("b", 40, 70)}, "the merged stats hold 200 attempts, the workers sent 220"),
    ],
)
def test_incomplete_merge_is_named_and_fails_the_run(tmp_path, override, problem):
    prefix = two_workers_run(tmp_path / "locust", **override)
    report = write_report(prefix, tmp_path, Slo(error_rate=0.02), {})
    assert problem in report.problems
    assert "INCOMPLETE" in report.markdown.read_text()
    out = tmp_path / "r"
    assert run_main(["--from-csv", str(prefix), "--out", str(out), "--slo-error-rate", "0.02"]) == 2


def test_a_missing_worker_is_named(tmp_path):
    entries = [_entry("POST", "predict", {10: 60}), _entry("grpc", "Predictions", {50: 50})]
    prefix = write_merged(tmp_path / "locust", [_worker("a", 60, 50)], entries, expected=2)
    assert write_report(prefix, tmp_path, Slo(), {}).problems == [
        "1 worker(s) reported, 2 expected"
    ]


def test_locust_command_for_processes_and_an_external_master(tmp_path):
    from loadtest.run import build_parser, locust_command

    base = ["--host", "http://h:8080"]
    cmd = locust_command(build_parser().parse_args(base), tmp_path / "p")
    assert "--processes" not in cmd and "--master" not in cmd  # today's single process
    cmd = locust_command(build_parser().parse_args([*base, "--processes", "3"]), tmp_path / "p")
    assert cmd[cmd.index("--processes") + 1] == "3" and "--master" not in cmd
    args = build_parser().parse_args([*base, "--expect-workers", "4", "--master-bind-port", "6000"])
    cmd = locust_command(args, tmp_path / "p")
    assert "--master" in cmd and cmd[cmd.index("--expect-workers") + 1] == "4"
    assert cmd[cmd.index("--master-bind-port") + 1] == "6000"
    for bad in (["--processes", "0"], ["--processes", "2", "--expect-workers", "2"]):
        assert run_main([*base, *bad, "--out", str(tmp_path / "r")]) == 2


def test_percentile_is_locusts_own_rule():
    """Same answers as locust.stats.calculate_response_time_percentile (in a subprocess:
    importing locust monkey-patches this process for gevent)."""
    import random
    import subprocess
    import sys

    from loadtest.slo import percentile

    rng = random.Random(0)
    cases = []
    for _ in range(50):
        times = {rng.choice([3, 40, 41, 99, 120, 130, 900, 4000]): rng.randint(1, 50)}
        times |= {rng.randint(1, 3000): rng.randint(1, 9) for _ in range(rng.randint(0, 6))}
        cases.append((times, sum(times.values()), rng.choice([0.5, 0.66, 0.95, 0.99, 1.0])))
    code = (
        "import json, sys\n"
        "from locust.stats import calculate_response_time_percentile as p\n"
        "cases = json.loads(sys.stdin.read())\n"
        "print(json.dumps([p({int(k): v for k, v in t.items()}, n, q) for t, n, q in cases]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], input=json.dumps(cases), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [percentile(t, n, q) for t, n, q in cases]

"""SLO report from Locust CSVs written by the test (Locust 2.47's exact columns)."""

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
    read_history,
    summarise,
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

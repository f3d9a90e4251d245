"""Distributed Locust (``--processes 2``) against the shared TorchServe: the report merges both
workers' stats, and what it counts is what the workers sent and what TorchServe answered."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import requests

pytestmark = [pytest.mark.serving, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
USERS = 4


def inference_requests(torchserve) -> int:
    """TorchServe's own count of inference requests (REST and gRPC), all label sets summed."""
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(f"{torchserve.metrics_url}/metrics", timeout=10).text
    return int(
        sum(
            s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name == "ts_inference_requests_total"
        )
    )


def test_two_worker_processes_are_merged_into_one_report(torchserve, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "loadtest.run", "--processes", "2",
        "--host", torchserve.inference_url, "--grpc-host", torchserve.grpc_inference_target,
        "--key-file", str(Path(torchserve.workdir) / "key_file.json"),
        "--users", str(USERS), "--spawn-rate", str(USERS), "--duration", "10s",
        # Generous on purpose: this checks the merging on a shared 2-core box, not speed.
        "--slo-p95-ms", "20000", "--slo-error-rate", "0", "--out", str(out),
    ]  # fmt: skip
    before = inference_requests(torchserve)
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
    served = inference_requests(torchserve) - before
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    report = json.loads((out / "report.json").read_text())
    gens, summaries = report["load_generators"], report["summaries"]
    # Two worker processes ran under one master, and each sent load and its final report.
    assert gens["mode"] == "distributed" and gens["expected_workers"] == 2, gens
    workers = gens["workers"]
    assert len(workers) == 2 and len({w["pid"] for w in workers}) == 2, workers
    assert all(w["final"] for w in workers), workers
    sent = [sum(c["requests"] for c in w["counts"].values()) for w in workers]
    assert min(sent) > 0, workers
    assert gens["problems"] == [], gens["problems"]

    # The report's counts are the sum of what the two workers sent, per protocol and in total
    # (retried attempts are counted apart, so they are added back).
    assert set(summaries) == {"rest", "grpc", "total"}
    for scope in ("rest", "grpc"):
        s = summaries[scope]
        by_workers = sum(w["counts"].get(scope, {}).get("requests", 0) for w in workers)
        assert s["requests"] > 0 and s["failures"] == 0, (scope, s)
        assert s["requests"] + s["retried"] == by_workers, (scope, s, workers)
        assert 0 < s["p50_ms"] <= s["p95_ms"] <= s["p99_ms"], (scope, s)
    total = summaries["total"]
    assert total["requests"] == summaries["rest"]["requests"] + summaries["grpc"]["requests"]
    assert total["requests"] + total["retried"] == sum(sent) == gens["merged_attempts"]

    # ... and what TorchServe counted. At most one request per user can be in flight when the
    # users stop: TorchServe may have taken it while Locust never recorded it (seen, rarely,
    # with one process too). A worker's lost report would be seconds of its traffic, far more.
    assert 0 <= served - gens["merged_attempts"] <= USERS, (served, gens["merged_attempts"])
    md = (out / "report.md").read_text()
    assert "2 Locust worker process(es) under one master" in md and "INCOMPLETE" not in md
    assert "local master + 2 worker processes (--processes 2)" in md

"""A short real Locust run (REST + gRPC users) against the shared TorchServe, then its report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.serving, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "loadtest.run", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=180)


def test_locust_run_reports_both_protocols_and_exit_code_follows_slo(
    torchserve, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    args = [
        "--host", torchserve.inference_url, "--grpc-host", torchserve.grpc_inference_target,
        "--key-file", str(Path(torchserve.workdir) / "key_file.json"),
        "--users", "2", "--spawn-rate", "2", "--duration", "8s",
        # Generous on purpose: this checks the machinery on a shared 2-core box, not speed.
        "--slo-p95-ms", "20000", "--slo-error-rate", "0", "--out", str(out),
    ]  # fmt: skip
    done = _run(args)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    report = json.loads((out / "report.json").read_text())
    summaries = report["summaries"]
    assert set(summaries) == {"rest", "grpc", "total"}
    for scope in ("rest", "grpc"):
        s = summaries[scope]
        assert s["requests"] > 0 and s["failures"] == 0, (scope, s)
        assert 0 < s["p50_ms"] <= s["p95_ms"] <= s["p99_ms"], (scope, s)
        assert s["rps"] > 0 and s["avg_bytes"] > 100  # a PNG mask, not an error body
    total = summaries["total"]
    assert total["requests"] == summaries["rest"]["requests"] + summaries["grpc"]["requests"]
    assert report["passed"] is True and all(c["passed"] for c in report["checks"])
    assert (out / "latency_throughput.png").read_bytes()[:4] == b"\x89PNG"
    assert "SLO MET" in (out / "report.md").read_text()

    # The same run judged against an impossible SLO: non-zero exit, the miss is named.
    judged = _run(["--from-csv", str(out / "locust"), "--slo-p95-ms", "0.001", "--out", str(out)])
    assert judged.returncode == 1, judged.stderr
    assert "SLO MISSED" in judged.stdout and "| rest | p95_ms |" in judged.stdout

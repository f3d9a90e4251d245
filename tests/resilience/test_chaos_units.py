"""Fast tests of the pure parts of loadtest.chaos / loadtest.soak and of the hostile corpus."""

from __future__ import annotations

import json
import zipfile

import pytest

from handler.errors import InputError
from handler.imaging import decode_image
from loadtest import chaos, soak
from loadtest.chaos import Outcome


def steady_traffic(t0: float, t1: float, rate: float, latency: float = 0.1) -> list[Outcome]:
    n = int((t1 - t0) * rate)
    return [Outcome(t0 + i / rate, t0 + i / rate + latency, 200) for i in range(n)]


def test_recovery_figures_measure_the_gap_and_the_return():
    before = steady_traffic(0.0, 10.0, 10.0)
    dying = [Outcome(9.95, 10.2, 507, "Worker died.")]
    after = steady_traffic(14.0, 20.0, 10.0)
    figures = chaos.recovery_figures(before + dying + after, t_event=10.0)
    assert figures["baseline_rps"] == pytest.approx(10.0, abs=0.2)
    assert figures["first_success_s"] == pytest.approx(4.1, abs=0.01)
    # steady_s is the start of the first 2 s window at >= 80 % of the baseline: within
    # 2 s x 20 % of the moment traffic really came back (t = 14).
    assert 4.0 - 0.41 <= figures["steady_s"] <= 4.0


def test_recovery_figures_when_nothing_comes_back():
    figures = chaos.recovery_figures(steady_traffic(0.0, 10.0, 5.0), t_event=10.0)
    assert figures["first_success_s"] is None and figures["steady_s"] is None


def test_summarize_and_in_flight():
    outcomes = [Outcome(0, 1, 200), Outcome(0.5, 2.5, 507, "x"), Outcome(2, 3, 0, "ReadTimeout")]
    summary = chaos.summarize(outcomes)
    assert (summary["requests"], summary["ok"], summary["failed"]) == (3, 1, 2)
    assert summary["statuses"] == {"0": 1, "200": 1, "507": 1}
    assert summary["p50_ms"] == 1000.0
    assert chaos.in_flight_at(outcomes, 0.7) == 2 and chaos.in_flight_at(outcomes, 2.2) == 2
    assert chaos.percentile([5, 1, 3, 2, 4], 50) == 3 and chaos.percentile([], 95) == 0.0


def test_scenario_result_needs_checks_to_pass():
    assert not chaos.ScenarioResult("x").passed
    assert chaos.ScenarioResult("x", checks={"a": True}).passed
    assert not chaos.ScenarioResult("x", checks={"a": True, "b": False}).passed


def test_add_fault_handler_rewrites_the_manifest(tmp_path):
    mar = tmp_path / "m.mar"
    manifest = {"model": {"modelName": "segmenter", "handler": "segmenter_handler.py"}}
    with zipfile.ZipFile(mar, "w") as z:
        z.writestr("MAR-INF/MANIFEST.json", json.dumps(manifest))
        z.writestr("model.pt", b"weights")
    chaos.add_fault_handler(mar)
    with zipfile.ZipFile(mar) as z:
        assert json.loads(z.read("MAR-INF/MANIFEST.json"))["model"]["handler"] == "fault_handler.py"
        assert z.read("model.pt") == b"weights"
        source = z.read("fault_handler.py").decode()
    compile(source, "fault_handler.py", "exec")  # valid Python
    assert "class FaultInjectingHandler(SegmenterHandler)" in source
    assert source.count("\nclass ") == 1  # TorchServe loads the only class defined there


def test_write_server_config_overrides_and_absolute_paths(tmp_path):
    from serving.server import read_properties

    path = chaos.write_server_config(tmp_path / "c.properties", {"job_queue_size": 3})
    props = read_properties(path)
    assert props["job_queue_size"] == "3"
    assert props["metrics_config"].startswith("/") and props["metrics_config"].endswith(
        "handler/metrics.yaml"
    )
    assert props["enable_model_api"] == "false"  # untouched keys keep the repo's values


def test_soak_slope_duration_and_verdict():
    assert soak.fit_slope([(0, 100), (60, 101), (120, 102)]) == 1.0
    assert soak.fit_slope([(0, 100)]) == 0.0
    assert soak.parse_duration("10m") == 600 and soak.parse_duration("1h30m") == 5400
    with pytest.raises(ValueError, match="10m"):
        soak.parse_duration("ten minutes")
    flat = [soak.RssSample(t, 300.0 + (t % 2) * 0.1, (7,)) for t in range(0, 120, 5)]
    totals = {"requests": 500, "failures": 0}
    verdict = soak.judge(flat, totals, warmup_s=20, max_slope=2.0)
    assert verdict["passed"], verdict
    leaking = [soak.RssSample(t, 300.0 + t / 10, (7,)) for t in range(0, 120, 5)]  # 6 MB/min
    verdict = soak.judge(leaking, totals, warmup_s=20, max_slope=2.0)
    assert not verdict["passed"] and verdict["figures"]["rss_slope_mb_per_min"] == 6.0
    restarted = flat[:10] + [soak.RssSample(s.t, s.rss_mb, (8,)) for s in flat[10:]]
    verdict = soak.judge(restarted, {"requests": 500, "failures": 2}, 20, 2.0)
    assert verdict["figures"]["worker_restarts"] == 1
    assert not verdict["checks"]["zero failed requests"]
    assert not verdict["checks"]["no worker restart"]


def test_corpus_decodes_offline_as_the_server_must_answer(corpus):
    """The corpus's expectations hold for the handler's decoder itself (raw-body cases)."""
    for case in corpus:
        if case.fields is not None or case.headers.get("Content-Type", "").startswith("text"):
            continue
        if case.headers.get("Content-Type") == "application/json" and case.size is None:
            continue  # TorchServe parses JSON bodies before the handler sees them
        if case.size is not None:
            assert decode_image(case.body, 40_000_000).shape[:2] == case.size, case.name
        else:
            with pytest.raises(InputError) as refused:
                decode_image(case.body, 40_000_000)
            assert refused.value.reason == case.error_type, case.name
            assert refused.value.status == case.status, case.name

"""Fast tests of the pure parts of the fault runs (loadtest.chaos, stats, fault_server), of
loadtest.soak and loadtest.hostile, and of the hostile corpus."""

from __future__ import annotations

import io
import json
import zipfile

import pytest

from handler.errors import InputError
from handler.imaging import decode_image
from loadtest import chaos, fault_server, hostile, soak
from loadtest.stats import client_figures, in_flight_at, percentile, recovery_figures, summarize
from loadtest.traffic import Outcome


def steady_traffic(t0: float, t1: float, rate: float, latency: float = 0.1) -> list[Outcome]:
    n = int((t1 - t0) * rate)
    return [Outcome(t0 + i / rate, t0 + i / rate + latency, 200) for i in range(n)]


def test_recovery_figures_measure_the_gap_and_the_return():
    before = steady_traffic(0.0, 10.0, 10.0)
    dying = [Outcome(9.95, 10.2, 507, "Worker died.")]
    after = steady_traffic(14.0, 20.0, 10.0)
    figures = recovery_figures(before + dying + after, t_event=10.0)
    assert figures["baseline_rps"] == pytest.approx(10.0, abs=0.2)
    assert figures["first_success_s"] == pytest.approx(4.1, abs=0.01)
    # steady_s is the start of the first 2 s window at >= 80 % of the baseline: within
    # 2 s x 20 % of the moment traffic really came back (t = 14).
    assert 4.0 - 0.41 <= figures["steady_s"] <= 4.0


def test_recovery_figures_when_nothing_comes_back():
    figures = recovery_figures(steady_traffic(0.0, 10.0, 5.0), t_event=10.0)
    assert figures["first_success_s"] is None and figures["steady_s"] is None


def test_summarize_and_in_flight():
    outcomes = [Outcome(0, 1, 200), Outcome(0.5, 2.5, 507, "x"), Outcome(2, 3, 0, "ReadTimeout")]
    summary = summarize(outcomes)
    assert (summary["requests"], summary["ok"], summary["failed"]) == (3, 1, 2)
    assert summary["statuses"] == {"0": 1, "200": 1, "507": 1}
    assert summary["p50_ms"] == 1000.0
    assert in_flight_at(outcomes, 0.7) == 2 and in_flight_at(outcomes, 2.2) == 2
    assert percentile([5, 1, 3, 2, 4], 50) == 3 and percentile([], 95) == 0.0


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
    fault_server.add_fault_handler(mar)
    with zipfile.ZipFile(mar) as z:
        assert json.loads(z.read("MAR-INF/MANIFEST.json"))["model"]["handler"] == "fault_handler.py"
        assert z.read("model.pt") == b"weights"
        source = z.read("fault_handler.py").decode()
    compile(source, "fault_handler.py", "exec")  # valid Python
    assert "class FaultInjectingHandler(SegmenterHandler)" in source
    assert source.count("\nclass ") == 1  # TorchServe loads the only class defined there


def test_write_server_config_overrides_and_absolute_paths(tmp_path):
    from serving.properties import read_properties

    path = fault_server.write_server_config(tmp_path / "c.properties", {"job_queue_size": 3})
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
    flat = [soak.RssSample(t, 300.0 + (t % 2) * 0.1, (7,), 900.0) for t in range(0, 120, 5)]
    totals = {"requests": 500, "failures": 0}
    verdict = soak.judge(flat, totals, warmup_s=20, max_slope=2.0)
    assert verdict["passed"], verdict
    leaking = [soak.RssSample(t, 300.0 + t / 10, (7,), 900.0) for t in range(0, 120, 5)]  # 6/min
    verdict = soak.judge(leaking, totals, warmup_s=20, max_slope=2.0)
    assert not verdict["passed"] and verdict["figures"]["rss_slope_mb_per_min"] == 6.0
    restarted = flat[:10] + [soak.RssSample(s.t, s.rss_mb, (8,), 900.0) for s in flat[10:]]
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


def test_soak_judges_the_frontend_slope_apart_from_the_workers():
    # Workers flat, the JVM climbing 12 MB/min after the warm-up: the frontend check fails.
    samples = [soak.RssSample(t, 300.0, (7,), 900.0 + t / 5) for t in range(0, 120, 5)]
    verdict = soak.judge(samples, {"requests": 9, "failures": 0, "raw_failures": 0}, 20, 2.0, 5.0)
    figures, checks = verdict["figures"], verdict["checks"]
    assert figures["rss_slope_mb_per_min"] == 0.0
    assert figures["frontend_rss_slope_mb_per_min"] == 12.0
    assert (figures["frontend_rss_start_mb"], figures["frontend_rss_end_mb"]) == (900.0, 923.0)
    assert not checks["frontend RSS slope <= 5.0 MB/min"] and not verdict["passed"]
    assert checks["RSS slope <= 2.0 MB/min"]
    # No frontend found: the soak cannot vouch for it, so it does not pass.
    blind = [soak.RssSample(t, 300.0, (7,)) for t in range(0, 120, 5)]
    verdict = soak.judge(blind, {"requests": 9, "failures": 0}, 20, 2.0)
    assert not verdict["checks"]["enough frontend RSS samples after warm-up (>= 3, got 0)"]
    # A retried attempt (a worker died under it) fails the soak although the user saw none.
    verdict = soak.judge(samples, {"requests": 9, "failures": 0, "raw_failures": 1}, 20, 2.0, 20)
    assert not verdict["checks"]["zero failed requests"]


def test_frontend_is_the_jvm_not_a_worker():
    java = [
        "/usr/bin/java",
        "-Dlog4j=x",
        "-cp",
        ".:/ts/frontend/*",
        "org.pytorch.serve.ModelServer",
    ]
    assert soak.is_frontend(java)
    assert soak.is_frontend(["java", "-jar", "/ts/frontend/model-server.jar"])
    worker = ["python", "/ts/model_service_worker.py", "--sock-name", "/tmp/.ts.sock.9000"]
    assert not soak.is_frontend(worker) and not soak.is_frontend([])
    # The launcher's own command line names TorchServe, but it is Python, not the JVM.
    assert not soak.is_frontend(
        ["python", "torchserve", "--start", "org.pytorch.serve.ModelServer"]
    )


def _parts(body: bytes, boundary: str) -> list[tuple[bytes, bytes]]:
    """(name, value) of each part, read back by python-multipart (a real form parser)."""
    from python_multipart import parse_form

    out: list[tuple[bytes, bytes]] = []

    def on_file(f) -> None:  # type: ignore[no-untyped-def]
        f.file_object.seek(0)
        out.append((f.field_name, f.file_object.read()))

    headers = {
        "Content-Type": f"multipart/form-data; boundary={boundary}".encode(),
        "Content-Length": str(len(body)).encode(),
    }
    fields = lambda f: out.append((f.field_name, f.value or b""))  # noqa: E731
    parse_form(headers, io.BytesIO(body), fields, on_file)
    return out


def test_hostile_requests_carry_exactly_the_bytes_they_claim(scene_images):
    import base64

    from PIL import Image

    image = scene_images[0]
    rest = {r.name: r for r in hostile.rest_requests(image)}
    grpc = {r.name: r for r in hostile.grpc_requests(image)}
    assert len(rest) == len(hostile.rest_requests(image))  # names are unique
    assert {r.protocol for r in rest.values()} == {"rest"}
    texts = hostile.odd_texts()
    with pytest.raises(UnicodeDecodeError):
        texts["invalid_utf8"].decode()
    assert len(texts["long"]) >= 20_000 and len(texts["long_non_ascii"]) >= 20_000
    for kind, text in texts.items():
        boundary = hostile.BOUNDARY
        assert _parts(rest[f"output_{kind}"].body, boundary) == [
            (b"data", image),
            (b"output", text),
        ]
        named = rest[f"field_name_{kind}"].body
        if len(text) < 8000:  # python-multipart caps the size of a part's headers
            assert _parts(named, boundary) == [(text, image)]
        assert named.count(b'name="' + text + b'"') == 1
        assert b'name="' + text + b'"' in rest[f"output_name_{kind}"].body
        assert rest[f"accept_{kind}"].headers["Accept"] == text
        assert rest[f"x_segserve_output_{kind}"].headers["X-Segserve-Output"] == text
        assert rest[f"accept_{kind}"].body == image
        assert grpc[f"grpc_output_{kind}"].inputs == {"data": image, "output": text}
    body = json.loads(rest["json_output_non_ascii"].body.decode())
    assert body["output"] == "é" and base64.b64decode(body["image"]) == image
    stream = _parts(rest["multipart_stream_true"].body, hostile.BOUNDARY)
    assert (b"stream", b"true") in stream
    wide = dict(_parts(rest["overlay_jpeg_70000x1"].body, hostile.BOUNDARY))
    assert wide[b"output"] == b"overlay_jpeg"

    assert Image.open(io.BytesIO(wide[b"data"])).size == (70_000, 1)
    with pytest.raises(InputError) as bomb:
        decode_image(rest["png_bomb_100000x100000"].body, 40_000_000)
    assert bomb.value.status == 413
    assert grpc["grpc_stream_true_unary"].inputs["stream"] == b"true"


def test_hostile_grpc_requests_are_valid_protobuf(scene_images):
    from client.grpc_stubs import load_stubs

    stubs = load_stubs()
    for request in hostile.grpc_requests(scene_images[0]):
        message = stubs.inference_pb2.PredictionsRequest(model_name="m", input=request.inputs)
        assert message.ByteSize() > 0, request.name


def test_hostile_answers_are_judged_by_status():
    assert hostile.classify_http(200) and hostile.classify_http(415)
    assert not hostile.classify_http(500) and not hostile.classify_http(507)
    assert not hostile.classify_http(0)
    assert hostile.classify_grpc("INVALID_ARGUMENT", "bad")
    assert hostile.classify_grpc("RESOURCE_EXHAUSTED", "request too large")
    assert not hostile.classify_grpc("RESOURCE_EXHAUSTED", "Worker died.\norg.pytorch...")
    assert not hostile.classify_grpc("INTERNAL", "Worker died.")
    answers = [
        hostile.HostileAnswer("a", "400", True, 0.1),
        hostile.HostileAnswer("b", "no answer (ReadTimeout)", False, 10.0, ""),
        hostile.HostileAnswer("a", "400", True, 0.3),
    ]
    figures = hostile.answer_figures(answers)
    assert figures["hostile_by_status"] == {"400": 2, "no answer (ReadTimeout)": 1}
    assert figures["unacceptable"] == {"b": ["no answer (ReadTimeout)"]}
    assert (figures["hostile_requests"], figures["hostile_distinct"]) == (3, 2)
    assert figures["hostile_max_s"] == 10.0


def test_client_figures_separate_raw_and_user_visible_failures():
    class Sender:
        retried = ["WorkerDied: x", "WorkerDied: x", "RetryableServerError: busy"]

    outcomes = [Outcome(0, 1, 200), Outcome(1, 2, 200), Outcome(2, 3, 500, "boom")]
    figures = client_figures(Sender(), outcomes)
    assert (figures["requests"], figures["failed"], figures["retried"]) == (3, 1, 3)
    assert figures["retried_errors"] == ["RetryableServerError: busy", "WorkerDied: x"]


def test_the_fault_handler_module_matches_the_header_chaos_sends():
    from loadtest import fault_handler

    assert fault_handler.FAULT_HEADER == fault_server.FAULT_HEADER.lower()
    assert fault_server.FAULT_HANDLER_FILE.read_text().startswith('"""Fault injection')

"""Model lifecycle under traffic, and the security settings, on a server with the model API ON.

The server is started from a copy of config.properties with the settings a rollout needs
(docs/resilience.md): ``enable_model_api=true`` and ``allowed_urls`` limited to the model store,
plus a small ``max_request_size`` (1 MB) to see the 413.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import grpc
import pytest
import requests

from loadtest.stats import summarize
from loadtest.traffic import TrafficLoop
from serving.archive import ArchiveOptions, build_archive
from serving.server import stop

pytestmark = [pytest.mark.serving, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
MAX_REQUEST_SIZE = 1024 * 1024


def allowed_urls_for(store: Path) -> str:
    """A Java regex matching ``file://`` URLs of archives directly in ``store`` (no backslash:
    java.util.Properties would eat it)."""
    path = str(store.resolve())
    assert re.fullmatch(r"[A-Za-z0-9_/.\-]+", path), f"unexpected characters in {path}"
    return "file://" + path.replace(".", "[.]") + "/[^/]+[.]mar"


@pytest.fixture(scope="module")
def api_server(tiny_export, tmp_path_factory, special_server):
    store = tmp_path_factory.mktemp("lifecycle_store")
    build_archive(tiny_export, store, ArchiveOptions(version="1.0", batch_size=4))
    # Version 2.0 of the same model, under another file name, ready to be registered.
    staging = tmp_path_factory.mktemp("v2")
    build_archive(tiny_export, staging, ArchiveOptions(version="2.0", batch_size=4))
    shutil.move(staging / "segmenter.mar", store / "segmenter-v2.mar")
    info = special_server(
        store,
        {
            "enable_model_api": "true",
            "allowed_urls": allowed_urls_for(store),
            "max_request_size": str(MAX_REQUEST_SIZE),
        },
    )
    yield info
    stop(info.workdir)


def mgmt(info, method: str, path: str, token: str | None = "management", **params):
    headers = {}
    if token == "management":
        headers["Authorization"] = f"Bearer {info.management_key}"
    elif token:
        headers["Authorization"] = f"Bearer {token}"
    return requests.request(
        method, f"{info.management_url}{path}", params=params, headers=headers, timeout=120
    )


def versions(info) -> dict[str, dict]:
    return {v["modelVersion"]: v for v in mgmt(info, "GET", "/models/segmenter/all").json()}


def test_rollout_under_traffic_loses_no_request(api_server, scene_images):
    t0 = time.monotonic()
    loop = TrafficLoop(api_server, scene_images, concurrency=3, timeout=20).start()
    steps: list[tuple[str, int, str]] = []

    def step(name: str, method: str, path: str, **params) -> None:
        time.sleep(1.5)  # traffic flows between the steps too
        resp = mgmt(api_server, method, path, **params)
        steps.append((name, resp.status_code, f"{time.monotonic() - t0:.2f} {resp.text[:200]}"))

    try:
        step("register 2.0", "POST", "/models", url="segmenter-v2.mar", initial_workers="1",
             synchronous="true")  # fmt: skip
        step("default 2.0", "PUT", "/models/segmenter/2.0/set-default")
        step("scale 2.0 up", "PUT", "/models/segmenter/2.0", min_worker="2", max_worker="2",
             synchronous="true")  # fmt: skip
        # Scale down only a version no traffic goes to: TorchServe 0.12 shuts a busy worker
        # down mid-batch (its requests get 500 "Worker died.", see docs/resilience.md).
        step("scale 1.0 down", "PUT", "/models/segmenter/1.0", min_worker="0", max_worker="0",
             synchronous="true")  # fmt: skip
        step("unregister 1.0", "DELETE", "/models/segmenter/1.0")
        time.sleep(2.0)
    finally:
        outcomes = loop.stop()
    assert all(200 <= status < 300 for _, status, _ in steps), steps
    summary = summarize(outcomes)
    print(f"\nrollout: {summary}; steps: {[(n, s) for n, s, _ in steps]}")
    assert summary["requests"] > 20, summary
    failed = [(round(o.start - t0, 2), round(o.end - t0, 2), o.error) for o in outcomes if not o.ok]
    assert summary["failed"] == 0, (summary, failed, steps)
    final = versions(api_server)
    assert list(final) == ["2.0"] and final["2.0"]["workers"][0]["status"] == "READY"


def test_tokens_required_on_every_api(api_server, scene_images):
    from client.grpc_stubs import load_stubs

    body = scene_images[0]
    url = f"{api_server.inference_url}/predictions/segmenter"
    for token in (None, "not-the-key", api_server.management_key):  # management key ≠ inference
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        resp = requests.post(url, data=body, headers=headers, timeout=30)
        assert resp.status_code == 400 and resp.json()["type"] == "InvalidKeyException"
    for token in (None, "not-the-key", api_server.inference_key):
        for method, path in (("GET", "/models"), ("POST", "/models")):
            resp = mgmt(api_server, method, path, token=token, url="segmenter-v2.mar")
            assert resp.status_code == 400 and resp.json()["type"] == "InvalidKeyException"

    stubs = load_stubs()
    with (
        grpc.insecure_channel(api_server.grpc_inference_target) as inf_channel,
        grpc.insecure_channel(api_server.grpc_management_target) as mgmt_channel,
    ):
        inference = stubs.inference_pb2_grpc.InferenceAPIsServiceStub(inf_channel)
        management = stubs.management_pb2_grpc.ManagementAPIsServiceStub(mgmt_channel)
        predict = stubs.inference_pb2.PredictionsRequest(
            model_name="segmenter", input={"data": body}
        )
        listing = stubs.management_pb2.ListModelsRequest(limit=10)
        register = stubs.management_pb2.RegisterModelRequest(url="segmenter-v2.mar")
        for call, request, good, wrong in (
            (inference.Predictions, predict, api_server.inference_key, api_server.management_key),
            (management.ListModels, listing, api_server.management_key, api_server.inference_key),
            (management.RegisterModel, register, None, api_server.inference_key),
        ):
            for token in (None, "not-the-key", wrong):
                metadata = [("authorization", f"Bearer {token}")] if token else []
                with pytest.raises(grpc.RpcError) as refused:
                    call(request, metadata=metadata, timeout=30)
                assert "Token Authorization failed" in (refused.value.details() or ""), (
                    refused.value.code(),
                    refused.value.details(),
                )
            if good:
                call(request, metadata=[("authorization", f"Bearer {good}")], timeout=60)


def test_model_api_refuses_urls_outside_the_store(api_server, tmp_path):
    outside = tmp_path / "evil.mar"
    shutil.copy(Path(api_server.model_store) / "segmenter-v2.mar", outside)
    for url in ("http://example.com/evil.mar", f"file://{outside}"):
        resp = mgmt(api_server, "POST", "/models", url=url, model_name="evil")
        assert 400 <= resp.status_code < 500, (url, resp.status_code, resp.text)
        assert "allowed URL" in resp.json()["message"], resp.text
    assert "evil" not in {
        m["modelName"] for m in mgmt(api_server, "GET", "/models").json()["models"]
    }


def test_oversized_body_is_refused_with_413(api_server, scene_images):
    from client.grpc_stubs import load_stubs

    auth = {"Authorization": f"Bearer {api_server.inference_key}"}
    big = scene_images[0] + b"\0" * (MAX_REQUEST_SIZE + 1)
    resp = requests.post(
        f"{api_server.inference_url}/predictions/segmenter", data=big, headers=auth, timeout=60
    )
    assert resp.status_code == 413, (resp.status_code, resp.text[:200])
    stubs = load_stubs()
    with grpc.insecure_channel(api_server.grpc_inference_target) as channel:
        stub = stubs.inference_pb2_grpc.InferenceAPIsServiceStub(channel)
        request = stubs.inference_pb2.PredictionsRequest(
            model_name="segmenter", input={"data": big}
        )
        with pytest.raises(grpc.RpcError) as refused:
            stub.Predictions(
                request,
                metadata=[("authorization", f"Bearer {api_server.inference_key}")],
                timeout=60,
            )
        # grpc-java refuses the oversized message by resetting the stream (RST_STREAM).
        assert refused.value.code() in (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            grpc.StatusCode.CANCELLED,
        ), refused.value
    # A body under the limit still works.
    ok = requests.post(
        f"{api_server.inference_url}/predictions/segmenter",
        data=scene_images[0],
        headers=auth,
        timeout=60,
    )
    assert ok.status_code == 200


def test_tokens_never_reach_the_logs(api_server, scene_images):
    auth = {"Authorization": f"Bearer {api_server.inference_key}"}
    for body in scene_images[:3]:
        requests.post(
            f"{api_server.inference_url}/predictions/segmenter", data=body, headers=auth, timeout=60
        ).raise_for_status()
    mgmt(api_server, "GET", "/models").raise_for_status()
    time.sleep(1.0)  # log4j flushes asynchronously
    logs = [
        p
        for p in Path(api_server.log_dir).rglob("*")
        if p.is_file()  # TorchServe's logs, its config copy and our segserve_server.json
    ]
    assert any(p.name == "segserve_server.json" for p in logs), logs
    assert any(p.name == "access_log.log" for p in logs) and len(logs) >= 3, logs
    for path in logs:
        text = path.read_text(encoding="utf-8", errors="replace")
        for kind, key in (
            ("inference", api_server.inference_key),
            ("management", api_server.management_key),
        ):
            assert key not in text, f"the {kind} key appears in {path}"


def test_no_secret_is_committed():
    tracked = (
        subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True)
        .stdout.decode()
        .split("\0")
    )
    tracked = [p for p in tracked if p]
    assert len(tracked) > 20
    assert not [p for p in tracked if Path(p).name == "key_file.json"]
    # key_file.json is ignored wherever TorchServe starts (repo root, k8s/, a test workdir).
    for where in ("key_file.json", "k8s/key_file.json", "logs/ts_log.log"):
        check = subprocess.run(["git", "check-ignore", "-q", where], cwd=REPO, check=False)
        assert check.returncode == 0, f"{where} is not git-ignored"
    patterns = {
        "TorchServe key file": re.compile(
            r'"(inference|management|API)"\s*:\s*\{\s*"key"\s*:\s*"[\w-]{8,}"'
        ),
        "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
        "AWS access key": re.compile(r"AKIA[0-9A-Z]{16}"),
        "literal bearer token": re.compile(r"Bearer [A-Za-z0-9]{8,}[\"']"),
    }
    found = []
    for name in tracked:
        path = REPO / name
        if not path.is_file() or path.stat().st_size > 2_000_000:
            continue
        text = path.read_text(encoding="utf-8", errors="ignore")
        found += [(name, what) for what, rx in patterns.items() if rx.search(text)]
    assert not found, found

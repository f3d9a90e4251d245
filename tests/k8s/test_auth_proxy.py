"""The auth proxy (k8s/base/auth-proxy/) run by the real nginx + njs in front of a real
TorchServe bound to 127.0.0.1 with token auth off, as in the pod: refusals, the open endpoints,
masks identical to the direct answer over REST and gRPC, token rotation the way kubelet
updates a Secret volume, failing closed, the CLI and a short Locust run through it."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import requests

from client.cli import main as cli_main
from client.grpc_client import GrpcClient
from client.grpc_stubs import load_stubs
from client.outputs import output_path
from client.rest import RestClient
from serving.archive import ArchiveOptions
from serving.properties import read_properties

from .auth_proxy import (
    SHIPPED_DIR,
    TOKENS_KEY,
    UI_TOKEN_KEY,
    ProxyConfigError,
    ProxyEndpoints,
    ProxyStartError,
    render_config,
    running_auth_proxy,
    write_secret_volume,
)
from .conftest import REPO

OLD_TOKEN = "segserve-test-old-3f9c1e7a5b"
NEW_TOKEN = "segserve-test-new-a41c77e0b3"
UI_TOKEN = "segserve-test-ui-5d2e90c4f1"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# The pod's TorchServe: every listener on 127.0.0.1 (ports replaced by free ones), no tokens.
POD_LOCAL = {
    "disable_token_authorization": "true",
    "inference_address": "http://127.0.0.1:8085",
    "management_address": "http://127.0.0.1:8081",
    "metrics_address": "http://127.0.0.1:8086",
    "grpc_inference_address": "127.0.0.1",
    "grpc_management_address": "127.0.0.1",
}


def live(test):
    """Needs the real TorchServe (slow, serving)."""
    return pytest.mark.slow(pytest.mark.serving(test))


def _png(size: tuple[int, int] = (48, 80)) -> bytes:
    from k8s.tools.deploy import smoke_png

    return smoke_png(size)


def _noise_png(height: int = 768, width: int = 1024) -> bytes:
    """Random pixels: a PNG that does not compress, larger than nginx's default 1 MiB limit."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _predict_status(proxy: ProxyEndpoints, token: str | None) -> int:
    url = f"{proxy.rest_url}/predictions/segmenter"
    return requests.post(url, data=_png(), headers=_bearer(token), timeout=60).status_code


def _grpc_call(target: str, metadata: list[tuple[str, str]], method: str = "Predictions"):
    """(status code, details) of one raw call: the exact status the client library sees."""
    stubs = load_stubs()
    with grpc.insecure_channel(target) as channel:
        stub = stubs.inference_pb2_grpc.InferenceAPIsServiceStub(channel)
        if method == "Ping":
            from google.protobuf import empty_pb2

            call, request = stub.Ping, empty_pb2.Empty()
        else:
            call = stub.Predictions
            request = stubs.inference_pb2.PredictionsRequest(
                model_name="segmenter", input={"data": _png(), "output": b"mask"}
            )
        try:
            call(request, timeout=60, metadata=metadata)
        except grpc.RpcError as err:
            return err.code(), err.details() or ""
        return grpc.StatusCode.OK, ""


def _grpc_metadata(token: str | None) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")] if token else []


def _grpc_code(proxy: ProxyEndpoints, token: str | None) -> grpc.StatusCode:
    return _grpc_call(proxy.grpc_target, _grpc_metadata(token))[0]


def _access_lines(proxy: ProxyEndpoints, until, timeout_s: float = 5.0) -> list[dict]:
    """The access log's JSON lines once ``until(lines)`` holds: nginx writes a request's line
    after sending the answer, so the client may read the log before it is there."""
    deadline = time.monotonic() + timeout_s
    while True:
        lines = [json.loads(line) for line in proxy.access_log.read_text().splitlines()]
        if until(lines) or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


@pytest.fixture(scope="module")
def backend(torchserve_factory, tiny_archive):
    return torchserve_factory(tiny_archive, overrides=POD_LOCAL)


def _upstream(info) -> dict[str, str]:
    return {
        "rest": info.inference_url.split("://")[1],
        "grpc": info.grpc_inference_target,
        "metrics": info.metrics_url.split("://")[1],
    }


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """The Secret volume's mount, holding OLD_TOKEN."""
    mount = tmp_path / "secret"
    write_secret_volume(mount, {TOKENS_KEY: f"# segserve API tokens\n\n{OLD_TOKEN}\n"})
    return mount


@pytest.fixture
def proxy(backend, secret: Path, tmp_path: Path):
    with running_auth_proxy(_upstream(backend), secret / TOKENS_KEY, tmp_path / "nginx") as ep:
        yield ep


# --- The shipped config against config.properties (no server) --------------------------------

_TOKEN_RE = re.compile(r"""'[^']*'|"[^"]*"|[{};]|#[^\n]*|[^\s{};'"#]+""")


def _parse(text: str) -> list[tuple[str, list[str], list | None]]:
    """nginx.conf as a tree of (directive, args, children or None); comments dropped."""
    stack: list[list] = [[]]
    words: list[str] = []
    for token in _TOKEN_RE.findall(text):
        if token.startswith("#"):
            continue
        if token == ";":
            stack[-1].append((words[0], words[1:], None))
            words = []
        elif token == "{":
            block: list = []
            stack[-1].append((words[0], words[1:], block))
            stack.append(block)
            words = []
        elif token == "}":
            stack.pop()
        else:
            words.append(token.strip("'\""))
    return stack[0]


def _args(block: list, name: str) -> list[str]:
    found = [args for directive, args, _ in block if directive == name]
    assert len(found) == 1, f"{name} occurs {len(found)} times in its block, expected once"
    return found[0]


def _server(http: list, listen: str) -> list:
    found = [b for d, _, b in http if d == "server" and _args(b, "listen")[0] == listen]
    assert len(found) == 1, f"{len(found)} servers listen on {listen}, expected one"
    return found[0]


def _bytes(size: str) -> int:
    scale = {"k": 1024, "m": 1024**2, "g": 1024**3}
    return int(size[:-1]) * scale[size[-1].lower()] if size[-1].isalpha() else int(size)


def _seconds(value: str) -> int:
    return int(value[:-1]) * {"s": 1, "m": 60}[value[-1]] if value[-1].isalpha() else int(value)


def test_shipped_limits_agree_with_config_properties():
    props = read_properties(REPO / "config.properties")
    max_request = int(props["max_request_size"])
    response_timeout = max(
        int(props["default_response_timeout"]), ArchiveOptions().response_timeout_s
    )
    tree = _parse((SHIPPED_DIR / "nginx.conf").read_text())
    (http,) = [b for d, _, b in tree if d == "http"]
    rest, grpc_server = _server(http, "8080"), _server(http, "7070")

    # A body TorchServe accepts must not be refused first by nginx (whose default is 1 MiB).
    assert _bytes(_args(rest, "client_max_body_size")[0]) >= max_request
    # gRPC: a body is a whole stream of messages, each limited by TorchServe: none here.
    assert _args(grpc_server, "client_max_body_size") == ["0"]
    # Longer than the model may take, so a slow batch ends in TorchServe's answer, not a 504.
    for block, name in [
        (http, "proxy_read_timeout"),
        (http, "proxy_send_timeout"),
        (grpc_server, "grpc_read_timeout"),
        (grpc_server, "grpc_send_timeout"),
    ]:
        assert _seconds(_args(block, name)[0]) >= response_timeout + 10, name
    # The pod's layout: the ConfigMap and the Secret's mounts, every written path under /tmp.
    assert _args(http, "js_import") == ["auth", "from", "/etc/nginx/segserve/auth.js"]
    # The Secret segserve-api-tokens first, then the UI's token (k8s/components/ui projects it
    # into the same mount; k8s-validate holds the Deployment's volumes to this list).
    assert _args(http, "js_var") == [
        "$segserve_tokens_files",
        f"/etc/segserve/auth/{TOKENS_KEY} /etc/segserve/auth/{UI_TOKEN_KEY}",
    ]
    written = [_args(tree, "pid")[0]] + [args[0] for d, args, _ in http if d.endswith("_temp_path")]
    assert len(written) == 6 and all(p.startswith("/tmp/") for p in written), written
    assert _args(tree, "error_log")[0] == "stderr"
    assert _args(http, "access_log")[0] == "/dev/stdout"
    log_format = " ".join(_args(http, "log_format"))
    assert "$http_" in log_format and "authorization" not in log_format.lower()


def test_the_test_runs_the_shipped_config_or_fails_loudly(tmp_path):
    shipped = (SHIPPED_DIR / "nginx.conf").read_text()
    ports = {"rest": 1, "grpc": 2, "metrics": 3}
    upstream = {"rest": "127.0.0.1:4", "grpc": "127.0.0.1:5", "metrics": "127.0.0.1:6"}
    paths = (tmp_path / "tokens", tmp_path, tmp_path / "njs.so", tmp_path / "auth.js")
    rendered = render_config(shipped, ports, upstream, *paths)
    assert "listen 127.0.0.1:2 http2;" in rendered and "server 127.0.0.1:5;" in rendered
    # Everything else is the shipped text, line for line.
    changed = [
        a for a, b in zip(shipped.splitlines(), rendered.splitlines(), strict=True) if a != b
    ]
    assert len(changed) == 3 + 3 + 3 + 6, changed
    for broken, why in [
        (shipped.replace("listen 8082;", "listen 9090;"), "'listen 8082;' 0 times"),
        (shipped.replace("pid /tmp/nginx.pid;", "pid /run/nginx.pid;"), "pid /tmp/"),
        (shipped.replace("http {", "http {\n    include /etc/nginx/mime.types;", 1), "mime"),
    ]:
        with pytest.raises(ProxyConfigError, match=re.escape(why)):
            render_config(broken, ports, upstream, *paths)
    # A config nginx refuses: the error names nginx's own complaint.
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "nginx.conf").write_text(shipped.replace("worker_processes 2;", "worker_processes x;"))
    (bad / "auth.js").write_text((SHIPPED_DIR / "auth.js").read_text())
    nothing = dict.fromkeys(("rest", "grpc", "metrics"), "127.0.0.1:1")
    with pytest.raises(ProxyStartError, match="invalid value"):
        with running_auth_proxy(nothing, tmp_path / "tokens", tmp_path / "n", bad):
            pass


# --- nginx alone: refusals come before any upstream ----------------------------------------


def test_refusals_happen_in_the_proxy_before_any_upstream(tmp_path, secret):
    from serving.server import free_port

    nothing = {key: f"127.0.0.1:{free_port()}" for key in ("rest", "grpc", "metrics")}
    with running_auth_proxy(nothing, secret / TOKENS_KEY, tmp_path / "nginx") as proxy:
        url = f"{proxy.rest_url}/predictions/segmenter"
        for headers, why in [
            ({}, "needs Authorization: Bearer <token>"),
            (_bearer("not-a-token"), "is not one of the tokens"),
            ({"Authorization": f"Basic {OLD_TOKEN}"}, "needs Authorization: Bearer <token>"),
        ]:
            r = requests.post(url, data=_png(), headers=headers, timeout=10)
            assert r.status_code == 401, (headers, r.text)
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
            assert r.headers["Content-Type"] == "application/json"
            body = r.json()
            assert body["code"] == 401 and body["type"] == "Unauthorized"
            assert why in body["message"] and "segserve-api-tokens" in body["message"]
        # The right token is let through: nothing listens behind, so nginx answers a JSON 503
        # (retryable: TorchServe starting or restarting), not its HTML 502 page.
        down = requests.post(url, data=b"x", headers=_bearer(OLD_TOKEN), timeout=10)
        assert down.status_code == 503 and down.json()["type"] == "ServiceUnavailable", down.text
        # The sidecar's liveness does not depend on TorchServe.
        health = requests.get(f"{proxy.rest_url}/proxy-health", timeout=10)
        assert health.status_code == 200 and health.json() == {"status": "Healthy"}
        # Only GET /ping is open.
        assert requests.post(f"{proxy.rest_url}/ping", timeout=10).status_code == 403

        code, details = _grpc_call(proxy.grpc_target, [])
        assert code == grpc.StatusCode.UNAUTHENTICATED and "Bearer <token>" in details
        code, details = _grpc_call(proxy.grpc_target, [("authorization", "Bearer not-a-token")])
        assert code == grpc.StatusCode.UNAUTHENTICATED and "not one of the tokens" in details
        code, _ = _grpc_call(proxy.grpc_target, [("authorization", f"Bearer {OLD_TOKEN}")])
        assert code == grpc.StatusCode.UNAVAILABLE  # let through; nothing behind

        # One line per request but /proxy-health (not logged: the probe would flood the log).
        lines = _access_lines(proxy, lambda lines: len(lines) >= 8)
        statuses = [line["status"] for line in lines if line["protocol"] == "HTTP/1.1"]
        assert sorted(statuses) == [401, 401, 401, 403, 503], statuses
        grpc_statuses = [line["grpc_status"] for line in lines if line["protocol"] == "HTTP/2.0"]
        assert sorted(grpc_statuses) == ["14", "16", "16"], grpc_statuses
        errors = proxy.error_log.read_text()
        assert "segserve auth: a bearer token that is not in" in errors
        logged = proxy.access_log.read_text() + errors
        assert OLD_TOKEN not in logged and "not-a-token" not in logged


def _let_through(proxy: ProxyEndpoints, token: str) -> tuple[int, grpc.StatusCode]:
    """(REST status, gRPC code) of a call with ``token`` when nothing listens behind the proxy:
    (503, UNAVAILABLE) once the token is accepted, (401, UNAUTHENTICATED) when refused."""
    url = f"{proxy.rest_url}/predictions/segmenter"
    status = requests.post(url, data=b"x", headers=_bearer(token), timeout=10).status_code
    return status, _grpc_call(proxy.grpc_target, _grpc_metadata(token))[0]


ACCEPTED = (503, grpc.StatusCode.UNAVAILABLE)
REFUSED = (401, grpc.StatusCode.UNAUTHENTICATED)


def test_a_token_only_in_the_second_file_is_accepted(tmp_path):
    """The pod's projected volume (k8s/components/ui): segserve-api-tokens' `tokens` and the
    UI's own Secret as `ui-token`, side by side in one mount, each read on every request."""
    from serving.server import free_port

    mount = tmp_path / "auth"
    write_secret_volume(mount, {TOKENS_KEY: f"{OLD_TOKEN}\n", UI_TOKEN_KEY: f"{UI_TOKEN}\n"})
    files = [mount / TOKENS_KEY, mount / UI_TOKEN_KEY]
    nothing = {key: f"127.0.0.1:{free_port()}" for key in ("rest", "grpc", "metrics")}
    with running_auth_proxy(nothing, files, tmp_path / "nginx") as proxy:
        workers = proxy.worker_pids()
        assert _let_through(proxy, UI_TOKEN) == ACCEPTED
        assert _let_through(proxy, OLD_TOKEN) == ACCEPTED
        assert _let_through(proxy, "not-a-token") == REFUSED
        # Each line of each file is one token: two glued together match neither.
        assert _let_through(proxy, OLD_TOKEN + UI_TOKEN) == REFUSED

        # The UI's Secret rotated: the new token applies at once, the old one is refused.
        write_secret_volume(mount, {TOKENS_KEY: f"{OLD_TOKEN}\n", UI_TOKEN_KEY: f"{NEW_TOKEN}\n"})
        assert _let_through(proxy, NEW_TOKEN) == ACCEPTED
        assert _let_through(proxy, UI_TOKEN) == REFUSED
        assert _let_through(proxy, OLD_TOKEN) == ACCEPTED
        assert proxy.worker_pids() == workers  # neither restarted nor reloaded
        logged = proxy.access_log.read_text() + proxy.error_log.read_text()
        assert UI_TOKEN not in logged and NEW_TOKEN not in logged


def test_without_the_second_file_the_first_still_works(tmp_path):
    """The UI's Secret is optional in the projected volume: until it exists only `tokens` is
    there, and the missing file is skipped without a word per request."""
    from serving.server import free_port

    mount = tmp_path / "auth"
    write_secret_volume(mount, {TOKENS_KEY: f"# segserve API tokens\n{OLD_TOKEN}\n"})
    files = [mount / TOKENS_KEY, mount / UI_TOKEN_KEY]
    nothing = {key: f"127.0.0.1:{free_port()}" for key in ("rest", "grpc", "metrics")}
    with running_auth_proxy(nothing, files, tmp_path / "nginx") as proxy:
        assert _let_through(proxy, OLD_TOKEN) == ACCEPTED
        assert _let_through(proxy, UI_TOKEN) == REFUSED
        r = requests.post(
            f"{proxy.rest_url}/predictions/segmenter", headers=_bearer(UI_TOKEN), timeout=10
        )
        assert "is not one of the tokens" in r.json()["message"]
        assert "cannot read" not in proxy.error_log.read_text()

        # The optional Secret created later: kubelet adds its file, the proxy takes it at once.
        write_secret_volume(mount, {TOKENS_KEY: f"{OLD_TOKEN}\n", UI_TOKEN_KEY: f"{UI_TOKEN}\n"})
        assert _let_through(proxy, UI_TOKEN) == ACCEPTED

        # Only the UI's file left (never so in the pod: segserve-api-tokens is not optional):
        # its token is accepted, the API tokens' are gone.
        write_secret_volume(mount, {UI_TOKEN_KEY: f"{UI_TOKEN}\n"})
        assert (_let_through(proxy, UI_TOKEN), _let_through(proxy, OLD_TOKEN)) == (
            ACCEPTED,
            REFUSED,
        )

        # Neither file: everything refused, the error names both.
        write_secret_volume(mount, {"other-key": "x\n"})
        r = requests.post(
            f"{proxy.rest_url}/predictions/segmenter", headers=_bearer(OLD_TOKEN), timeout=10
        )
        assert r.status_code == 401 and "no API token is configured" in r.json()["message"]
        errors = proxy.error_log.read_text()
        assert f"cannot read the token file {mount / TOKENS_KEY} (" in errors
        assert f", {mount / UI_TOKEN_KEY} (" in errors


# --- With TorchServe behind it -------------------------------------------------------------


@live
def test_rest_with_the_token_answers_what_torchserve_answers(proxy, backend):
    image = _png()
    direct = RestClient(backend.inference_url, token=None).predict(image).content
    via = RestClient(proxy.rest_url, token=OLD_TOKEN).predict(image).content
    assert via[:8] == PNG_MAGIC and via == direct
    url = f"{proxy.rest_url}/predictions/segmenter"
    assert requests.post(url, data=image, timeout=60).status_code == 401

    # Larger than nginx's default body limit: the raised limit lets a real photo through.
    big = _noise_png()
    assert len(big) > 2 * 1024 * 1024
    direct_big = RestClient(backend.inference_url, token=None).predict(big).content
    assert RestClient(proxy.rest_url, token=OLD_TOKEN).predict(big).content == direct_big
    with GrpcClient(proxy.grpc_target, token=OLD_TOKEN) as client:
        assert client.predict(big).content == direct_big

    headers = {**_bearer(OLD_TOKEN), "X-Request-Id": "req-7f3a"}
    assert requests.post(url, data=image, headers=headers, timeout=60).status_code == 200
    lines = _access_lines(proxy, lambda lines: any(x["request_id"] for x in lines))
    (line,) = [x for x in lines if x["request_id"] == "req-7f3a"]
    assert line["status"] == 200 and line["upstream_status"] == "200"
    assert OLD_TOKEN not in proxy.access_log.read_text() + proxy.error_log.read_text()


@live
def test_probes_and_metrics_need_no_token(proxy):
    ping = requests.get(f"{proxy.rest_url}/ping", timeout=10)
    assert ping.status_code == 200 and ping.json()["status"] == "Healthy"
    assert _predict_status(proxy, OLD_TOKEN) == 200
    metrics = requests.get(f"{proxy.metrics_url}/metrics", timeout=10)
    assert metrics.status_code == 200 and "ts_inference_requests_total" in metrics.text
    with GrpcClient(proxy.grpc_target) as client:
        assert client.ping() == "Healthy"


@live
def test_grpc_with_the_token_answers_what_torchserve_answers(proxy, backend):
    image = _png()
    direct = RestClient(backend.inference_url, token=None).predict(image).content
    assert _grpc_code(proxy, None) == grpc.StatusCode.UNAUTHENTICATED
    assert _grpc_code(proxy, "not-a-token") == grpc.StatusCode.UNAUTHENTICATED
    with GrpcClient(proxy.grpc_target, token=OLD_TOKEN) as client:
        assert client.predict(image).content == direct
        assert client.predict_via_stream(image).content == direct


@live
def test_rotation_applies_without_restarting_nginx(proxy, secret):
    workers = proxy.worker_pids()
    assert len(workers) == 2
    assert (_predict_status(proxy, OLD_TOKEN), _predict_status(proxy, NEW_TOKEN)) == (200, 401)

    # Overlap: both tokens valid while clients move over.
    write_secret_volume(secret, {TOKENS_KEY: f"{OLD_TOKEN}\n{NEW_TOKEN}\n"})
    assert (_predict_status(proxy, OLD_TOKEN), _predict_status(proxy, NEW_TOKEN)) == (200, 200)

    write_secret_volume(secret, {TOKENS_KEY: f"# rotated\n{NEW_TOKEN}\n"})
    assert (_predict_status(proxy, OLD_TOKEN), _predict_status(proxy, NEW_TOKEN)) == (401, 200)
    assert _grpc_code(proxy, OLD_TOKEN) == grpc.StatusCode.UNAUTHENTICATED
    assert _grpc_code(proxy, NEW_TOKEN) == grpc.StatusCode.OK

    # kubelet's layout, as written: the key is a symlink into the swapped ..data folder.
    assert os.readlink(secret / TOKENS_KEY) == f"..data/{TOKENS_KEY}"
    assert len([p for p in secret.iterdir() if p.name.startswith("..2")]) == 1
    # Same master, same workers: neither restarted nor reloaded.
    assert Path(f"/proc/{proxy.pid}").exists() and proxy.worker_pids() == workers


@live
def test_no_token_file_refuses_all_but_the_open_endpoints(backend, tmp_path):
    mount = tmp_path / "secret"
    write_secret_volume(mount, {"other-key": "x\n"})  # the Secret lacks the key `tokens`
    with running_auth_proxy(_upstream(backend), mount / TOKENS_KEY, tmp_path / "nginx") as proxy:
        r = requests.post(f"{proxy.rest_url}/predictions/segmenter", data=_png(), timeout=60)
        assert r.status_code == 401 and "no API token is configured" in r.json()["message"]
        assert _predict_status(proxy, OLD_TOKEN) == 401
        assert _grpc_code(proxy, OLD_TOKEN) == grpc.StatusCode.UNAUTHENTICATED
        assert requests.get(f"{proxy.rest_url}/ping", timeout=10).status_code == 200
        assert requests.get(f"{proxy.rest_url}/proxy-health", timeout=10).status_code == 200
        assert requests.get(f"{proxy.metrics_url}/metrics", timeout=10).status_code == 200
        assert _grpc_call(proxy.grpc_target, [], "Ping")[0] == grpc.StatusCode.OK
        assert "segserve auth: cannot read the token file" in proxy.error_log.read_text()

        # A file with comments only is no better.
        write_secret_volume(mount, {TOKENS_KEY: "# nothing yet\n\n"})
        assert _predict_status(proxy, OLD_TOKEN) == 401
        assert "holds no token" in proxy.error_log.read_text()
        # The Secret fixed: accepted at once, no restart.
        write_secret_volume(mount, {TOKENS_KEY: f"{OLD_TOKEN}\n"})
        assert _predict_status(proxy, OLD_TOKEN) == 200


@live
def test_cli_with_token_works_through_the_proxy(proxy, backend, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("SEGSERVE_TOKEN", raising=False)
    monkeypatch.chdir(tmp_path)  # no ./key_file.json to fall back on
    image = tmp_path / "scene.png"
    image.write_bytes(_png())
    direct = RestClient(backend.inference_url, token=None).predict(image.read_bytes()).content
    for protocol in ("rest", "grpc"):
        out = tmp_path / protocol
        argv = ["predict", str(image), "--protocol", protocol, "--out-dir", str(out)]
        argv += ["--url", proxy.rest_url, "--grpc-target", proxy.grpc_target, "--retries", "0"]
        assert cli_main([*argv, "--token", OLD_TOKEN]) == 0, capsys.readouterr()
        assert output_path(out, image, "mask").read_bytes() == direct
        capsys.readouterr()
        assert cli_main(argv) == 1
        assert "segserve-api-tokens" in capsys.readouterr().err
    assert cli_main(["ping", "--url", proxy.rest_url]) == 0  # open without a token


def _locust(proxy: ProxyEndpoints, out: Path, duration: str, token: str | None):
    env = {k: v for k, v in os.environ.items() if k != "SEGSERVE_TOKEN"}
    if token:
        env["SEGSERVE_TOKEN"] = token
    args = [
        sys.executable, "-m", "loadtest.run",
        "--host", proxy.rest_url, "--grpc-host", proxy.grpc_target,
        "--users", "2", "--spawn-rate", "2", "--duration", duration,
        # Generous on purpose: this checks the auth path on a shared 2-core box, not speed.
        "--slo-p95-ms", "20000", "--slo-error-rate", "0", "--out", str(out),
    ]  # fmt: skip
    # cwd: a folder without key_file.json, so the only token is the one given here.
    done = subprocess.run(
        args, cwd=out.parent, env=env, capture_output=True, text=True, timeout=120
    )
    report = out / "report.json"
    assert report.is_file(), done.stdout[-3000:] + done.stderr[-3000:]
    return done, json.loads(report.read_text())["summaries"]


@live
def test_locust_through_the_proxy_needs_the_token(proxy, tmp_path):
    done, summaries = _locust(proxy, tmp_path / "with_token", "8s", OLD_TOKEN)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for scope in ("rest", "grpc"):
        assert summaries[scope]["requests"] > 0 and summaries[scope]["failures"] == 0, summaries

    done, summaries = _locust(proxy, tmp_path / "without_token", "3s", None)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    for scope in ("rest", "grpc"):
        s = summaries[scope]
        assert s["requests"] > 0 and s["failures"] == s["requests"], summaries
    with (tmp_path / "without_token" / "locust_failures.csv").open() as f:
        errors = {row["Method"]: row["Error"] for row in csv.DictReader(f)}
    assert "HTTP 401" in errors["POST"] and "segserve-api-tokens" in errors["POST"], errors
    assert "refused the inference token" in errors["grpc"], errors  # UNAUTHENTICATED
    assert "segserve-api-tokens" in errors["grpc"]


@live
def test_oversized_requests_are_refused_as_torchserve_refuses_them(proxy, backend):
    from client.grpc_client import _CHANNEL_OPTIONS

    limit = int(read_properties(REPO / "config.properties")["max_request_size"])
    url = "{}/predictions/segmenter"
    body = b"x" * (limit + 1)
    direct = requests.post(url.format(backend.inference_url), data=body, timeout=60)
    via = requests.post(
        url.format(proxy.rest_url), data=body, headers=_bearer(OLD_TOKEN), timeout=60
    )
    assert direct.status_code == via.status_code == 413
    assert via.json()["code"] == 413 and str(limit) in via.json()["message"]

    # gRPC: TorchServe resets a stream whose message is above the limit (a bare CANCELLED when
    # called directly); through the proxy the client gets UNAVAILABLE saying why.
    stubs = load_stubs()
    request = stubs.inference_pb2.PredictionsRequest(
        model_name="segmenter", input={"data": b"x" * (limit + 100)}
    )
    with grpc.insecure_channel(proxy.grpc_target, _CHANNEL_OPTIONS) as channel:
        stub = stubs.inference_pb2_grpc.InferenceAPIsServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.Predictions(request, timeout=60, metadata=_grpc_metadata(OLD_TOKEN))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "max_request_size" in err.value.details()
    # Under the limit, a large message reaches the handler (which refuses these bytes as an
    # image, inside a normal answer): nginx adds no limit of its own.
    request = stubs.inference_pb2.PredictionsRequest(
        model_name="segmenter", input={"data": b"x" * (limit // 2)}
    )
    with grpc.insecure_channel(proxy.grpc_target, _CHANNEL_OPTIONS) as channel:
        stub = stubs.inference_pb2_grpc.InferenceAPIsServiceStub(channel)
        answer = stub.Predictions(request, timeout=60, metadata=_grpc_metadata(OLD_TOKEN))
    assert 400 <= json.loads(answer.prediction)["code"] < 500

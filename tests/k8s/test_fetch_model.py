"""fetch_model.py (the init container) against real local HTTPS and HTTP servers.

The HTTPS server uses a throwaway self-signed certificate (openssl CLI) that the script trusts
through ``--ca-file``; a plain HTTP server next to it counts its requests, so a test can prove
that a refused http:// URL or redirect was never even fetched.
"""

from __future__ import annotations

import hashlib
import http.server
import importlib.util
import json
import os
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from k8s.tools import consistency as cc

from .conftest import REPO, self_signed_cert

SCRIPT = REPO / "k8s/base/scripts/fetch_model.py"
PAYLOAD = b"PK\x03\x04" + bytes(range(256)) * 4000  # ~1 MB: several download chunks
PIN = hashlib.sha256(PAYLOAD).hexdigest()
# Only the keys fetch_model.py reads; the full manifest is serving.archive.write_manifest's.
MANIFEST = {"name": "segmenter", "mar": "segmenter.mar", "sha256": PIN}


def _load():
    name = "segserve_k8s_fetch_model"
    if name not in sys.modules:  # registered first: @dataclass looks its module up there
        spec = importlib.util.spec_from_file_location(name, SCRIPT)
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


@dataclass
class Servers:
    https: str
    http: str
    ca_file: Path
    hits: Counter  # (scheme, path) -> requests served


def _handler(scheme: str, hits: Counter, other: dict[str, str]):
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, body: bytes, length: int | None = None) -> None:
            self.send_response(200)
            if length is not None:
                self.send_header("Content-Length", str(length))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):  # noqa: N802 (http.server's naming)
            hits[(scheme, self.path)] += 1
            if self.path == "/segmenter.mar":
                self._send(PAYLOAD, len(PAYLOAD))
            elif self.path == "/segmenter.manifest.json":
                body = json.dumps(MANIFEST).encode()
                self._send(body, len(body))
            elif self.path == "/undeclared.mar":  # no Content-Length: the body ends at close
                self._send(PAYLOAD)
            elif self.path == "/huge.mar":  # declares far more than it sends
                self._send(PAYLOAD[:10], 10 << 30)
            elif self.path.startswith("/to-"):  # /to-http/x, /to-https/x: 302 to that server
                target, rest = self.path[4:].split("/", 1)
                self.send_response(302)
                self.send_header("Location", f"{other[target]}/{rest}")
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif self.path == "/slow.mar":  # ~10 KB/s: a 1 MB archive would take 100 s
                self.send_response(200)
                self.send_header("Content-Length", str(len(PAYLOAD)))
                self.end_headers()
                try:
                    for i in range(0, len(PAYLOAD), 512):
                        self.wfile.write(PAYLOAD[i : i + 512])
                        self.wfile.flush()
                        time.sleep(0.05)
                except OSError:
                    pass  # the client gave up, as it should
            else:
                self.send_error(404)

    return Handler


@pytest.fixture(scope="module")
def servers(tmp_path_factory) -> Servers:
    cert, key = self_signed_cert(tmp_path_factory.mktemp("tls"))
    hits: Counter = Counter()
    urls: dict[str, str] = {}
    started = []
    for scheme in ("https", "http"):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(scheme, hits, urls))
        if scheme == "https":
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(cert, key)
            server.socket = context.wrap_socket(server.socket, server_side=True)
        urls[scheme] = f"{scheme}://127.0.0.1:{server.server_address[1]}"
        threading.Thread(target=server.serve_forever, daemon=True).start()
        started.append(server)
    yield Servers(urls["https"], urls["http"], cert, hits)
    for server in started:
        server.shutdown()


@pytest.fixture
def store(tmp_path: Path) -> Path:
    path = tmp_path / "store"
    path.mkdir()
    return path


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MODEL_", "MANIFEST_"))}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean | (env or {}),
    )


def _fetch(servers: Servers, store: Path, path: str, *extra: str, **kw):
    return _run(
        "--url",
        f"{servers.https}{path}",
        "--ca-file",
        str(servers.ca_file),
        "--dest",
        str(store),
        "--retries",
        "1",
        *extra,
        **kw,
    )


def test_pinned_https_download_is_installed(servers, store):
    done = _fetch(
        servers,
        store,
        "/segmenter.mar",
        "--manifest-url",
        f"{servers.https}/segmenter.manifest.json",
        env={"MODEL_SHA256": PIN.upper()},
    )
    assert done.returncode == 0, done.stderr
    assert (store / "segmenter.mar").read_bytes() == PAYLOAD
    assert json.loads((store / "segmenter.manifest.json").read_text()) == MANIFEST
    assert sorted(p.name for p in store.iterdir()) == ["segmenter.manifest.json", "segmenter.mar"]


def test_https_to_https_redirect_is_followed(servers, store):
    done = _fetch(servers, store, "/to-https/segmenter.mar", "--sha256", PIN)
    assert done.returncode == 0, done.stderr
    assert (store / "segmenter.mar").read_bytes() == PAYLOAD


def test_a_manifest_alone_is_not_trusted(servers, store):
    manifest = f"{servers.https}/segmenter.manifest.json"
    done = _fetch(servers, store, "/segmenter.mar", "--manifest-url", manifest)
    assert done.returncode == 1
    assert "no pinned sha256: set MODEL_SHA256" in done.stderr
    assert list(store.iterdir()) == []


def test_the_base_placeholder_pin_is_refused_before_any_request(servers, store):
    before = servers.hits[("https", "/segmenter.mar")]
    done = _fetch(servers, store, "/segmenter.mar", env={"MODEL_SHA256": cc.SHA256_PLACEHOLDER})
    assert done.returncode == 1
    assert f"still the placeholder {cc.SHA256_PLACEHOLDER}" in done.stderr
    assert servers.hits[("https", "/segmenter.mar")] == before
    assert list(store.iterdir()) == []


def test_wrong_digest_is_refused_and_leaves_nothing(servers, store):
    done = _fetch(servers, store, "/segmenter.mar", "--sha256", "0" * 64)
    assert done.returncode == 1
    assert f"sha256 {PIN} != pinned {'0' * 64}" in done.stderr
    assert "Traceback" not in done.stderr
    assert list(store.iterdir()) == []


def test_pin_must_agree_with_manifest(servers, store):
    done = _fetch(
        servers,
        store,
        "/segmenter.mar",
        "--manifest-url",
        f"{servers.https}/segmenter.manifest.json",
        "--sha256",
        "a" * 64,
    )
    assert done.returncode == 1
    assert f"manifest sha256 {PIN} != pinned MODEL_SHA256 {'a' * 64}" in done.stderr
    assert list(store.iterdir()) == []


def test_http_url_is_refused_before_any_request(servers, store):
    done = _run("--url", f"{servers.http}/segmenter.mar", "--sha256", PIN, "--dest", str(store))
    assert done.returncode == 1
    assert f"{servers.http}/segmenter.mar: http:// is refused" in done.stderr
    assert servers.hits[("http", "/segmenter.mar")] == 0
    assert list(store.iterdir()) == []


def test_redirect_from_https_to_http_is_refused(servers, store):
    before = servers.hits[("http", "/segmenter.mar")]
    done = _fetch(servers, store, "/to-http/segmenter.mar", "--sha256", PIN)
    assert done.returncode == 1
    assert f"redirects to {servers.http}/segmenter.mar, which is not https://" in done.stderr
    assert servers.hits[("http", "/segmenter.mar")] == before  # never followed
    assert list(store.iterdir()) == []


@pytest.mark.parametrize("path", ["/undeclared.mar", "/huge.mar"])
def test_download_over_the_size_cap_is_refused_and_removed(servers, store, path):
    # /undeclared.mar is caught while streaming; /huge.mar by its Content-Length up front.
    done = _fetch(servers, store, path, "--sha256", PIN, "--max-bytes", "100000")
    assert done.returncode == 1
    assert "-byte cap (--max-bytes / MODEL_MAX_BYTES)" in done.stderr and path in done.stderr
    assert list(store.iterdir()) == []  # no .part left behind


def test_slow_download_hits_the_total_deadline(servers, store):
    started = time.monotonic()
    done = _fetch(servers, store, "/slow.mar", "--sha256", PIN, "--deadline", "2")
    elapsed = time.monotonic() - started
    assert done.returncode == 1
    assert "not complete after the 2 s deadline" in done.stderr
    # Each read returns quickly (a trickle is never a socket timeout): only a total deadline
    # stops it. 2 s + interpreter start; a 100 s download would mean no deadline at all.
    assert elapsed < 8, elapsed
    assert list(store.iterdir()) == []


def test_untrusted_certificate_is_refused_without_retries(servers, store):
    started = time.monotonic()
    done = _run("--url", f"{servers.https}/segmenter.mar", "--sha256", PIN, "--dest", str(store))
    assert done.returncode == 1
    assert "TLS certificate not trusted" in done.stderr and "--ca-file" in done.stderr
    assert time.monotonic() - started < 5  # 3 retries would sleep 2 + 4 s
    assert list(store.iterdir()) == []


def test_missing_archive_is_a_clear_http_error(servers, store):
    done = _fetch(servers, store, "/nope.mar", "--sha256", PIN)
    assert done.returncode == 1
    assert "HTTP 404" in done.stderr and "nope.mar" in done.stderr


def test_pin_alone_works_with_file_urls(tmp_path, store):
    mar = tmp_path / "segmenter.mar"
    mar.write_bytes(PAYLOAD)
    done = _run("--url", mar.as_uri(), "--sha256", PIN, "--dest", str(store))
    assert done.returncode == 0, done.stderr
    assert (store / "segmenter.mar").read_bytes() == PAYLOAD


@pytest.mark.parametrize(
    "manifest, pin, message",
    [
        (None, None, "no pinned sha256"),
        (MANIFEST, None, "no pinned sha256"),  # the manifest never stands in for the pin
        ({"name": "segmenter"}, PIN, "no 'sha256' key"),
        ({"sha256": "xyz"}, PIN, "not a sha256 hex digest"),
        (None, "xyz", "not a sha256 hex digest"),
    ],
)
def test_expected_sha256_errors_name_the_fix(manifest, pin, message):
    fetch_model = _load()
    with pytest.raises(fetch_model.FetchError, match=message):
        fetch_model.expected_sha256(manifest, pin)


def test_archive_name_rejects_paths():
    fetch_model = _load()
    assert fetch_model.archive_name("s3://b/k/segmenter.mar", None) == "segmenter.mar"
    with pytest.raises(fetch_model.FetchError, match="must be <name>.mar"):
        fetch_model.archive_name("https://h/model.tar.gz", None)
    with pytest.raises(fetch_model.FetchError, match="must be <name>.mar"):
        fetch_model.archive_name("https://h/x.mar", {"mar": "../etc/x.mar"})


def test_placeholder_is_the_one_validation_recognises():
    assert _load().SHA256_PLACEHOLDER == cc.SHA256_PLACEHOLDER

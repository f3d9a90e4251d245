"""The pod's own scripts: fetch_model.py (init container) and drain.py (preStop)."""

from __future__ import annotations

import hashlib
import http.server
import importlib.util
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from .conftest import REPO

SCRIPTS = REPO / "k8s/base/scripts"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"segserve_k8s_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fetch_model = _load("fetch_model")
drain = _load("drain")


@pytest.fixture
def served(tmp_path: Path):
    """An HTTP server over a folder holding a fake segmenter.mar and its manifest."""
    root = tmp_path / "bucket"
    root.mkdir()
    payload = b"PK\x03\x04" + bytes(range(256)) * 4000  # ~1 MB: several download chunks
    (root / "segmenter.mar").write_bytes(payload)
    manifest = {
        "name": "segmenter",
        "version": "1.0",
        "mar": "segmenter.mar",
        "sha256": hashlib.sha256(payload).hexdigest(),
    }
    (root / "segmenter.manifest.json").write_text(json.dumps(manifest))

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(root), **kw)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root, payload, manifest
    server.shutdown()


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPTS / "fetch_model.py"), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_fetch_installs_archive_verified_against_manifest(served, tmp_path):
    url, _, payload, manifest = served
    store = tmp_path / "store"
    store.mkdir()
    done = _run(
        "--url",
        f"{url}/segmenter.mar",
        "--manifest-url",
        f"{url}/segmenter.manifest.json",
        "--sha256",
        "",
        "--dest",
        str(store),
    )
    assert done.returncode == 0, done.stderr
    assert (store / "segmenter.mar").read_bytes() == payload
    assert json.loads((store / "segmenter.manifest.json").read_text()) == manifest
    assert sorted(p.name for p in store.iterdir()) == ["segmenter.manifest.json", "segmenter.mar"]


def test_fetch_refuses_a_corrupt_archive_and_leaves_nothing(served, tmp_path):
    url, root, payload, _ = served
    (root / "segmenter.mar").write_bytes(payload[:-10])  # truncated upload
    store = tmp_path / "store"
    store.mkdir()
    done = _run(
        "--url",
        f"{url}/segmenter.mar",
        "--manifest-url",
        f"{url}/segmenter.manifest.json",
        "--dest",
        str(store),
    )
    assert done.returncode == 1
    assert (
        "sha256" in done.stderr
        and "segmenter.mar" in done.stderr
        and "Traceback" not in done.stderr
    )
    assert list(store.iterdir()) == []


def test_pin_must_agree_with_manifest(served, tmp_path):
    url, *_ = served
    done = _run(
        "--url",
        f"{url}/segmenter.mar",
        "--manifest-url",
        f"{url}/segmenter.manifest.json",
        "--sha256",
        "0" * 64,
        "--dest",
        str(tmp_path),
    )
    assert done.returncode == 1
    assert "pinned MODEL_SHA256" in done.stderr


def test_pin_alone_works_with_file_urls(served, tmp_path):
    _, root, payload, manifest = served
    store = tmp_path / "store"
    store.mkdir()
    done = _run(
        "--url",
        (root / "segmenter.mar").as_uri(),
        "--sha256",
        manifest["sha256"].upper(),
        "--dest",
        str(store),
    )
    assert done.returncode == 0, done.stderr
    assert (store / "segmenter.mar").read_bytes() == payload


def test_missing_archive_is_a_clear_http_error(served, tmp_path):
    url, *_ = served
    done = _run(
        "--url", f"{url}/nope.mar", "--sha256", "a" * 64, "--dest", str(tmp_path), "--retries", "1"
    )
    assert done.returncode == 1
    assert "HTTP 404" in done.stderr and "nope.mar" in done.stderr


@pytest.mark.parametrize(
    "manifest, pin, message",
    [
        (None, None, "no expected sha256"),
        ({"name": "segmenter"}, None, "no 'sha256' key"),
        ({"sha256": "xyz"}, None, "not a sha256 hex digest"),
    ],
)
def test_expected_sha256_errors_name_the_fix(manifest, pin, message):
    with pytest.raises(fetch_model.FetchError, match=message):
        fetch_model.expected_sha256(manifest, pin)


def test_archive_name_rejects_paths():
    assert fetch_model.archive_name("s3://b/k/segmenter.mar", None) == "segmenter.mar"
    with pytest.raises(fetch_model.FetchError, match="must be <name>.mar"):
        fetch_model.archive_name("https://h/model.tar.gz", None)
    with pytest.raises(fetch_model.FetchError, match="must be <name>.mar"):
        fetch_model.archive_name("https://h/x.mar", {"mar": "../etc/x.mar"})


def test_pending_requests_sums_versions():
    assert (
        drain.pending_requests(
            [{"jobQueueStatus": {"pendingRequests": 2}}, {"jobQueueStatus": {"pendingRequests": 5}}]
        )
        == 7
    )
    assert drain.pending_requests([{"modelName": "m"}]) == 0


def test_wait_until_drained_needs_consecutive_quiet_polls():
    values = iter([0, 3, 0, 0])
    slept = []
    assert drain.wait_until_drained(values.__next__, 100, quiet_polls=2, sleep=slept.append)
    assert len(slept) == 3  # 0 (quiet 1), 3 (reset), 0 (quiet 1), 0 (quiet 2: done)


def test_wait_until_drained_times_out():
    now = [0.0]

    def sleep(s: float) -> None:
        now[0] += s

    assert not drain.wait_until_drained(lambda: 1, 5, clock=lambda: now[0], sleep=sleep)
    assert now[0] >= 5


def test_wait_until_drained_treats_a_gone_server_as_drained():
    def gone() -> int:
        raise ConnectionRefusedError

    assert drain.wait_until_drained(gone, 5, sleep=lambda s: None)

"""The serving image, built here without a Docker daemon, runs the pod as the manifests say.

``k8s/tools/image.py`` builds k8s/Dockerfile with buildah (chroot isolation) on a
``debian:bookworm-slim`` made by mmdebstrap. Then the rendered cpu overlay's pod runs inside
it: the fetch-model init container's exact command downloads the archive from a local HTTPS
server and verifies its pin, TorchServe starts with the torchserve container's exact command,
args, env and volumes, and answers REST and gRPC through the real auth proxy with the same
masks as the offline Predictor; the preStop hook drains it and SIGTERM stops it; nothing was
written outside the pod's volumes (the root filesystem is read-only in the pod).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import io
import os
import shutil
import signal
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from k8s.tools import image
from k8s.tools.render import find, render_overlay

from .auth_proxy import TOKENS_KEY, running_auth_proxy, write_secret_volume
from .conftest import REPO, self_signed_cert
from .pod_runner import (
    PodFiles,
    container_env,
    container_process,
    kill_tree,
    run_argv,
    working_container,
    written_since,
)

pytestmark = [pytest.mark.slow, pytest.mark.serving]
FIRST_ANSWER_S = 180.0

TOKEN = "image-test-token-0123456789abcdef"


@pytest.fixture(scope="module")
def serving_image() -> image.Built:
    """The image of k8s/Dockerfile (built now unless the store has one of the same context)."""
    try:
        built = image.build()
    except image.ImageError as exc:
        pytest.fail(str(exc), pytrace=False)
    how = f"built in {built.build_seconds:.0f} s" if built.build_seconds else "reused"
    print(f"\n[image] {built.tag}: {built.size_bytes / 2**30:.2f} GiB, {how}")
    return built


@contextlib.contextmanager
def https_files(folder: Path, cert: Path, key: Path) -> Iterator[str]:
    """``folder`` served over HTTPS on a free loopback port; yields the base URL."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def _free_ports(n: int) -> list[int]:
    """``n`` free ports below the kernel's ephemeral range (32768+). TorchServe binds them
    seconds after they are chosen; a port from bind(0), like the auth proxy's, could be handed
    out again meanwhile (seen: "Address already in use"), one from here cannot."""
    import random
    import socket

    ports: list[int] = []
    for port in random.sample(range(20000, 32000), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == n:
            return ports
    raise RuntimeError(f"no {n} free ports in 20000-32000")


def test_image_is_slim_non_root_and_has_no_build_tools(serving_image):
    config = image.inspect(serving_image.tag)["OCIv1"]["config"]
    assert config["User"] == "1000:1000"
    assert config["Entrypoint"] == ["tini", "-g", "--"]
    with working_container(serving_image.tag) as ctr:
        root = Path(image.buildah("mount", ctr).strip())
        try:
            os_release = (root / "etc/os-release").read_text()
            assert "VERSION_CODENAME=bookworm" in os_release
            venv = root / "opt/segserve/venv"
            site = next(venv.glob("lib/python3*/site-packages"))
            assert (site / "torch-2.15.0.dist-info").is_dir()  # the export's pin
            assert (site / "ts").is_dir() and (root / "usr/bin/java").exists()
            leftovers = (
                [
                    p
                    for p in ("usr/bin/gcc", "usr/bin/cc", "usr/bin/make", "root/.cache/pip")
                    if (root / p).exists()
                ]
                + [p.name for p in venv.glob("bin/pip*")]
                + list(site.glob("pip-*"))
            )
            assert not leftovers, f"build tools or caches in the final stage: {leftovers}"
            lists = [p for p in (root / "var/lib/apt/lists").glob("*") if p.is_file()]
            assert [p.name for p in lists if p.name != "lock"] == [], "apt lists left"
        finally:
            image.buildah("umount", ctr)


def _png(seed: int = 0) -> tuple[bytes, np.ndarray]:
    pixels = np.random.default_rng(seed).integers(0, 256, (72, 96, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue(), pixels


def _wait_ping(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"TorchServe exited ({proc.returncode}):\n{log.read_text()[-4000:]}")
        with contextlib.suppress(requests.RequestException):
            if requests.get(url, timeout=2).status_code == 200:
                return
        time.sleep(1)
    pytest.fail(f"no 200 from {url} within {timeout_s:.0f} s:\n{log.read_text()[-4000:]}")


def test_the_pod_runs_in_the_image(serving_image, tiny_archive, tiny_export, tmp_path):
    from client.grpc_client import GrpcClient
    from client.rest import RestClient
    from training.predict import Predictor

    objects = render_overlay(REPO / "k8s/overlays/cpu")
    deployment = find(objects, "Deployment", "segserve")
    pod = deployment["spec"]["template"]["spec"]
    config_maps = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ConfigMap"}
    files = PodFiles(tmp_path / "volumes", pod, config_maps)
    init = next(c for c in pod["initContainers"] if c["name"] == "fetch-model")
    torchserve = next(c for c in pod["containers"] if c["name"] == "torchserve")
    mar = tiny_archive / "segmenter.mar"

    # 1. the init container fetches and verifies the archive (HTTPS, a private CA)
    cert, key = self_signed_cert(tmp_path)
    ca_dir = tmp_path / "ca"
    ca_dir.mkdir()
    shutil.copy(cert, ca_dir / "ca.pem")
    with https_files(tiny_archive, cert, key) as base:
        source = {
            "MODEL_URL": f"{base}/segmenter.mar",
            "MANIFEST_URL": "",
            "MODEL_SHA256": hashlib.sha256(mar.read_bytes()).hexdigest(),
            "MODEL_CA_FILE": "/etc/segserve/ca/ca.pem",
        }
        env = container_env(init, config_maps, source)
        with working_container(serving_image.tag) as ctr:
            argv = run_argv(ctr, pod, init, env, files.mounts(init, {ca_dir: "/etc/segserve/ca"}))
            done = subprocess.run(argv, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "verified" in done.stdout
    fetched = files.volume_path("model-store") / "segmenter.mar"
    assert fetched.read_bytes() == mar.read_bytes()

    # 2. TorchServe, exact command/args/env/volumes; only the loopback ports are the test's
    rest, management, metrics, grpc, grpc_management = _free_ports(5)
    ports = {
        "TS_INFERENCE_ADDRESS": f"http://127.0.0.1:{rest}",
        "TS_MANAGEMENT_ADDRESS": f"http://127.0.0.1:{management}",
        "TS_METRICS_ADDRESS": f"http://127.0.0.1:{metrics}",
        "TS_GRPC_INFERENCE_PORT": str(grpc),
        "TS_GRPC_MANAGEMENT_PORT": str(grpc_management),
    }
    for name in ports:  # the manifest sets each of these (the test only moves the port)
        assert name == "TS_GRPC_MANAGEMENT_PORT" or any(
            e["name"] == name for e in torchserve["env"]
        ), name
    env = container_env(torchserve, config_maps, ports)
    write_secret_volume(tmp_path / "secret", {TOKENS_KEY: f"{TOKEN}\n"})
    tokens = tmp_path / "secret" / TOKENS_KEY
    log = tmp_path / "torchserve.log"
    png, pixels = _png()
    expected = Predictor.from_export(tiny_export).predict(pixels)[0]
    with working_container(serving_image.tag) as ctr:
        root = Path(image.buildah("mount", ctr).strip())
        started = time.time()
        volumes = files.mounts(torchserve)
        with open(log, "w") as out:
            proc = subprocess.Popen(
                run_argv(ctr, pod, torchserve, env, volumes),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            upstream = {
                "rest": f"127.0.0.1:{rest}",
                "grpc": f"127.0.0.1:{grpc}",
                "metrics": f"127.0.0.1:{metrics}",
            }
            with running_auth_proxy(upstream, tokens, tmp_path / "proxy") as proxy:
                _wait_ping(f"{proxy.rest_url}/ping", proc, log)
                assert (
                    requests.post(f"{proxy.rest_url}/predictions/segmenter", data=png).status_code
                    == 401
                )
                # Generous timeouts: the first forward of a fresh worker (TorchScript's profiling
                # runs) took over 30 s in a CI run with both cores busy; this test checks what
                # the pod answers, not how fast.
                with RestClient(proxy.rest_url, token=TOKEN, timeout=FIRST_ANSWER_S) as client:
                    assert np.array_equal(client.predict(png).mask(), expected)
                client = GrpcClient(proxy.grpc_target, token=TOKEN, timeout=FIRST_ANSWER_S)
                try:
                    assert np.array_equal(client.predict(png).mask(), expected)
                finally:
                    client.close()
            # 3. the preStop hook drains, then SIGTERM stops TorchServe (tini forwards it)
            hook = torchserve["lifecycle"]["preStop"]["exec"]["command"]
            hook = [
                a.replace("http://127.0.0.1:8081", ports["TS_MANAGEMENT_ADDRESS"]) for a in hook
            ]
            drained = subprocess.run(
                run_argv(ctr, pod, torchserve, env, volumes, argv=hook),
                capture_output=True,
                text=True,
                timeout=200,
            )
            assert drained.returncode == 0, drained.stdout + drained.stderr
            tini = container_process(proc.pid, "tini")
            assert tini is not None, "no tini below buildah run"
            os.kill(tini, signal.SIGTERM)
            assert proc.wait(timeout=90) in (0, 143), log.read_text()[-4000:]
        finally:
            if proc.poll() is None:
                kill_tree(proc.pid)
                proc.wait(timeout=30)
        mounted = [m["mountPath"] for m in torchserve["volumeMounts"]]
        written = written_since(root, started, mounted)
        image.buildah("umount", ctr)
    assert written == [], f"written outside the pod's volumes (read-only root in k8s): {written}"

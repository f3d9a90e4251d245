"""The manifests against a real TorchServe: probe paths, metric names, and the container's own
command started locally with the rendered ConfigMap files laid out as the pod sees them."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from k8s.tools import consistency as cc
from k8s.tools.render import find, render_overlay

from .conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.serving, pytest.mark.usefixtures("kubectl")]


def _png() -> bytes:
    from k8s.tools.deploy import smoke_png

    return smoke_png((48, 80))


def _scraped_names(metrics_url: str) -> set[str]:
    """Series names as Prometheus stores them. (prometheus_client's parser renames counters
    that lack a _total suffix, e.g. TorchServe's Requests2XX, so read the text format raw.)"""
    text = requests.get(f"{metrics_url}/metrics", timeout=10).text
    return {
        re.split(r"[{\s]", line, maxsplit=1)[0]
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def test_probe_path_is_a_real_health_endpoint(torchserve):
    deployment = find(render_overlay(REPO / "k8s/overlays/cpu"), "Deployment", "segserve")
    container = cc.torchserve_container(deployment)
    paths = {
        container[p]["httpGet"]["path"] for p in ("startupProbe", "readinessProbe", "livenessProbe")
    }
    assert paths == {"/ping"}
    auth = {"Authorization": f"Bearer {torchserve.inference_key}"}
    r = requests.get(f"{torchserve.inference_url}/ping", headers=auth, timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "Healthy"
    # What the pod avoids with --disable-token-auth: with auth on, a keyless probe is refused
    # (TorchServe 0.12 answers 400, which a kubelet counts as a failed probe).
    keyless = requests.get(f"{torchserve.inference_url}/ping", timeout=10)
    assert keyless.status_code == 400 and "token" in keyless.text.lower()


def test_metric_names_in_alerts_adapter_dashboard_exist_on_real_endpoint(torchserve):
    auth = {"Authorization": f"Bearer {torchserve.inference_key}"}
    url = f"{torchserve.inference_url}/predictions/{torchserve.model_name}"
    assert requests.post(url, data=_png(), headers=auth, timeout=120).status_code == 200
    bad = requests.post(url, data=b"definitely not an image", headers=auth, timeout=60)
    assert 400 <= bad.status_code < 500  # makes Requests4XX and segserve_rejected_inputs_total
    time.sleep(1)  # the frontend flushes handler metrics asynchronously
    scraped = _scraped_names(torchserve.metrics_url)

    objects = render_overlay(REPO / "k8s/overlays/cpu")
    adapter = cc.load_yaml(REPO / "k8s/components/monitoring/prometheus-adapter-values.yaml")
    dashboard = cc.load_json(REPO / "k8s/components/monitoring/grafana-dashboard.json")
    refs = cc.referenced_metrics(objects, adapter, dashboard)
    wanted = set().union(*refs.values())
    wanted = {n for n in wanted if ":" not in n} - cc.KUBE_STATE_METRICS
    # A labelled counter shows up at its first increment; this test provokes no 5xx.
    missing = wanted - scraped - {"Requests5XX"}
    assert not missing, f"referenced but not on {torchserve.metrics_url}/metrics: {sorted(missing)}"
    assert {
        "ts_queue_latency_microseconds",
        "ts_inference_requests_total",
        "segserve_class_pixel_fraction_sum",
        "WorkerLoadTime",
    } <= scraped


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lay_out_pod(objects: list[dict], root: Path, mar_dir: Path) -> tuple[dict, dict[str, Path]]:
    """Write each mounted ConfigMap key / emptyDir under ``root`` like the kubelet would."""
    deployment = find(objects, "Deployment", "segserve")
    pod = deployment["spec"]["template"]["spec"]
    container = cc.torchserve_container(deployment)
    volumes = {v["name"]: v for v in pod["volumes"]}
    configmaps = {o["metadata"]["name"]: o["data"] for o in objects if o["kind"] == "ConfigMap"}
    remap: dict[str, Path] = {}
    for m in container["volumeMounts"]:
        local = root / m["mountPath"].lstrip("/")
        remap[m["mountPath"]] = local
        volume = volumes[m["name"]]
        if "configMap" in volume:
            data = configmaps[volume["configMap"]["name"]]
            local.parent.mkdir(parents=True, exist_ok=True)
            if "subPath" in m:
                local.write_text(data[m["subPath"]])
            else:
                local.mkdir(parents=True, exist_ok=True)
                for key, text in data.items():
                    (local / key).write_text(text)
        else:
            local.mkdir(parents=True, exist_ok=True)
    workdir = container["workingDir"]  # read-only in the pod (image); only mounts below it
    remap.setdefault(workdir, root / workdir.lstrip("/"))
    remap[workdir].mkdir(parents=True, exist_ok=True)
    store = remap["/srv/segserve/model_archives"]
    for mar in mar_dir.glob("*.mar"):  # what the fetch-model init container leaves there
        (store / mar.name).write_bytes(mar.read_bytes())
    return container, remap


def _localise(value: str, remap: dict[str, Path]) -> str:
    for pod_path, local in sorted(remap.items(), key=lambda kv: -len(kv[0])):
        if value == pod_path or value.startswith(pod_path + "/"):
            return str(local) + value[len(pod_path) :]
    return value


def test_container_command_starts_torchserve_with_rendered_config(tiny_archive, tmp_path):
    objects = render_overlay(REPO / "k8s/overlays/cpu")
    config = next(o for o in objects if o["metadata"]["name"].startswith("segserve-config-"))
    if "enable_envvars_config=true" not in config["data"]["config.properties"]:
        pytest.fail(
            "config.properties lacks enable_envvars_config=true: the pod's TS_* overrides "
            "(management on 127.0.0.1, gRPC max connection age) are ignored",
            pytrace=False,
        )
    run_container_command(objects, tiny_archive, tmp_path)


def run_container_command(objects: list[dict], tiny_archive: Path, tmp_path: Path) -> None:
    """Start the Deployment's command locally, probe it, predict, run preStop, stop it."""
    container, remap = _lay_out_pod(objects, tmp_path / "pod", tiny_archive)
    cmd = container["command"] + container["args"]
    assert cmd[:3] == ["tini", "-g", "--"]  # PID 1 here is pytest's child, so tini is not needed
    cmd = [str(Path(sys.executable).with_name("torchserve"))] + cmd[4:]
    ports = {
        "TS_INFERENCE_ADDRESS": _free_port(),
        "TS_MANAGEMENT_ADDRESS": _free_port(),
        "TS_METRICS_ADDRESS": _free_port(),
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("TS_")}
    for e in container["env"]:
        value = e.get("value", "1")  # resourceFieldRef (OMP_NUM_THREADS) -> 1 here
        if e["name"] in ports:  # same host as the pod, a free port instead of 8080/8081/8082
            value = value.rsplit(":", 1)[0] + f":{ports[e['name']]}"
        env[e["name"]] = _localise(value, remap)
    grpc = {"TS_GRPC_INFERENCE_PORT": _free_port(), "TS_GRPC_MANAGEMENT_PORT": _free_port()}
    env.update({k: str(v) for k, v in grpc.items()})
    workdir = Path(_localise(container["workingDir"], remap))
    proc = subprocess.Popen(
        cmd,
        cwd=workdir,
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    inference = f"http://127.0.0.1:{ports['TS_INFERENCE_ADDRESS']}"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"torchserve exited {proc.returncode}: {proc.stdout.read()}"
            try:
                if requests.get(f"{inference}/ping", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(2)
        else:
            pytest.fail("the container command never answered /ping without a key")
        # No key anywhere: --disable-token-auth took effect, and no key file was written.
        r = requests.post(f"{inference}/predictions/segmenter", data=_png(), timeout=120)
        assert r.status_code == 200 and r.content[:8] == b"\x89PNG\r\n\x1a\n"
        assert not (workdir / "key_file.json").exists()
        metrics = f"http://127.0.0.1:{ports['TS_METRICS_ADDRESS']}"
        assert "ts_inference_requests_total" in _scraped_names(metrics)
        with socket.create_connection(("127.0.0.1", grpc["TS_GRPC_INFERENCE_PORT"]), timeout=5):
            pass
        # The preStop hook, as the pod runs it, against this server: drains and exits 0.
        hook = [_localise(a, remap) for a in container["lifecycle"]["preStop"]["exec"]["command"]]
        hook[0] = sys.executable
        hook[hook.index("--management-url") + 1] = (
            f"http://127.0.0.1:{ports['TS_MANAGEMENT_ADDRESS']}"
        )
        hook[hook.index("--settle-seconds") + 1] = "0"
        done = subprocess.run(
            hook + ["--inflight-seconds", "0"], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0 and "drain: drained" in done.stderr, done.stderr
        # Nothing was written outside the writable mounts.
        written = {p for p in (tmp_path / "pod").rglob("*") if p.is_file()}
        writable = [
            remap[m] for m in ("/tmp", "/srv/segserve/logs", "/srv/segserve/model_archives")
        ]
        outside = [p for p in written if not any(w in p.parents for w in writable)]
        assert sorted(p.name for p in outside) == [
            "config.properties",
            "drain.py",
            "fetch_model.py",
            "metrics.yaml",
        ]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # what `tini -g` does on pod termination
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

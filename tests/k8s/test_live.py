"""The manifests against a real TorchServe: probe paths and metric names. (The pod's own
commands run inside the built image in test_image.py.)"""

from __future__ import annotations

import re
import time

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
    wanted = {n for n in wanted if ":" not in n} - cc.KUBE_STATE_METRICS - cc.SCRAPE_SERIES
    # A labelled counter shows up at its first increment; this test provokes no 5xx.
    missing = wanted - scraped - {"Requests5XX"}
    assert not missing, f"referenced but not on {torchserve.metrics_url}/metrics: {sorted(missing)}"
    assert {
        "ts_queue_latency_microseconds",
        "ts_inference_requests_total",
        "segserve_class_pixel_fraction_sum",
        "WorkerLoadTime",
    } <= scraped

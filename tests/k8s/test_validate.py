"""`make k8s-validate` passes on the repository and fails, naming the object, on breakage."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from k8s.tools import consistency as cc
from k8s.tools.render import find, render_overlay
from k8s.tools.sync import drift, sync
from k8s.tools.validate import validate_repo

from .conftest import REPO, edit

pytestmark = pytest.mark.usefixtures("kubectl", "promtool")


def test_repository_manifests_pass_every_check():
    assert validate_repo(REPO) == []


def test_copy_is_valid_before_breaking(repo_copy):
    assert validate_repo(repo_copy) == []


def test_make_target_fails_on_misspelt_field_and_names_the_object(repo_copy):
    edit(
        repo_copy / "k8s/base/deployment.yaml", "revisionHistoryLimit: 5", "revisionHistoryLimt: 5"
    )
    done = subprocess.run(
        [sys.executable, str(REPO / "k8s/tools/validate.py"), "--repo", str(repo_copy)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1
    assert "Deployment/segserve/segserve" in done.stderr
    assert "revisionHistoryLimt" in done.stderr
    assert "FAILED" in done.stdout


def test_unknown_kind_is_an_error_not_a_warning(repo_copy):
    edit(
        repo_copy / "k8s/base/poddisruptionbudget.yaml",
        "kind: PodDisruptionBudget",
        "kind: PodDisruptionBudjet",
    )
    problems = validate_repo(repo_copy)
    assert any("PodDisruptionBudjet" in p and "no schema" in p for p in problems), problems


def test_crd_field_error_is_caught(repo_copy):
    edit(
        repo_copy / "k8s/components/monitoring/servicemonitor.yaml",
        "scrapeTimeout: 10s",
        "scrapeTimout: 10s",
    )
    problems = validate_repo(repo_copy)
    assert any("ServiceMonitor/segserve/segserve" in p and "scrapeTimout" in p for p in problems)


def test_proxy_forwarding_to_another_port_than_torchserve_is_named(repo_copy):
    edit(
        repo_copy / "k8s/base/deployment.yaml",
        "value: http://127.0.0.1:8085",
        "value: http://127.0.0.1:9085",
    )
    problems = validate_repo(repo_copy)
    assert any(
        "listener 8080 (http) forwards to [8085]" in p and "inference_address" in p and "9085" in p
        for p in problems
    ), problems


def test_torchserve_listening_beyond_loopback_fails(repo_copy):
    """Anyone reaching the pod IP would skip the auth proxy."""
    edit(
        repo_copy / "k8s/base/deployment.yaml",
        "value: http://127.0.0.1:8086",
        "value: http://0.0.0.0:8086",
    )
    problems = validate_repo(repo_copy)
    assert any(
        "metrics_address=http://0.0.0.0:8086 listens beyond loopback" in p for p in problems
    ), problems


def test_optional_token_secret_fails(repo_copy):
    edit(
        repo_copy / "k8s/base/deployment.yaml",
        "secretName: segserve-api-tokens\n",
        "secretName: segserve-api-tokens\n            optional: true\n",
    )
    problems = validate_repo(repo_copy)
    assert any("segserve-api-tokens must not be optional" in p for p in problems), problems


def test_network_policy_admitting_a_torchserve_port_fails(repo_copy):
    edit(
        repo_copy / "k8s/base/networkpolicy.yaml",
        "        - port: grpc\n",
        "        - port: 7075\n",
    )
    problems = validate_repo(repo_copy)
    assert any(
        "ingress admits port 7075, which is not one of the auth-proxy's" in p for p in problems
    ), problems


def test_proxy_as_a_plain_container_fails(repo_copy):
    """A plain container may stop before TorchServe has drained (no sidecar ordering)."""
    edit(repo_copy / "k8s/base/deployment.yaml", "          restartPolicy: Always\n", "")
    problems = validate_repo(repo_copy)
    assert any("auth-proxy must be a native sidecar" in p for p in problems), problems


def test_exposing_management_fails(repo_copy):
    edit(
        repo_copy / "k8s/base/service.yaml",
        "    - name: metrics\n      port: 8082\n      targetPort: metrics",
        "    - name: metrics\n      port: 8082\n      targetPort: 8081",
    )
    problems = validate_repo(repo_copy)
    assert any("Service/segserve/segserve" in p and "management 8081" in p for p in problems)


def test_grace_period_shorter_than_drain_fails(repo_copy):
    edit(
        repo_copy / "k8s/base/deployment.yaml",
        "terminationGracePeriodSeconds: 150",
        "terminationGracePeriodSeconds: 60",
    )
    problems = validate_repo(repo_copy)
    assert any("terminationGracePeriodSeconds 60" in p for p in problems), problems


def test_broken_alert_expression_fails_promtool(repo_copy):
    edit(
        repo_copy / "k8s/components/monitoring/prometheusrule.yaml",
        "expr: segserve:inference_seconds:p95_5m > 0.5",
        "expr: segserve:inference_seconds:p95_5m >",
    )
    problems = validate_repo(repo_copy)
    assert any("promtool check rules failed" in p for p in problems), problems


def test_misspelt_metric_in_dashboard_is_named(repo_copy):
    edit(
        repo_copy / "k8s/components/monitoring/grafana-dashboard.json",
        "sum by (Reason) (rate(segserve_rejected_inputs_total",
        "sum by (Reason) (rate(segserve_rejected_input_total",
    )
    problems = validate_repo(repo_copy)
    assert any("Rejected inputs" in p and "segserve_rejected_input_total" in p for p in problems)


def test_adapter_without_rate_is_refused():
    adapter = cc.load_yaml(REPO / "k8s/components/monitoring/prometheus-adapter-values.yaml")
    objects = render_overlay(REPO / "k8s/overlays/cpu")
    assert cc.check_hpa_adapter(objects, adapter) == []
    rule = adapter["rules"]["custom"][0]
    rule["metricsQuery"] = "sum(ts_queue_latency_microseconds{<<.LabelMatchers>>})"
    rule["name"]["as"] = "something_else"
    problems = cc.check_hpa_adapter(objects, adapter)
    assert any("must take a rate()" in p for p in problems)
    assert any("segserve_queue_latency_ms_per_request is not served" in p for p in problems)


def test_configmap_carries_the_root_files_verbatim():
    objects = render_overlay(REPO / "k8s/overlays/cpu")
    cm = next(o for o in objects if o["metadata"]["name"].startswith("segserve-config-"))
    assert cm["data"]["config.properties"] == (REPO / "config.properties").read_text()
    assert cm["data"]["metrics.yaml"] == (REPO / "handler/metrics.yaml").read_text()
    deployment = find(objects, "Deployment", "segserve")
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"] == cm["metadata"]["name"]


def test_gpu_overlay_schedules_on_gpu_nodes_only():
    objects = render_overlay(REPO / "k8s/overlays/gpu")
    pod = find(objects, "Deployment", "segserve")["spec"]["template"]["spec"]
    limits = pod["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    cpu = find(render_overlay(REPO / "k8s/overlays/cpu"), "Deployment", "segserve")
    assert (
        "nvidia.com/gpu"
        not in cpu["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    )


def test_drain_budget_covers_the_archive_response_timeout():
    from serving.archive import ArchiveOptions

    assert cc.DEFAULT_RESPONSE_TIMEOUT_S >= ArchiveOptions().response_timeout_s


def test_kserve_overlay_is_an_inferenceservice():
    objects = render_overlay(REPO / "k8s/overlays/kserve")
    isvc = find(objects, "InferenceService", "segmenter")
    model = isvc["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == "pytorch" and model["runtime"] == "kserve-torchserve"
    assert yaml.safe_dump(isvc)  # round-trips


def test_drifted_config_copy_fails_until_synced(repo_copy):
    """kustomize reads k8s/base/config/ (copies); the sources are the files people edit."""
    edit(repo_copy / "handler/metrics.yaml", "model_metrics:", "model_metrics:  # edited")
    problems = validate_repo(repo_copy)
    assert any(
        "k8s/base/config/metrics.yaml: differs from handler/metrics.yaml" in p
        and "make k8s-sync" in p
        for p in problems
    ), problems
    assert sync(repo_copy) == ["k8s/base/config/metrics.yaml"]
    assert drift(repo_copy) == []
    assert sync(repo_copy) == []


def test_every_overlay_renders_as_kubectl_apply_k_would(kubectl):
    """Default settings: no --load-restrictor (what `kubectl apply -k` cannot pass)."""
    for overlay in ("cpu", "gpu", "kserve"):
        done = subprocess.run(
            [str(kubectl), "kustomize", str(REPO / "k8s/overlays" / overlay)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, f"{overlay}: {done.stderr}"
        assert "kind: Deployment" in done.stdout or "kind: InferenceService" in done.stdout

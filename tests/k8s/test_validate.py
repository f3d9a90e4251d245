"""`make k8s-validate` passes on the repository and fails, naming the object, on breakage."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from k8s.tools import consistency as cc
from k8s.tools import webui
from k8s.tools.render import find, render_overlay
from k8s.tools.sync import drift, sync
from k8s.tools.validate import validate_repo
from serving.properties import read_properties

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
    for overlay in ("cpu", "cpu-ui", "gpu", "kserve"):
        done = subprocess.run(
            [str(kubectl), "kustomize", str(REPO / "k8s/overlays" / overlay)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, f"{overlay}: {done.stderr}"
        assert "kind: Deployment" in done.stdout or "kind: InferenceService" in done.stdout


# --- The web demo page (k8s/components/ui, in k8s/overlays/cpu-ui) --------------------------

UI = "k8s/components/ui"


def _ui_problems(repo: Path) -> list[str]:
    """What validate.py's checks of the page, the selectors and the proxy's tokens say about
    the cpu-ui overlay of ``repo`` (the rest of validate_repo, minus the slow schema and
    promtool passes)."""
    objects = render_overlay(repo / "k8s/overlays/cpu-ui")
    props = read_properties(repo / "config.properties")
    serving = find(objects, "Deployment", "segserve")
    cfg = cc.effective_config(props, cc.torchserve_container(serving))
    conf = cc.config_map(objects, cc.AUTH_PROXY_CONFIG)["data"]["nginx.conf"]
    return (
        webui.check_ui(objects, props)
        + cc.check_selectors(objects)
        + cc.check_ports(objects, cfg)
        + cc.check_api_tokens(serving, conf)
        + cc.check_security(find(objects, "Deployment", webui.UI_DEPLOYMENT))
    )


def test_ui_overlay_is_the_cpu_overlay_plus_the_page():
    cpu = {(o["kind"], o["metadata"]["name"]) for o in render_overlay(REPO / "k8s/overlays/cpu")}
    objects = render_overlay(REPO / "k8s/overlays/cpu-ui")
    added = {(o["kind"], o["metadata"]["name"]) for o in objects} - cpu
    assert added == {
        ("Deployment", "segserve-ui"),
        ("Service", "segserve-ui"),
        ("NetworkPolicy", "segserve-ui"),
        ("ServiceAccount", "segserve-ui"),
    }
    assert _ui_problems(REPO) == []
    ui = find(objects, "Deployment", "segserve-ui")
    assert ui["metadata"]["namespace"] == "segserve"
    assert ui["spec"]["template"]["spec"]["containers"][0]["image"].endswith("/segserve-ui:0.1.0")
    # The page's pods carry component=ui; none of the serving objects' selectors has it.
    labels = ui["spec"]["template"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/component"] == "ui"
    for kind in ("Service", "PodDisruptionBudget", "NetworkPolicy"):
        selector = cc._pod_selector(find(objects, kind, "segserve"))
        assert not cc.selector_matches(selector, labels), kind
    # The serving pods' token volume: both Secrets, the UI's optional.
    pod = find(objects, "Deployment", "segserve")["spec"]["template"]["spec"]
    proxy = cc.auth_proxy_container(find(objects, "Deployment", "segserve"))
    assert cc.secret_key_at(pod, proxy, "/etc/segserve/auth/tokens")[:3] == (
        "segserve-api-tokens",
        "tokens",
        False,
    )
    assert cc.secret_key_at(pod, proxy, "/etc/segserve/auth/ui-token")[:3] == (
        "segserve-ui-token",
        "token",
        True,
    )


def test_ui_calling_another_host_fails_in_make_k8s_validate(repo_copy):
    edit(repo_copy / UI / "deployment.yaml", "- http://segserve:8080", "- http://segserv:8080")
    problems = validate_repo(repo_copy)
    assert any(
        p.startswith("k8s/overlays/cpu-ui: Deployment/segserve/segserve-ui: --inference-url")
        and "'segserv' is not the Service segserve" in p
        for p in problems
    ), problems


def test_ui_calling_a_port_the_service_lacks_or_the_metrics_port_fails(repo_copy):
    deployment = repo_copy / UI / "deployment.yaml"
    edit(deployment, "- http://segserve:8080", "- http://segserve.segserve.svc:8081")
    problems = _ui_problems(repo_copy)
    assert any("Service/segserve/segserve has no port 8081" in p for p in problems), problems
    edit(deployment, "- http://segserve.segserve.svc:8081", "- http://segserve:8082")
    problems = _ui_problems(repo_copy)
    assert any(
        "port 8082 leads to container port 8082, not to the auth-proxy's http listener (8080)" in p
        for p in problems
    ), problems


def test_ui_in_grpc_mode_needs_the_grpc_port(repo_copy):
    deployment = repo_copy / UI / "deployment.yaml"
    edit(deployment, "- --protocol\n            - rest", "- --protocol\n            - grpc")
    assert _ui_problems(repo_copy) == []  # both policies admit 7070 already
    edit(deployment, "- segserve:7070", "- segserve:8080")
    problems = _ui_problems(repo_copy)
    assert any(
        "--grpc-target segserve:8080" in p and "not to the auth-proxy's grpc listener (7070)" in p
        for p in problems
    ), problems


def test_ui_asking_for_a_model_torchserve_does_not_load_fails(repo_copy):
    edit(repo_copy / UI / "deployment.yaml", "- segmenter", "- segmentor")
    problems = _ui_problems(repo_copy)
    assert any("--model-name segmentor: TorchServe loads ['segmenter']" in p for p in problems)


def test_ui_probes_elsewhere_than_healthz_on_its_port_fail(repo_copy):
    deployment = repo_copy / UI / "deployment.yaml"
    edit(
        deployment,
        "readinessProbe:\n            httpGet:\n              path: /healthz",
        "readinessProbe:\n            httpGet:\n              path: /",
    )
    problems = _ui_problems(repo_copy)
    assert any(
        "ui readinessProbe should GET /healthz on the page's port 7860" in p for p in problems
    )
    # The page moved to another port without its containerPort, probes and Service.
    edit(deployment, '- "7860"', '- "7861"')
    problems = _ui_problems(repo_copy)
    assert any("ui --port 7861 is not a containerPort of the ui container" in p for p in problems)
    assert any("livenessProbe should GET /healthz on the page's port 7861" in p for p in problems)
    assert any(
        "no Service selects the page's pods with a port targeting 7861" in p for p in problems
    )


def test_ui_listening_on_loopback_fails(repo_copy):
    edit(repo_copy / UI / "deployment.yaml", "- 0.0.0.0", "- 127.0.0.1")
    problems = _ui_problems(repo_copy)
    assert any("ui --host 127.0.0.1: listen on 0.0.0.0" in p for p in problems), problems


def test_ui_token_file_where_the_secret_is_not_mounted_fails(repo_copy):
    edit(repo_copy / UI / "deployment.yaml", "- /etc/segserve/ui/token", "- /etc/segserve/token")
    problems = _ui_problems(repo_copy)
    assert any(
        "--token-file /etc/segserve/token is no mounted Secret key; mount key token of Secret "
        "segserve-ui-token there" in p
        for p in problems
    ), problems


def test_ui_token_secret_optional_for_the_page_fails(repo_copy):
    edit(
        repo_copy / UI / "deployment.yaml",
        "secretName: segserve-ui-token\n",
        "secretName: segserve-ui-token\n            optional: true\n",
    )
    problems = _ui_problems(repo_copy)
    assert any("segserve-ui-token must not be optional for the page" in p for p in problems)


def test_proxy_not_reading_the_ui_token_fails(repo_copy):
    """The projected file must be one nginx.conf lists, or the proxy refuses the page."""
    edit(repo_copy / UI / "auth-proxy-tokens.yaml", "path: ui-token", "path: ui_token")
    problems = _ui_problems(repo_copy)
    assert any(
        "Deployment/segserve/segserve: the auth-proxy reads no file holding key token of Secret "
        "segserve-ui-token"
        in p
        and "/etc/segserve/auth/ui-token" in p
        for p in problems
    ), problems


def test_optional_api_tokens_in_the_projected_volume_fail(repo_copy):
    edit(
        repo_copy / UI / "auth-proxy-tokens.yaml",
        "name: segserve-api-tokens\n",
        "name: segserve-api-tokens\n                  optional: true\n",
    )
    problems = _ui_problems(repo_copy)
    assert any("segserve-api-tokens must not be optional" in p for p in problems), problems


def test_serving_policy_not_admitting_the_ui_fails(repo_copy):
    edit(
        repo_copy / UI / "kustomization.yaml",
        "app.kubernetes.io/component: ui",
        "app.kubernetes.io/component: web",
    )
    problems = _ui_problems(repo_copy)
    assert any(
        "Deployment/segserve/segserve: its NetworkPolicies do not admit the page's pods" in p
        and "on 8080 (http" in p
        for p in problems
    ), problems


def test_ui_policy_closing_the_page_or_its_way_out_fails(repo_copy):
    policy = repo_copy / UI / "networkpolicy.yaml"
    edit(policy, "    - ports:\n        - port: http\n", "    - ports:\n        - port: 7861\n")
    edit(policy, "app.kubernetes.io/component: torchserve", "app.kubernetes.io/component: ts")
    edit(policy, "        - port: 53\n          protocol: UDP\n", "")
    problems = _ui_problems(repo_copy)
    assert any("admit nobody on its port 7860" in p for p in problems), problems
    assert any(
        "the page's egress policy does not allow the segserve pods on 8080" in p for p in problems
    )
    assert any("the page's egress policy allows no DNS (53/UDP)" in p for p in problems)


def test_ui_without_an_ingress_policy_fails(repo_copy):
    edit(repo_copy / UI / "kustomization.yaml", "  - networkpolicy.yaml\n", "")
    problems = _ui_problems(repo_copy)
    assert any("no NetworkPolicy limits the ingress of the page's pods" in p for p in problems)


def test_ui_pods_labelled_like_the_serving_pods_fail(repo_copy):
    """The segserve Service would send inference to the page, the PDB count it, the serving
    policy open it, and the two Deployments fight over each other's pods."""
    for name in ("deployment.yaml", "service.yaml", "networkpolicy.yaml"):
        path = repo_copy / UI / name
        text = path.read_text()
        path.write_text(text.replace("component: ui", "component: torchserve"))
    problems = _ui_problems(repo_copy)
    for obj in ("Service/segserve/segserve", "PodDisruptionBudget/segserve/segserve"):
        assert any(
            p.startswith(f"{obj}: its selector") and "['segserve', 'segserve-ui']" in p
            for p in problems
        ), (obj, problems)
    assert any(
        p.startswith("Deployment/segserve/segserve: its selector")
        and "also selects the pods of Deployment ['segserve-ui']" in p
        for p in problems
    ), problems
    assert any(
        p.startswith("NetworkPolicy/segserve/segserve: its podSelector") for p in problems
    ), problems


def test_ui_container_with_a_writable_root_fails(repo_copy):
    edit(
        repo_copy / UI / "deployment.yaml",
        "readOnlyRootFilesystem: true",
        "readOnlyRootFilesystem: false",
    )
    problems = _ui_problems(repo_copy)
    assert any(
        "Deployment/segserve/segserve-ui: container ui: readOnlyRootFilesystem must be true" in p
        for p in problems
    ), problems

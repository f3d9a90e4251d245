"""Deployment integrity on the rendered overlays: the model pin, the KServe management API, and
the serving pods' egress. Each breakage test edits a copy and expects validation to name it."""

from __future__ import annotations

import subprocess
import sys
import urllib.parse

import pytest

from k8s.tools import consistency as cc
from k8s.tools.render import find, render_overlay
from k8s.tools.validate import validate_repo
from serving.properties import read_properties

from .conftest import REPO, edit

pytestmark = pytest.mark.usefixtures("kubectl", "promtool")

DNS_RULE = {
    "to": [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
            "podSelector": {
                "matchExpressions": [{"key": "k8s-app", "operator": "In", "values": ["kube-dns"]}]
            },
        }
    ],
    "ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}],
}
HTTPS_RULE = {"ports": [{"port": 443, "protocol": "TCP"}]}
KSERVE_LABELS = {"serving.kserve.io/inferenceservice": "segmenter"}


def _serving_pod_labels(objects: list[dict]) -> dict[str, str]:
    if any(o["kind"] == "InferenceService" for o in objects):
        return KSERVE_LABELS  # what KServe puts on the predictor pods it creates
    return find(objects, "Deployment", "segserve")["spec"]["template"]["metadata"]["labels"]


# cpu-ui: the web demo's policy (egress to the serving pods) must not widen the serving pods'.
@pytest.mark.parametrize("overlay", ["cpu", "cpu-ui", "gpu", "kserve"])
def test_serving_pods_may_reach_only_dns_and_https(overlay):
    objects = render_overlay(REPO / "k8s/overlays" / overlay)
    labels = _serving_pod_labels(objects)
    selecting = [
        o
        for o in objects
        if o["kind"] == "NetworkPolicy"
        and (o["spec"]["podSelector"].get("matchLabels") or {}).items() <= labels.items()
        and "Egress" in o["spec"]["policyTypes"]
    ]
    assert selecting, f"no egress NetworkPolicy selects {labels}"
    # Policies add up: the union of every selecting policy's rules is all the pods may reach.
    rules = [rule for o in selecting for rule in o["spec"].get("egress", [])]
    assert rules == [DNS_RULE, HTTPS_RULE]


def test_kserve_management_api_is_loopback_only():
    isvc = find(render_overlay(REPO / "k8s/overlays/kserve"), "InferenceService", "segmenter")
    model = isvc["spec"]["predictor"]["model"]
    env = {e["name"]: e["value"] for e in model["env"]}
    # TorchServe as the pod runs it: root config + kserve.properties, then the TS_* env.
    cfg = read_properties(REPO / "config.properties") | read_properties(
        REPO / "k8s/overlays/kserve/kserve.properties"
    )
    assert cfg["enable_envvars_config"] == "true" and cfg["disable_token_authorization"] == "true"
    effective = cfg | {k[3:].lower(): v for k, v in env.items() if k.startswith("TS_")}
    assert urllib.parse.urlparse(effective["management_address"]).hostname == "127.0.0.1"
    assert effective["grpc_management_address"] == "127.0.0.1"
    # The wrapper reads the file, TorchServe the env: both must say the same.
    assert cfg["management_address"] == env["TS_MANAGEMENT_ADDRESS"]
    assert cfg["inference_address"] == env["TS_INFERENCE_ADDRESS"]
    assert not model.get("ports")  # nothing declares a TorchServe port to the pod network
    assert cc.check_kserve_management(isvc, cfg) == []


@pytest.mark.parametrize(
    "path, old, new, expected",
    [
        (  # the management API back on every interface, without a token
            "k8s/overlays/kserve/inferenceservice.yaml",
            "- name: TS_MANAGEMENT_ADDRESS\n          value: http://127.0.0.1:8085",
            "- name: TS_MANAGEMENT_ADDRESS\n          value: http://0.0.0.0:8085",
            "TS_MANAGEMENT_ADDRESS=http://0.0.0.0:8085 exposes TorchServe's management API",
        ),
        (
            "k8s/overlays/kserve/inferenceservice.yaml",
            "- name: TS_GRPC_MANAGEMENT_ADDRESS\n          value: 127.0.0.1",
            "- name: TS_GRPC_MANAGEMENT_ADDRESS\n          value: 0.0.0.0",
            "TS_GRPC_MANAGEMENT_ADDRESS=0.0.0.0 exposes",
        ),
        (  # the env pin removed: whatever the uploaded config says would win
            "k8s/overlays/kserve/inferenceservice.yaml",
            "        - name: TS_GRPC_MANAGEMENT_ADDRESS\n          value: 127.0.0.1\n",
            "",
            "predictor.model.env has no TS_GRPC_MANAGEMENT_ADDRESS",
        ),
        (  # wrapper and TorchServe would disagree on where management is
            "k8s/overlays/kserve/kserve.properties",
            "management_address=http://127.0.0.1:8085",
            "management_address=http://127.0.0.1:8086",
            "KServe's wrapper reads the file, TorchServe the env",
        ),
        (  # plain HTTP egress back
            "k8s/base/networkpolicy.yaml",
            "    - ports:\n        - port: 443\n          protocol: TCP\n",
            "    - ports:\n        - port: 443\n          protocol: TCP\n"
            "        - port: 80\n          protocol: TCP\n",
            "egress rule 1 allows [(80, 'TCP'), (443, 'TCP')]",
        ),
        (  # DNS to any host: port 53 as a tunnel to anywhere
            "k8s/base/networkpolicy.yaml",
            "    - to:\n        - namespaceSelector:",
            "    - to:\n        - ipBlock: {cidr: 0.0.0.0/0}\n        - namespaceSelector:",
            "egress rule 0 allows [(53, 'TCP'), (53, 'UDP')] to [{'ipBlock'",
        ),
        (  # matchLabels: kustomize adds the segserve labels and no DNS pod matches any more
            "k8s/base/networkpolicy.yaml",
            "            matchExpressions:\n              - {key: k8s-app, operator: In, values: "
            "[kube-dns]}\n",
            "            matchLabels:\n              k8s-app: kube-dns\n",
            "carries the serving pods' own labels",
        ),
        (  # egress no longer limited at all
            "k8s/base/networkpolicy.yaml",
            "    - Ingress\n    - Egress\n",
            "    - Ingress\n",
            "no NetworkPolicy limits the egress",
        ),
        (
            "k8s/base/kustomization.yaml",
            "MODEL_URL=https://models.example.com/",
            "MODEL_URL=http://models.example.com/",
            "MODEL_URL='http://models.example.com/segserve/segmenter.mar': fetch_model.py accepts",
        ),
        (
            "k8s/base/kustomization.yaml",
            f"MODEL_SHA256={cc.SHA256_PLACEHOLDER}",
            "MODEL_SHA256=",
            "MODEL_SHA256='' is neither a sha256 hex digest nor the placeholder",
        ),
    ],
)
def test_validation_names_the_integrity_breakage(repo_copy, path, old, new, expected):
    edit(repo_copy / path, old, new)
    problems = validate_repo(repo_copy)
    assert any(expected in p for p in problems), problems


def test_a_real_pin_validates_and_is_not_a_placeholder(repo_copy):
    objects = render_overlay(REPO / "k8s/overlays/cpu")
    assert cc.placeholder_pins(objects)  # the repository ships the placeholder
    edit(
        repo_copy / "k8s/base/kustomization.yaml",
        f"MODEL_SHA256={cc.SHA256_PLACEHOLDER}",
        "MODEL_SHA256=" + "ab" * 32,
    )
    assert validate_repo(repo_copy) == []
    assert cc.placeholder_pins(render_overlay(repo_copy / "k8s/overlays/cpu")) == []


def test_deploy_refuses_the_placeholder_pin_before_applying():
    done = subprocess.run(
        [sys.executable, str(REPO / "k8s/tools/deploy.py"), "--overlay", "cpu"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert f"MODEL_SHA256 is still {cc.SHA256_PLACEHOLDER}" in done.stderr
    assert "segserve-model-source" in done.stderr

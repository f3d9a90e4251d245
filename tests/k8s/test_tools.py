"""Pure parts of k8s/tools: properties, CRD schemas, PromQL names, deploy planning."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from k8s.tools import deploy
from k8s.tools.consistency import exported_metric_names
from k8s.tools.crd_schema import crd_to_schema
from k8s.tools.promrules import metric_names
from k8s.tools.schemas import validate_object
from k8s.tools.toolchain import ToolError, require
from serving.properties import parse_properties, port_of

from .conftest import REPO


def test_properties_last_key_wins_and_comments_are_skipped():
    props = parse_properties("# a=0\n! b=0\na = 1\nurl=http://h:80\na=2\nflag\n")
    assert props == {"a": "2", "url": "http://h:80", "flag": ""}
    assert port_of("http://0.0.0.0:8082") == 8082


def test_exported_names_follow_metric_types():
    cfg = yaml.safe_load((REPO / "handler/metrics.yaml").read_text())
    names = set(exported_metric_names(cfg))
    assert {
        "Requests5XX",
        "ts_queue_latency_microseconds",
        "segserve_rejected_inputs_total",
        "segserve_inference_seconds_bucket",
        "segserve_inference_seconds_count",
    } <= names
    assert "segserve_inference_seconds" not in names  # a histogram has no bare series


def test_metric_names_ignore_functions_labels_and_numbers():
    expr = (
        'sum by (namespace, le) (rate(a_bucket{job="x",le="0.5"}[5m])) / 1e6 '
        "/ clamp_min(sum(rate(b_total[2m])), 0.001) and on (pod) rec:x:y > 0.1"
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "rec:x:y"}


def test_crd_schema_closes_objects_and_prunes(tmp_path):
    crd = {
        "spec": {
            "versions": [
                {
                    "name": "v1",
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "d",
                            "properties": {
                                "metadata": {"type": "object"},
                                "spec": {
                                    "type": "object",
                                    "properties": {
                                        "keep": {
                                            "type": "object",
                                            "properties": {"a": {"type": "string"}},
                                        },
                                        "big": {
                                            "type": "object",
                                            "properties": {
                                                f"f{i}": {"type": "string"} for i in range(50)
                                            },
                                        },
                                    },
                                },
                            },
                        }
                    },
                }
            ]
        },
        "metadata": {"name": "x"},
    }
    schema = crd_to_schema(crd, "v1", max_chars=200, keep=("spec.keep",))
    spec = schema["properties"]["spec"]
    assert spec["additionalProperties"] is False
    assert spec["properties"]["keep"]["additionalProperties"] is False
    assert spec["properties"]["big"] == {"type": "object"}
    assert "description" not in schema


def test_schema_validation_is_strict_for_builtins_and_crds():
    svc = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "s"},
        "spec": {"ports": [{"port": 80, "protocl": "TCP"}]},
    }
    assert any("protocl" in p for p in validate_object(svc))
    rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "r"},
        "spec": {"groups": [{"rules": [{"expr": "up"}]}]},
    }
    assert any("'name' is a required property" in p for p in validate_object(rule))
    isvc = {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": "i"},
        "spec": {"predictor": {"model": {"modelFormt": {}}}},
    }
    assert any("modelFormt" in p for p in validate_object(isvc))


def test_require_names_the_make_target(monkeypatch, tmp_path):
    monkeypatch.setattr("k8s.tools.toolchain.TOOLS_BIN", tmp_path)
    with pytest.raises(ToolError, match="make k8s-tools"):
        require("definitely-not-a-tool-xyz")


def _deployment(**status):
    return {"metadata": {"generation": 3}, "spec": {"replicas": 2}, "status": status}


@pytest.mark.parametrize(
    "status, done, why",
    [
        ({"observedGeneration": 2}, False, "not seen"),
        ({"observedGeneration": 3, "updatedReplicas": 1, "replicas": 2}, False, "1/2 pods updated"),
        ({"observedGeneration": 3, "updatedReplicas": 2, "replicas": 3}, False, "1 old pods"),
        (
            {"observedGeneration": 3, "updatedReplicas": 2, "replicas": 2, "availableReplicas": 1},
            False,
            "1/2 pods available",
        ),
        (
            {"observedGeneration": 3, "updatedReplicas": 2, "replicas": 2, "availableReplicas": 2},
            True,
            "rolled out",
        ),
    ],
)
def test_rollout_complete(status, done, why):
    got_done, got_why = deploy.rollout_complete(_deployment(**status))
    assert got_done is done and why in got_why


def test_set_image_and_apply_order():
    objects = [
        {"kind": "PrometheusRule", "metadata": {"name": "r"}},
        {
            "kind": "Deployment",
            "metadata": {"name": "d"},
            "spec": {
                "template": {
                    "spec": {
                        "initContainers": [
                            {"name": "i", "image": "ghcr.io/example/segserve:0.1.0"}
                        ],
                        "containers": [
                            {"name": "c", "image": "ghcr.io/example/segserve:0.1.0"},
                            {"name": "side", "image": "envoy:1"},
                        ],
                    }
                }
            },
        },
        {"kind": "Namespace", "metadata": {"name": "n"}},
    ]
    assert deploy.set_image(objects, "reg/segserve:2") == 2
    pod = objects[1]["spec"]["template"]["spec"]
    assert [c["image"] for c in pod["containers"]] == ["reg/segserve:2", "envoy:1"]
    assert [o["kind"] for o in deploy.apply_order(objects)] == [
        "Namespace",
        "Deployment",
        "PrometheusRule",
    ]


def test_unknown_overlay_lists_the_real_ones():
    with pytest.raises(deploy.DeployError, match=r"\['cpu', 'cpu-ui', 'gpu', 'kserve'\]"):
        deploy.resolve_overlay("tpu")


def test_smoke_png_is_a_png():
    import io

    from PIL import Image

    image = Image.open(io.BytesIO(deploy.smoke_png((20, 30))))
    assert image.size == (30, 20) and image.mode == "RGB"


@pytest.mark.usefixtures("kubectl")
def test_dry_run_prints_the_plan_and_touches_nothing():
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "k8s/tools/deploy.py"),
            "--overlay",
            "gpu",
            "--dry-run",
            "--image-ref",
            "reg.example/segserve:9-gpu",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "set serving image to reg.example/segserve:9-gpu" in out
    assert out.index("Namespace/segserve") < out.index("Deployment/segserve/segserve")
    assert "wait up to 900 s for Deployment/segserve/segserve" in out
    assert "POST a PNG to /predictions/segmenter" in out

"""``make k8s-validate``: render every overlay and fail on anything wrong with it.

1. ``kubectl kustomize`` (default settings, as ``kubectl apply -k``) renders each overlay; the
   base's copies of config.properties and handler/metrics.yaml equal their sources (sync.py).
2. Every object is validated strictly (kubernetes-validate for built-in kinds, the vendored CRD
   schemas for ServiceMonitor, PrometheusRule, InferenceService).
3. The manifests are held to config.properties (and the KServe overlay to kserve.properties),
   handler/metrics.yaml, the security baseline, the model pin and the egress policy
   (``consistency.py``).
4. ``promtool check rules`` + ``promtool test rules`` on the PrometheusRule (tests in
   ``tests/k8s/promtool/``); adapter and dashboard PromQL parsed by promtool.
5. ``k8s/loadtest`` (the in-cluster Locust master + workers) is rendered and validated the same
   way, held to the security baseline and to ``loadgen.py`` (master/worker counts agree, the
   workers reach the master, the master's options are loadtest.run's).
6. An overlay with the web demo page (``k8s/components/ui``) is held to ``webui.py``: the page
   calls the segserve Service's REST (or gRPC) port, probes /healthz on its own port, reads the
   token Secret mounted where ``--token-file`` points, which the auth proxy reads too, and the
   NetworkPolicies let it through; every selector picks one Deployment's pods.

Exit status 1 with one line per problem, each naming the object (or file) and the field.

Example:
    python k8s/tools/validate.py                  # all overlays, Kubernetes 1.35
    python k8s/tools/validate.py --repo /tmp/copy --k8s-version 1.37.0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `k8s.tools` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from k8s.tools import consistency as cc  # noqa: E402
from k8s.tools.loadgen import check_loadtest  # noqa: E402
from k8s.tools.promrules import (  # noqa: E402
    adapter_query_to_promql,
    check_expressions,
    check_rules,
    grafana_to_promql,
    rules_from_prometheusrule,
)
from k8s.tools.render import RenderError, find, object_name, overlays, render_overlay  # noqa: E402
from k8s.tools.schemas import DEFAULT_K8S_VERSION, validate_object  # noqa: E402
from k8s.tools.sync import drift  # noqa: E402
from k8s.tools.toolchain import REPO  # noqa: E402
from k8s.tools.webui import UI_DEPLOYMENT, check_ui  # noqa: E402
from serving.properties import read_properties  # noqa: E402

MONITORING = Path("k8s/components/monitoring")
LOADTEST = Path("k8s/loadtest")
# The lines KServe's config.properties adds to the root one (k8s/README.md "KServe").
KSERVE_PROPERTIES = "kserve.properties"


def check_overlay_objects(
    objects: list[dict], repo: Path, k8s_version: str, overlay: Path | None = None
) -> list[str]:
    """All checks of one rendered overlay (``overlay``: its folder, for kserve.properties)."""
    problems = [p for obj in objects for p in validate_object(obj, k8s_version)]
    props = read_properties(repo / "config.properties")
    adapter = cc.load_yaml(repo / MONITORING / "prometheus-adapter-values.yaml")
    for isvc in (o for o in objects if o["kind"] == "InferenceService"):
        extra = overlay / KSERVE_PROPERTIES if overlay else None
        if extra is None or not extra.is_file():
            problems.append(f"{object_name(isvc)}: no {KSERVE_PROPERTIES} next to it")
            continue
        problems += cc.check_kserve_management(isvc, props | read_properties(extra))
        labels = {"serving.kserve.io/inferenceservice": isvc["metadata"]["name"]}
        problems += cc.check_egress(objects, labels, object_name(isvc))
    if any(o["kind"] == "Deployment" for o in objects):
        deployment = find(objects, "Deployment", "segserve")
        labels = deployment["spec"]["template"]["metadata"].get("labels", {})
        problems += cc.check_model_source(objects)
        problems += cc.check_egress(objects, labels, object_name(deployment))
        container = cc.torchserve_container(deployment)
        cfg = cc.effective_config(props, container)
        problems += cc.check_envvars_enabled(props, container)
        problems += cc.check_response_limit(props, container)
        problems += cc.check_ports(objects, cfg)
        problems += cc.check_probes_and_auth(deployment, cfg)
        proxy_config = cc.config_map(objects, cc.AUTH_PROXY_CONFIG)
        nginx_conf = (proxy_config or {}).get("data", {}).get("nginx.conf")
        problems += cc.check_api_tokens(deployment, nginx_conf)
        problems += cc.check_termination(deployment, cfg, cc.DEFAULT_RESPONSE_TIMEOUT_S)
        problems += cc.check_file_layout(deployment, props)
        problems += cc.check_security(deployment)
        problems += cc.check_hpa_adapter(objects, adapter)
        problems += cc.check_selectors(objects)
    for ui in (
        o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == UI_DEPLOYMENT
    ):
        problems += cc.check_security(ui)
        problems += check_ui(objects, props)
    rules = [o for o in objects if o["kind"] == "PrometheusRule"]
    if rules:
        metrics_yaml = repo / props.get("metrics_config", "handler/metrics.yaml")
        exported = set(cc.exported_metric_names(cc.load_yaml(metrics_yaml)))
        recorded = {
            r["record"]
            for o in rules
            for g in o["spec"]["groups"]
            for r in g["rules"]
            if "record" in r
        }
        dashboard = cc.load_json(repo / MONITORING / "grafana-dashboard.json")
        refs = cc.referenced_metrics(objects, adapter, dashboard)
        problems += cc.check_metric_names(refs, exported, recorded)
        tests = sorted((repo / "tests" / "k8s" / "promtool").glob("*.test.yaml"))
        for obj in rules:
            problems += check_rules(rules_from_prometheusrule(obj), tests)
    return problems


def check_monitoring_promql(repo: Path) -> list[str]:
    """Adapter and dashboard queries parse as PromQL."""
    adapter = cc.load_yaml(repo / MONITORING / "prometheus-adapter-values.yaml")
    dashboard = cc.load_json(repo / MONITORING / "grafana-dashboard.json")
    exprs = {
        f"prometheus-adapter rule {r['name']['as']}": adapter_query_to_promql(r["metricsQuery"])
        for r in adapter.get("rules", {}).get("custom", [])
    }
    for panel in dashboard.get("panels", []):
        for t in panel.get("targets", []):
            exprs[f"dashboard {panel['title']!r} {t['refId']}"] = grafana_to_promql(t["expr"])
    return check_expressions(exprs)


def check_loadtest_objects(objects: list[dict], repo: Path, k8s_version: str) -> list[str]:
    """All checks of the rendered k8s/loadtest."""
    problems = [p for obj in objects for p in validate_object(obj, k8s_version)]
    for job in (o for o in objects if o["kind"] == "Job"):
        problems += cc.check_security(job)
    problems += check_loadtest(objects, repo, read_properties(repo / "config.properties"))
    return problems


def validate_repo(repo: Path = REPO, k8s_version: str = DEFAULT_K8S_VERSION) -> list[str]:
    """Problems over every overlay of ``repo`` and k8s/loadtest (empty when all is well)."""
    found = overlays(repo / "k8s" / "overlays")
    if not found:
        return [f"{repo / 'k8s/overlays'}: no overlay (folder with kustomization.yaml)"]
    problems = drift(repo) + check_monitoring_promql(repo)
    for overlay in found:
        label = overlay.relative_to(repo)
        try:
            objects = render_overlay(overlay)
        except RenderError as exc:
            problems.append(f"{label}: {exc}")
            continue
        checked = check_overlay_objects(objects, repo, k8s_version, overlay)
        problems += [f"{label}: {p}" for p in checked]
        print(f"{label}: {len(objects)} objects rendered and checked", file=sys.stderr)
    if (repo / LOADTEST / "kustomization.yaml").is_file():
        try:
            objects = render_overlay(repo / LOADTEST)
        except RenderError as exc:
            return [*problems, f"{LOADTEST}: {exc}"]
        problems += [f"{LOADTEST}: {p}" for p in check_loadtest_objects(objects, repo, k8s_version)]
        print(f"{LOADTEST}: {len(objects)} objects rendered and checked", file=sys.stderr)
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, default=REPO, help="repository root to check")
    parser.add_argument("--k8s-version", default=DEFAULT_K8S_VERSION)
    args = parser.parse_args(argv)
    problems = validate_repo(args.repo.resolve(), args.k8s_version)
    for p in problems:
        print(f"ERROR {p}", file=sys.stderr)
    print(f"k8s-validate: {'FAILED, ' + str(len(problems)) + ' problem(s)' if problems else 'ok'}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())

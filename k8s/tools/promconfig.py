"""Plain Prometheus configuration from the monitoring component's operator objects.

The Prometheus Operator turns a ServiceMonitor into a scrape job and a PrometheusRule into a
rule file. These functions do the same translation for a Prometheus without the operator (a
test on loopback, a VM): :func:`scrape_job` keeps the endpoint's path, interval, timeout and
relabelling, and sets the labels the operator's relabelling gives every target (``job`` = the
Service's name, ``namespace``, ``service``, ``pod``, ``container``, ``endpoint`` = the port's
name); :func:`rule_file` writes the rule groups, optionally with every ``for:`` and group
``interval`` shortened (a test cannot wait ten minutes; the expressions stay as shipped).

Example:
    >>> monitor = {"metadata": {"name": "s", "namespace": "ns"}, "spec": {"endpoints": [
    ...     {"port": "metrics", "path": "/metrics", "interval": "15s"}]}}
    >>> job = scrape_job(monitor, "127.0.0.1:9", service="svc", pod="p", container="c")
    >>> job["job_name"], job["scrape_interval"], job["static_configs"][0]["labels"]["job"]
    ('serviceMonitor/ns/s/0', '15s', 'svc')
"""

from __future__ import annotations

import re
from typing import Any

# ServiceMonitor RelabelConfig (camelCase) -> Prometheus relabel_config keys.
_RELABEL_KEYS = {
    "sourceLabels": "source_labels",
    "separator": "separator",
    "targetLabel": "target_label",
    "regex": "regex",
    "modulus": "modulus",
    "replacement": "replacement",
    "action": "action",
}


def relabel_configs(relabelings: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A ServiceMonitor's ``relabelings``/``metricRelabelings`` as Prometheus writes them.

    >>> relabel_configs([{"sourceLabels": ["__name__"], "regex": "go_.*", "action": "drop"}])
    [{'source_labels': ['__name__'], 'regex': 'go_.*', 'action': 'drop'}]
    """
    out = []
    for rule in relabelings:
        unknown = set(rule) - set(_RELABEL_KEYS)
        if unknown:
            raise ValueError(f"relabeling {rule}: unknown keys {sorted(unknown)}")
        out.append({_RELABEL_KEYS[k]: v for k, v in rule.items()})
    return out


def scrape_job(
    monitor: dict[str, Any],
    target: str,
    service: str,
    pod: str,
    container: str,
    endpoint_index: int = 0,
) -> dict[str, Any]:
    """The scrape job the operator generates for one endpoint of ``monitor``, aimed at
    ``target`` (host:port) with the labels a pod of ``service`` would get."""
    endpoint = monitor["spec"]["endpoints"][endpoint_index]
    namespace = monitor["metadata"].get("namespace", "default")
    labels = {
        "job": service,
        "namespace": namespace,
        "service": service,
        "pod": pod,
        "container": container,
        "endpoint": str(endpoint["port"]),
    }
    job: dict[str, Any] = {
        "job_name": f"serviceMonitor/{namespace}/{monitor['metadata']['name']}/{endpoint_index}",
        "metrics_path": endpoint.get("path", "/metrics"),
        "scheme": endpoint.get("scheme", "http"),
        "static_configs": [{"targets": [target], "labels": labels}],
    }
    for key, name in (("interval", "scrape_interval"), ("scrapeTimeout", "scrape_timeout")):
        if key in endpoint:
            job[name] = endpoint[key]
    if endpoint.get("relabelings"):
        job["relabel_configs"] = relabel_configs(endpoint["relabelings"])
    if endpoint.get("metricRelabelings"):
        job["metric_relabel_configs"] = relabel_configs(endpoint["metricRelabelings"])
    return job


def seconds(duration: str) -> float:
    """A Prometheus duration in seconds.

    >>> seconds("1h30m"), seconds("15s"), seconds("0m")
    (5400.0, 15.0, 0.0)
    """
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    parts = re.findall(r"(\d+)(ms|s|m|h|d|w|y)", duration)
    if not parts or "".join(n + u for n, u in parts) != duration:
        raise ValueError(f"not a Prometheus duration: {duration!r}")
    return float(sum(int(n) * units[u] for n, u in parts))


def rule_file(
    prometheus_rule: dict[str, Any],
    for_scale: float = 1.0,
    interval: str | None = None,
) -> dict[str, Any]:
    """The PrometheusRule's groups as a rule file; ``for_scale`` < 1 shortens every ``for:``
    (to whole seconds, at least 1 s where it was not 0), ``interval`` replaces each group's."""
    groups = []
    for group in prometheus_rule["spec"]["groups"]:
        group = {**group, "rules": [dict(r) for r in group["rules"]]}
        if interval is not None:
            group["interval"] = interval
        for rule in group["rules"]:
            if "for" in rule and for_scale != 1.0:
                wait = seconds(str(rule["for"]))
                rule["for"] = f"{max(1, round(wait * for_scale)) if wait else 0}s"
        groups.append(group)
    return {"groups": groups}


def prometheus_config(
    jobs: list[dict[str, Any]], rule_files: list[str], evaluation_interval: str = "15s"
) -> dict[str, Any]:
    """A whole prometheus.yml: the jobs, the rule files, the global evaluation interval."""
    return {
        "global": {"evaluation_interval": evaluation_interval},
        "rule_files": rule_files,
        "scrape_configs": jobs,
    }

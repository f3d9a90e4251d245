"""Hold the rendered manifests to the rest of the project: config.properties, the handler's
metrics YAML, the archive's response timeout, and the security baseline.

Each check returns a list of problems (empty when fine), every one naming the object and field.

Example:
    >>> exported_metric_names({"model_metrics": {"histogram": [{"name": "h"}]}})
    ['h_bucket', 'h_count', 'h_sum']
"""

from __future__ import annotations

import json
import posixpath
import re
import urllib.parse
from pathlib import Path

import yaml

from k8s.tools.promrules import adapter_query_to_promql, grafana_to_promql, metric_names
from k8s.tools.render import find, object_name
from serving.properties import port_of

# Scraped from kube-state-metrics, not from TorchServe.
KUBE_STATE_METRICS = frozenset({"kube_pod_container_status_restarts_total"})
# Written by Prometheus itself for every scrape target.
SCRAPE_SERIES = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})
# config.properties keys TorchServe accepts as TS_<KEY> environment variables.
DEFAULT_RESPONSE_TIMEOUT_S = 120
# MODEL_SHA256 in k8s/base until an overlay pins the archive: validation accepts it (the example
# overlays cannot know your digest), deploy.py and fetch_model.py refuse it. fetch_model.py spells
# it too (stdlib only, it cannot import this); tests/k8s/test_fetch_model.py holds them equal.
SHA256_PLACEHOLDER = "REPLACE_WITH_SHA256_OF_THE_MAR"
MODEL_SOURCE = "segserve-model-source"
FETCH_SCHEMES = ("https", "file", "s3")
# The only egress the serving pods need: cluster DNS, and HTTPS to the model store.
KUBE_DNS = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
    "podSelector": {
        "matchExpressions": [{"key": "k8s-app", "operator": "In", "values": ["kube-dns"]}]
    },
}
DNS_PORTS = [(53, "TCP"), (53, "UDP")]
HTTPS_PORTS = [(443, "TCP")]
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def exported_metric_names(metrics_config: dict) -> list[str]:
    """Series names TorchServe's Prometheus endpoint can show for a metrics YAML."""
    names = set()
    for section in ("ts_metrics", "model_metrics"):
        for kind, specs in (metrics_config.get(section) or {}).items():
            for spec in specs or []:
                if kind == "histogram":
                    names |= {f"{spec['name']}{s}" for s in ("_bucket", "_sum", "_count")}
                else:
                    names.add(spec["name"])
    return sorted(names)


def torchserve_container(deployment: dict) -> dict:
    """The container named torchserve."""
    for c in deployment["spec"]["template"]["spec"]["containers"]:
        if c["name"] == "torchserve":
            return c
    raise KeyError(f"{object_name(deployment)}: no container named torchserve")


def effective_config(props: dict[str, str], container: dict) -> dict[str, str]:
    """config.properties as TorchServe in the pod sees it: TS_* env and CLI flags applied."""
    cfg = dict(props)
    if cfg.get("enable_envvars_config", "false").lower() == "true":
        for env in container.get("env", []):
            if env["name"].startswith("TS_") and "value" in env:
                cfg[env["name"][3:].lower()] = env["value"]
    if "--disable-token-auth" in container.get("args", []):
        cfg["disable_token_authorization"] = "true"
    return cfg


def check_envvars_enabled(props: dict[str, str], container: dict) -> list[str]:
    ts_env = [e["name"] for e in container.get("env", []) if e["name"].startswith("TS_")]
    if ts_env and props.get("enable_envvars_config", "false").lower() != "true":
        return [
            f"config.properties: the pod overrides {', '.join(ts_env)} but TorchServe ignores "
            "TS_* variables unless config.properties sets enable_envvars_config=true; add it"
        ]
    return []


def check_response_limit(props: dict[str, str], container: dict) -> list[str]:
    """The handler answers 413 above ``max_response_size`` instead of letting the frontend
    drop its whole batch, but it can only learn the limit from the environment it inherits:
    the pod must set TS_MAX_RESPONSE_SIZE, equal to config.properties (the one source)."""
    want = props.get("max_response_size")
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    if want and env.get("TS_MAX_RESPONSE_SIZE") != want:
        return [
            f"torchserve container: env TS_MAX_RESPONSE_SIZE is "
            f"{env.get('TS_MAX_RESPONSE_SIZE')!r}, config.properties max_response_size is "
            f"{want!r}; set the env to the same value (the handler reads it)"
        ]
    return []


AUTH_PROXY = "auth-proxy"
AUTH_PROXY_CONFIG = "segserve-auth-proxy"
API_TOKENS_SECRET = "segserve-api-tokens"
API_TOKENS_KEY = "tokens"
# Where auth.js reads them when nginx.conf is not at hand.
DEFAULT_TOKENS_FILE = "/etc/segserve/auth/tokens"
# The proxy's listeners and what each forwards to, as config.properties keys of TorchServe.
PROXIED = {
    "http": "inference_address",
    "grpc": "grpc_inference_port",
    "metrics": "metrics_address",
}
_NGINX_BLOCK = re.compile(r"\b(server|upstream\s+(\S+))\s*\{")
_NGINX_LISTEN = re.compile(r"(?:^|[;{}])\s*listen\s+(?:[\d.]+:)?(\d+)\b", re.M)
_NGINX_PASS = re.compile(r"(?:^|[;{}])\s*(?:proxy|grpc)_pass\s+\w+://([^;/\s]+)", re.M)
_NGINX_SERVER = re.compile(r"(?:^|[;{}])\s*server\s+([^;\s]+)", re.M)


def _nginx_blocks(conf: str) -> list[tuple[str, str | None, str]]:
    """``(kind, upstream name, body)`` of each top-level server/upstream block of the http block
    (comments dropped; braces matched, so nested locations stay inside their server)."""
    text = re.sub(r"#[^\n]*", "", conf)
    blocks = []
    for match in _NGINX_BLOCK.finditer(text):
        depth, i = 1, match.end()
        while depth and i < len(text):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        kind = "upstream" if match.group(2) else "server"
        blocks.append((kind, match.group(2), text[match.end() : i - 1]))
    return blocks


def proxy_routes(conf: str) -> dict[int, set[int]]:
    """``{listen port: {upstream ports}}`` of an nginx config.

    >>> proxy_routes("upstream ts { server 127.0.0.1:8085; } "
    ...              "server { listen 8080; location / { proxy_pass http://ts; } }")
    {8080: {8085}}
    """
    blocks = _nginx_blocks(conf)
    upstreams = {
        name: {int(a.rsplit(":", 1)[1]) for a in _NGINX_SERVER.findall(body) if ":" in a}
        for kind, name, body in blocks
        if kind == "upstream"
    }
    routes: dict[int, set[int]] = {}
    for kind, _, body in blocks:
        if kind != "server":
            continue
        targets: set[int] = set()
        for target in _NGINX_PASS.findall(body):
            if target in upstreams:
                targets |= upstreams[target]
            elif ":" in target:
                targets.add(int(target.rsplit(":", 1)[1]))
        for port in _NGINX_LISTEN.findall(body):
            routes.setdefault(int(port), set()).update(targets)
    return routes


def auth_proxy_container(deployment: dict) -> dict | None:
    """The auth-proxy sidecar (a restartPolicy: Always init container), else None."""
    pod = deployment["spec"]["template"]["spec"]
    for c in pod.get("initContainers", []) + pod["containers"]:
        if c["name"] == AUTH_PROXY:
            return c
    return None


def config_map(objects: list[dict], prefix: str) -> dict | None:
    """The ConfigMap generated as ``prefix`` (kustomize adds a hash suffix)."""
    for obj in objects:
        name = obj["metadata"]["name"]
        if obj["kind"] == "ConfigMap" and (name == prefix or name.startswith(prefix + "-")):
            return obj
    return None


def _is_loopback(address: str) -> bool:
    return _host(address) in LOOPBACK


def check_ports(objects: list[dict], cfg: dict[str, str]) -> list[str]:
    """TorchServe listens on loopback only; the auth proxy's listeners forward to the ports
    config.properties (with the pod's TS_* env) gives it; the Service and the NetworkPolicy
    reach only the proxy's ports, never management."""
    deployment = find(objects, "Deployment", "segserve")
    name = object_name(deployment)
    problems = [
        f"{name}: TorchServe's {key}={cfg[key]} listens beyond loopback: anyone reaching the pod "
        "would skip the auth proxy (set TS_ env to 127.0.0.1, k8s/base/deployment.yaml)"
        for key in (
            "inference_address",
            "management_address",
            "metrics_address",
            "grpc_inference_address",
            "grpc_management_address",
        )
        if not _is_loopback(cfg.get(key, "0.0.0.0" if key.startswith("grpc") else "http://0.0.0.0"))
    ]
    if torchserve_container(deployment).get("ports"):
        problems.append(f"{name}: torchserve declares containerPorts; only {AUTH_PROXY} listens")
    proxy = auth_proxy_container(deployment)
    if proxy is None:
        return problems + [
            f"{name}: no {AUTH_PROXY} sidecar: nothing checks the API token (k8s/base/auth-proxy)"
        ]
    if proxy not in deployment["spec"]["template"]["spec"].get("initContainers", []) or (
        proxy.get("restartPolicy") != "Always"
    ):
        problems.append(
            f"{name}: {AUTH_PROXY} must be a native sidecar (initContainers, restartPolicy: "
            "Always) so it outlives TorchServe's drain"
        )
    ports = {p["name"]: p["containerPort"] for p in proxy.get("ports", [])}
    cm = config_map(objects, AUTH_PROXY_CONFIG)
    routes = proxy_routes(cm["data"].get("nginx.conf", "")) if cm else {}
    if cm is None:
        problems.append(f"{name}: no ConfigMap {AUTH_PROXY_CONFIG} with the proxy's nginx.conf")
    for port_name, key in PROXIED.items():
        default = "7070" if key == "grpc_inference_port" else "http://127.0.0.1:8080"
        upstream = (
            int(cfg.get(key, default)) if key.endswith("port") else port_of(cfg.get(key, default))
        )
        listen = ports.get(port_name)
        if listen is None:
            problems.append(f"{name}: {AUTH_PROXY} has no containerPort named {port_name}")
        elif cm is not None and routes.get(listen) != {upstream}:
            problems.append(
                f"{AUTH_PROXY_CONFIG} nginx.conf: listener {listen} ({port_name}) forwards to "
                f"{sorted(routes.get(listen, ())) or 'nothing'}, but TorchServe's {key} in the "
                f"pod is port {upstream}"
            )
    private = {
        port_of(cfg.get("management_address", "http://127.0.0.1:8081")),
        int(cfg.get("grpc_management_port", 7071)),
    }
    # Only the objects that pick the serving pods (another Deployment's, such as the web
    # demo's, have their own ports).
    labels = deployment["spec"]["template"]["metadata"].get("labels", {})
    for svc in (o for o in objects if o["kind"] == "Service"):
        selector = _pod_selector(svc)
        if selector is None or not selector_matches(selector, labels):
            continue
        for p in svc["spec"]["ports"]:
            target = p.get("targetPort", p["port"])
            target = ports.get(target, target)
            if target in private:
                problems.append(f"{object_name(svc)}: port {p['name']} exposes management {target}")
            elif target not in ports.values():
                problems.append(
                    f"{object_name(svc)}: port {p['name']} targets {target}, which "
                    f"the {AUTH_PROXY} container does not serve"
                )
    for netpol in (o for o in objects if o["kind"] == "NetworkPolicy"):
        if not selector_matches(netpol["spec"].get("podSelector"), labels):
            continue
        for rule in netpol["spec"].get("ingress", []):
            for p in rule.get("ports", []):
                if ports.get(p["port"], p["port"]) not in ports.values():
                    problems.append(
                        f"{object_name(netpol)}: ingress admits port {p['port']}, which is not "
                        f"one of the {AUTH_PROXY}'s ({sorted(ports)})"
                    )
    return problems


_NGINX_TOKEN_FILES = re.compile(
    r"""(?:^|[;{}])\s*js_var\s+\$segserve_tokens_files\s+(?:"([^"]*)"|'([^']*)'|([^;\s]+))\s*;""",
    re.M,
)


def nginx_token_files(conf: str) -> list[str]:
    """The token files auth.js reads, in order (nginx.conf's ``$segserve_tokens_files``).

    >>> nginx_token_files('js_var $segserve_tokens_files "/a/tokens /a/ui-token";')
    ['/a/tokens', '/a/ui-token']
    """
    match = _NGINX_TOKEN_FILES.search(re.sub(r"#[^\n]*", "", conf))
    return next((g for g in match.groups() if g is not None), "").split() if match else []


def secret_items(volume: dict) -> list[tuple[str, str | None, str | None, bool]]:
    """``(Secret, key, file in the volume, optional)`` of a ``secret`` or ``projected`` volume;
    key and file None: every key of that Secret, each a file of its own name.

    >>> secret_items({"projected": {"sources": [{"secret": {"name": "s", "optional": True,
    ...     "items": [{"key": "token", "path": "ui-token"}]}}]}})
    [('s', 'token', 'ui-token', True)]
    """
    sources = []
    if "secret" in volume:
        s = volume["secret"]
        sources.append((s.get("secretName"), s.get("items"), bool(s.get("optional"))))
    for source in (volume.get("projected") or {}).get("sources") or []:
        if "secret" in source:
            s = source["secret"]
            sources.append((s.get("name"), s.get("items"), bool(s.get("optional"))))
    found: list[tuple[str, str | None, str | None, bool]] = []
    for name, items, optional in sources:
        if items:
            found += [(name, i["key"], i["path"], optional) for i in items]
        else:
            found.append((name, None, None, optional))
    return found


def secret_key_at(pod: dict, container: dict, path: str) -> tuple[str, str, bool, dict] | None:
    """``(Secret, key, optional, the volumeMount)`` of the file ``path`` in ``container``, when
    a Secret or projected volume puts a Secret's key there; else None."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        root = mount["mountPath"].rstrip("/")
        if mount.get("subPath"):
            rel = mount["subPath"] if path == root else None
        else:
            rel = path[len(root) + 1 :] if path.startswith(root + "/") else None
        for secret, key, file, optional in secret_items(volumes.get(mount["name"], {})):
            if rel is not None and (rel == file or (file is None and "/" not in rel)):
                return secret, key or rel, optional, mount
    return None


def check_api_tokens(deployment: dict, nginx_conf: str | None = None) -> list[str]:
    """The proxy reads key ``tokens`` of the Secret segserve-api-tokens from one of the files
    nginx.conf lists (``$segserve_tokens_files``; without the config: /etc/segserve/auth/tokens),
    mounted read-only, not optional, without subPath (a Secret or a projected volume)."""
    name = object_name(deployment)
    proxy = auth_proxy_container(deployment)
    if proxy is None:
        return []  # check_ports names the missing proxy
    files = nginx_token_files(nginx_conf) if nginx_conf is not None else [DEFAULT_TOKENS_FILE]
    pod = deployment["spec"]["template"]["spec"]
    for path in files:
        found = secret_key_at(pod, proxy, path)
        if found is None or found[:2] != (API_TOKENS_SECRET, API_TOKENS_KEY):
            continue
        _, _, optional, mount = found
        problems = []
        if not mount.get("readOnly"):
            problems.append(f"{name}: {AUTH_PROXY} must mount {API_TOKENS_SECRET} read-only")
        if optional:
            problems.append(
                f"{name}: volume {mount['name']}: {API_TOKENS_SECRET} must not be optional "
                "(the pod would start and refuse every request)"
            )
        if mount.get("subPath"):
            problems.append(f"{name}: a subPath mount of {API_TOKENS_SECRET} never rotates")
        return problems
    return [
        f"{name}: {AUTH_PROXY} mounts no Secret {API_TOKENS_SECRET} (its tokens, key "
        f"{API_TOKENS_KEY}) at any of nginx.conf's token files {files}"
    ]


def check_probes_and_auth(deployment: dict, cfg: dict[str, str]) -> list[str]:
    """TorchServe's probes GET /ping through the proxy's http port (the kubelet reaches only the
    pod IP); TorchServe's own token auth is off (the proxy checks, /ping would answer 401)."""
    container = torchserve_container(deployment)
    proxy = auth_proxy_container(deployment) or {}
    http_port = {p["name"]: p["containerPort"] for p in proxy.get("ports", [])}.get("http")
    name = object_name(deployment)
    problems = []
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        spec = container.get(probe)
        if not spec:
            problems.append(f"{name}: torchserve has no {probe}")
            continue
        http = spec.get("httpGet")
        if http and (http.get("path") != "/ping" or http.get("port") != http_port):
            problems.append(
                f"{name}: {probe} should GET /ping on {http_port} (the proxy's http port), "
                f"got {http}"
            )
        if http and cfg.get("disable_token_authorization", "false").lower() != "true":
            problems.append(
                f"{name}: {probe} is an HTTP probe but TorchServe's token auth is on: /ping "
                "would answer 401 (pass --disable-token-auth; the auth proxy checks tokens)"
            )
    return problems


def _prestop_arg(container: dict, flag: str) -> float | None:
    cmd = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    return float(cmd[cmd.index(flag) + 1]) if flag in cmd else None


def check_termination(deployment: dict, cfg: dict[str, str], response_timeout_s: int) -> list[str]:
    """Grace period >= preStop budget; preStop waits at least the response timeout."""
    name = object_name(deployment)
    container = torchserve_container(deployment)
    settle = _prestop_arg(container, "--settle-seconds")
    timeout = _prestop_arg(container, "--timeout-seconds")
    if settle is None or timeout is None:
        return [
            f"{name}: torchserve preStop must run drain.py with --settle-seconds/--timeout-seconds"
        ]
    grace = deployment["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
    needed = max(response_timeout_s, int(cfg.get("default_response_timeout", 0)))
    problems = []
    if timeout - settle < needed:
        problems.append(
            f"{name}: preStop drains {timeout - settle:.0f} s after settling, less "
            f"than the response timeout {needed} s: in-flight requests get cut"
        )
    if grace < timeout + 5:
        problems.append(
            f"{name}: terminationGracePeriodSeconds {grace} < preStop timeout "
            f"{timeout:.0f} s + 5: the kubelet would kill the pod mid-drain"
        )
    return problems


def check_file_layout(deployment: dict, props: dict[str, str]) -> list[str]:
    """config.properties' relative paths resolve to mounted files in the pod's working dir."""
    name = object_name(deployment)
    container = torchserve_container(deployment)
    workdir = container.get("workingDir", "/")
    mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}

    def resolve(p: str) -> str:
        return posixpath.normpath(posixpath.join(workdir, p))

    problems = []
    args = container.get("args", [])
    ts_config = args[args.index("--ts-config") + 1] if "--ts-config" in args else None
    wanted = {
        "--ts-config": (ts_config, "config.properties"),
        "metrics_config": (props.get("metrics_config"), "metrics.yaml"),
    }
    for key, (path, sub) in wanted.items():
        m = mounts.get(resolve(path)) if path else None
        if not m or m.get("subPath") != sub:
            problems.append(
                f"{name}: {key}={path} resolves to {resolve(path or '')}, where no "
                f"ConfigMap key {sub} is mounted"
            )
    store = resolve(props.get("model_store", "model_store"))
    if store not in mounts:
        problems.append(f"{name}: model_store resolves to {store}, which is not a mounted volume")
    return problems


def check_security(deployment: dict) -> list[str]:
    """Non-root, read-only root, no escalation, no capabilities, seccomp; writable = emptyDir."""
    name = object_name(deployment)
    pod = deployment["spec"]["template"]["spec"]
    problems = []
    psc = pod.get("securityContext", {})
    if not psc.get("runAsNonRoot"):
        problems.append(f"{name}: securityContext.runAsNonRoot must be true")
    if psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        problems.append(f"{name}: securityContext.seccompProfile.type must be RuntimeDefault")
    empty_dirs = {v["name"] for v in pod.get("volumes", []) if "emptyDir" in v}
    for c in pod.get("initContainers", []) + pod["containers"]:
        sc = c.get("securityContext", {})
        where = f"{name}: container {c['name']}"
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: allowPrivilegeEscalation must be false")
        if sc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{where}: readOnlyRootFilesystem must be true")
        if sc.get("capabilities", {}).get("drop") != ["ALL"]:
            problems.append(f"{where}: capabilities.drop must be [ALL]")
        for m in c.get("volumeMounts", []):
            if not m.get("readOnly") and m["name"] not in empty_dirs:
                problems.append(f"{where}: writable mount {m['mountPath']} is not an emptyDir")
    return problems


def referenced_metrics(objects: list[dict], adapter: dict, dashboard: dict) -> dict[str, set[str]]:
    """``{where: metric names}`` read by alerts, the adapter rules and the dashboard."""
    refs: dict[str, set[str]] = {}
    for obj in (o for o in objects if o["kind"] == "PrometheusRule"):
        for group in obj["spec"]["groups"]:
            for rule in group["rules"]:
                where = f"{object_name(obj)} {rule.get('alert') or rule.get('record')}"
                refs[where] = metric_names(str(rule["expr"]))
    for i, rule in enumerate(adapter.get("rules", {}).get("custom", [])):
        expr = adapter_query_to_promql(rule["metricsQuery"])
        refs[f"prometheus-adapter rule {i}"] = metric_names(expr)
    for panel in dashboard.get("panels", []):
        for target in panel.get("targets", []):
            refs[f"dashboard panel {panel['title']!r}"] = metric_names(
                grafana_to_promql(target["expr"])
            )
    return refs


def check_metric_names(
    refs: dict[str, set[str]], exported: set[str], recorded: set[str]
) -> list[str]:
    """Every referenced name is exported by TorchServe, recorded by a rule, or from KSM."""
    known = exported | recorded | KUBE_STATE_METRICS | SCRAPE_SERIES
    return [
        f"{where}: reads {sorted(names - known)}, which neither handler/metrics.yaml nor "
        "TorchServe exports (misspelt, or missing from the metrics YAML)"
        for where, names in refs.items()
        if names - known
    ]


def check_hpa_adapter(objects: list[dict], adapter: dict) -> list[str]:
    served = {r["name"]["as"] for r in adapter.get("rules", {}).get("custom", [])}
    problems = []
    for hpa in (o for o in objects if o["kind"] == "HorizontalPodAutoscaler"):
        for metric in hpa["spec"].get("metrics", []):
            if metric["type"] in ("Pods", "Object"):
                name = metric[metric["type"].lower()]["metric"]["name"]
                if name not in served:
                    problems.append(
                        f"{object_name(hpa)}: metric {name} is not served by the "
                        f"prometheus-adapter rules (they serve {sorted(served)})"
                    )
        if (
            not hpa["spec"]
            .get("behavior", {})
            .get("scaleDown", {})
            .get("stabilizationWindowSeconds")
        ):
            problems.append(
                f"{object_name(hpa)}: set behavior.scaleDown.stabilizationWindowSeconds"
            )
    for rule in adapter.get("rules", {}).get("custom", []):
        if "rate(" not in rule["metricsQuery"]:
            problems.append(
                "prometheus-adapter rule: TorchServe latency metrics are cumulative "
                f"counters; {rule['name']['as']} must take a rate()"
            )
    return problems


def load_json(path: Path) -> dict:
    return json.loads(path.read_text())


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _model_source(objects: list[dict]) -> dict | None:
    """The ConfigMap the fetch-model init container reads (kustomize adds a hash suffix)."""
    for obj in objects:
        name = obj["metadata"]["name"]
        if obj["kind"] == "ConfigMap" and (name == MODEL_SOURCE or name.startswith(MODEL_SOURCE)):
            return obj
    return None


def placeholder_pins(objects: list[dict]) -> list[str]:
    """Objects whose MODEL_SHA256 is still the base's placeholder (deploy.py refuses them)."""
    cm = _model_source(objects)
    pin = (cm or {}).get("data", {}).get("MODEL_SHA256", "").strip()
    return [object_name(cm)] if cm is not None and pin == SHA256_PLACEHOLDER else []


def check_model_source(objects: list[dict]) -> list[str]:
    """MODEL_URL/MANIFEST_URL use a scheme fetch_model.py accepts; MODEL_SHA256 is a digest (or
    the placeholder); the init container reads that ConfigMap and passes the pin."""
    deployment = find(objects, "Deployment", "segserve")
    pod = deployment["spec"]["template"]["spec"]
    init = next((c for c in pod.get("initContainers", []) if c["name"] == "fetch-model"), None)
    if init is None:  # the baked-image variant (k8s/README.md): nothing is downloaded
        return []
    cm = _model_source(objects)
    if cm is None:
        return [f"{object_name(deployment)}: fetch-model has no ConfigMap {MODEL_SOURCE}"]
    name, data = object_name(cm), cm.get("data", {})
    problems = []
    for key in ("MODEL_URL", "MANIFEST_URL"):
        url = data.get(key, "")
        if (url or key == "MODEL_URL") and urllib.parse.urlparse(url).scheme not in FETCH_SCHEMES:
            problems.append(
                f"{name}: {key}={url!r}: fetch_model.py accepts only https://, file://, s3:// "
                "(http:// is refused)"
            )
    pin = data.get("MODEL_SHA256", "").strip()
    if pin != SHA256_PLACEHOLDER and not re.fullmatch(r"[0-9a-fA-F]{64}", pin):
        problems.append(
            f"{name}: MODEL_SHA256={pin!r} is neither a sha256 hex digest nor the placeholder "
            f"{SHA256_PLACEHOLDER}: the init container refuses to start without a pin"
        )
    command = init.get("command", []) + init.get("args", [])
    refs = [e.get("configMapRef", {}).get("name") for e in init.get("envFrom", [])]
    if "--sha256" not in command or command[command.index("--sha256") + 1] != "$(MODEL_SHA256)":
        problems.append(
            f"{object_name(deployment)}: fetch-model must pass --sha256 $(MODEL_SHA256)"
        )
    if cm["metadata"]["name"] not in refs:
        problems.append(f"{object_name(deployment)}: fetch-model must envFrom {name}")
    return problems


def selector_matches(selector: dict | None, labels: dict[str, str]) -> bool:
    """Whether a label selector (``matchLabels`` and ``matchExpressions``) selects ``labels``;
    an empty one selects everything.

    >>> selector_matches({"matchExpressions": [{"key": "k8s-app", "operator": "In",
    ...     "values": ["kube-dns"]}]}, {"k8s-app": "kube-dns"})
    True
    >>> selector_matches({"matchLabels": {"app": "a"}}, {"app": "b"})
    False
    """
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, values = expr["key"], expr.get("values") or []
        holds = {
            "In": key in labels and labels[key] in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[expr["operator"]]
        if not holds:
            return False
    return True


def _pod_selector(obj: dict) -> dict | None:
    """The label selector with which ``obj`` picks pods (None: it picks none this way)."""
    spec = obj.get("spec") or {}
    if obj["kind"] == "Service":
        return {"matchLabels": spec["selector"]} if spec.get("selector") else None
    if obj["kind"] in ("Deployment", "PodDisruptionBudget"):
        return spec.get("selector")
    if obj["kind"] == "NetworkPolicy":
        return spec.get("podSelector")
    return None


def check_selectors(objects: list[dict]) -> list[str]:
    """With more than one Deployment (the web demo beside TorchServe), each Service and
    PodDisruptionBudget selects the pods of exactly one Deployment, each Deployment only its
    own, each NetworkPolicy with rules at most one's, and each HPA scales a Deployment that
    exists. Else a Service would send inference to the page, the serving budget would count
    the page's pod, or the serving policy's rules would open the page's pod."""
    deployments = [o for o in objects if o["kind"] == "Deployment"]
    if not deployments:
        return []
    problems = []
    for obj in objects:
        selector = _pod_selector(obj)
        if selector is None:
            continue
        ns = obj["metadata"].get("namespace")
        selected = [
            d["metadata"]["name"]
            for d in deployments
            if d["metadata"].get("namespace") == ns
            and selector_matches(selector, d["spec"]["template"]["metadata"].get("labels", {}))
        ]
        name, kind = object_name(obj), obj["kind"]
        if kind == "Deployment":
            own = obj["metadata"]["name"]
            if own not in selected:
                problems.append(f"{name}: its selector {selector} does not select its own pods")
            if set(selected) - {own}:
                problems.append(
                    f"{name}: its selector {selector} also selects the pods of Deployment "
                    f"{sorted(set(selected) - {own})}: the two would fight over them"
                )
        elif kind in ("Service", "PodDisruptionBudget") and len(selected) != 1:
            problems.append(
                f"{name}: its selector {selector} selects the pods of "
                f"{selected or 'no Deployment'}; it must select one Deployment's "
                "(give each its own app.kubernetes.io/component label)"
            )
        elif kind == "NetworkPolicy" and len(selected) > 1:
            if obj["spec"].get("ingress") or obj["spec"].get("egress"):
                problems.append(
                    f"{name}: its podSelector {selector} selects the pods of {selected}: its "
                    "rules would open all of them alike; give each Deployment its own policy"
                )
    names = {d["metadata"]["name"] for d in deployments}
    for hpa in (o for o in objects if o["kind"] == "HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        if ref.get("kind") == "Deployment" and ref.get("name") not in names:
            problems.append(f"{object_name(hpa)}: scales Deployment {ref.get('name')}, not here")
    return problems


def _selects(policy: dict, labels: dict[str, str]) -> bool:
    """Whether ``policy`` may select pods with ``labels`` (matchExpressions count as yes, so their
    rules are checked rather than ignored)."""
    selector = policy["spec"].get("podSelector") or {}
    wanted = selector.get("matchLabels") or {}
    return bool(selector.get("matchExpressions")) or all(
        labels.get(k) == v for k, v in wanted.items()
    )


def policy_types(policy: dict) -> list[str]:
    spec = policy["spec"]
    return spec.get("policyTypes") or ["Ingress"] + (["Egress"] if "egress" in spec else [])


def _ports(rule: dict) -> list[tuple]:
    return sorted((p.get("port"), p.get("protocol", "TCP")) for p in rule.get("ports", []))


def check_egress(objects: list[dict], pod_labels: dict[str, str], pods: str) -> list[str]:
    """Some NetworkPolicy limits the egress of the serving pods, and every egress rule that
    applies to them is DNS to named peers (53 UDP+TCP, never to anywhere: port 53 would be a
    tunnel out) or HTTPS (443/TCP, any destination; narrowing it is up to the cluster)."""
    limiting = [
        o
        for o in objects
        if o["kind"] == "NetworkPolicy" and _selects(o, pod_labels) and "Egress" in policy_types(o)
    ]
    if not limiting:
        return [
            f"{pods}: no NetworkPolicy limits the egress of its pods {pod_labels}: a compromised "
            "worker could reach anything (allow only DNS and HTTPS, k8s/base/networkpolicy.yaml)"
        ]
    problems = []
    for policy in limiting:
        for i, rule in enumerate(policy["spec"].get("egress") or []):
            ports = _ports(rule)
            peers = rule.get("to") or []
            # kustomize's labels(includeSelectors) add the serving pods' own labels to every
            # matchLabels under egress.to: the DNS peer then matches no DNS pod at all.
            polluted = [
                p
                for p in peers
                if pod_labels
                and pod_labels.items()
                <= (p.get("podSelector", {}).get("matchLabels") or {}).items()
            ]
            if polluted:
                problems.append(
                    f"{object_name(policy)}: egress rule {i} peer {polluted[0]} carries the "
                    "serving pods' own labels (kustomize adds them to matchLabels); use "
                    "matchExpressions"
                )
            anywhere = not peers or any(
                p.get("ipBlock", {}).get("cidr") in ("0.0.0.0/0", "::/0") for p in peers
            )
            if ports == HTTPS_PORTS or (ports == DNS_PORTS and not anywhere):
                continue
            problems.append(
                f"{object_name(policy)}: egress rule {i} allows {ports or 'every port'} to "
                f"{rule.get('to') or 'anywhere'}; serving pods need only DNS (53 UDP+TCP, to the "
                "cluster DNS pods) and HTTPS (443/TCP) for the model download"
            )
    return problems


def _host(address: str) -> str:
    """Host of a TorchServe address: ``http://127.0.0.1:8081`` or a bare gRPC ``127.0.0.1``."""
    if "//" not in address:
        return address
    return urllib.parse.urlparse(address).hostname or address


def check_kserve_management(isvc: dict, file_cfg: dict[str, str]) -> list[str]:
    """KServe: TorchServe's management API (REST and gRPC) listens on loopback only, pinned by
    TS_* env in the InferenceService; the config file KServe's wrapper reads agrees with it."""
    name = object_name(isvc)
    model = isvc["spec"]["predictor"].get("model", {})
    env = {e["name"]: e.get("value") for e in model.get("env", [])}
    problems = []
    if file_cfg.get("enable_envvars_config", "false").lower() != "true":
        problems.append(f"{name}: the KServe config must set enable_envvars_config=true")
    for key in ("management_address", "grpc_management_address"):
        var = f"TS_{key.upper()}"
        if var not in env:
            problems.append(
                f"{name}: predictor.model.env has no {var}: management would bind whatever the "
                "uploaded config says (set it to loopback, see k8s/README.md KServe)"
            )
            continue
        if _host(env[var]) not in LOOPBACK:
            problems.append(
                f"{name}: {var}={env[var]} exposes TorchServe's management API, which has no "
                "authentication here (disable_token_authorization=true); bind it to 127.0.0.1"
            )
    for key in ("inference_address", "management_address"):
        var = f"TS_{key.upper()}"
        if var in env and file_cfg.get(key) != env[var]:
            problems.append(
                f"{name}: {var}={env[var]} but the KServe config says {key}="
                f"{file_cfg.get(key)}; KServe's wrapper reads the file, TorchServe the env: "
                "make them equal"
            )
    return problems

"""Hold the web demo page (k8s/components/ui, Deployment ``segserve-ui``) to what it calls.

The page runs ``python -m ui`` with options that must agree with the rest of the overlay:

* ``--inference-url`` names the segserve Service (``segserve``, ``segserve.<namespace>``,
  ``segserve.<namespace>.svc...``) and a port of it that leads to the auth proxy's REST listener;
  with ``--protocol grpc``, ``--grpc-target`` one that leads to its gRPC listener;
  ``--model-name`` is a model config.properties loads;
* ``--host`` is every interface and ``--port`` a containerPort; the readiness, liveness (and
  startup) probes GET ``/healthz`` on it; a Service selecting the page's pods targets it;
* ``--token-file`` is key ``token`` of the Secret segserve-ui-token, mounted (read-only, no
  subPath: rotation) where the option points; the auth proxy reads the same key from one of
  the files nginx.conf's ``$segserve_tokens_files`` lists, so it accepts the page's token;
* NetworkPolicy: a policy limits the page's ingress and admits its port; the policies of the
  serving pods admit the page's pods on the proxy ports it uses; if the page's egress is
  limited, DNS and those ports of the serving pods stay allowed.

Each check returns problems (empty when fine), naming the object and the field.

Example:
    >>> service_name("segserve.segserve.svc.cluster.local", "segserve")
    'segserve'
    >>> service_name("segserve.other", "segserve") is None
    True
"""

from __future__ import annotations

import urllib.parse

from k8s.tools import consistency as cc
from k8s.tools.loadgen import flag_value
from k8s.tools.render import find, object_name

UI_DEPLOYMENT = "segserve-ui"
UI_CONTAINER = "ui"
UI_TOKEN_SECRET = "segserve-ui-token"
UI_TOKEN_KEY = "token"
SERVING = "segserve"
HEALTH_PATH = "/healthz"
# The page's own defaults (python -m ui --help) for the options checked here.
UI_DEFAULTS = {"--protocol": "rest", "--port": "7860"}
ALL_INTERFACES = ("0.0.0.0", "::")


def service_name(host: str, namespace: str | None) -> str | None:
    """The Service a cluster DNS name means from ``namespace`` (None: another namespace's, or
    not a Service name): ``name``, ``name.ns``, ``name.ns.svc[.<cluster domain>]``."""
    name, *rest = host.split(".")
    if not rest or (rest[0] == namespace and (len(rest) == 1 or rest[1] == "svc")):
        return name
    return None


def _ui_container(deployment: dict) -> dict | None:
    for c in deployment["spec"]["template"]["spec"]["containers"]:
        if c["name"] == UI_CONTAINER:
            return c
    return None


def _pod_ports(deployment: dict) -> dict[str, int]:
    """Named containerPorts of every container of the pod (sidecars included)."""
    pod = deployment["spec"]["template"]["spec"]
    return {
        p["name"]: p["containerPort"]
        for c in pod.get("initContainers", []) + pod["containers"]
        for p in c.get("ports", [])
        if "name" in p
    }


def _resolve(port: int | str | None, named: dict[str, int]) -> int | None:
    return named.get(port) if isinstance(port, str) else port


def _labels(deployment: dict) -> dict[str, str]:
    return deployment["spec"]["template"]["metadata"].get("labels", {})


def check_ui(objects: list[dict], props: dict[str, str]) -> list[str]:
    """Every check of the page against the rendered overlay (``props``: config.properties)."""
    ui = find(objects, "Deployment", UI_DEPLOYMENT)
    name = object_name(ui)
    container = _ui_container(ui)
    if container is None:
        return [f"{name}: no container named {UI_CONTAINER}"]
    argv = [*container.get("command", []), *container.get("args", [])]
    opts = {
        flag: flag_value(argv, flag, UI_DEFAULTS.get(flag))
        for flag in ("--inference-url", "--protocol", "--grpc-target", "--model-name")
        + ("--token-file", "--host", "--port")
    }
    problems = check_target(objects, ui, opts, props)
    problems += check_page_port(objects, ui, container, opts)
    problems += check_token(objects, ui, container, opts["--token-file"])
    problems += check_policies(objects, ui, opts)
    return problems


def _serving_port(objects: list[dict], ui: dict, address: str, listener: str) -> list[str]:
    """``address`` (host:port) reaches the segserve Service on a port that leads to the auth
    proxy's ``listener`` (its containerPort name: http or grpc)."""
    host, _, port = address.rpartition(":")
    namespace = ui["metadata"].get("namespace")
    if service_name(host, namespace) != SERVING:
        return [
            f"{address}: {host!r} is not the Service {SERVING} in namespace {namespace} (use "
            f"{SERVING} or {SERVING}.{namespace}.svc): the page would call another server"
        ]
    try:
        svc = find(objects, "Service", SERVING)
        serving = find(objects, "Deployment", SERVING)
    except KeyError as exc:
        return [f"{address}: {exc.args[0]}"]
    proxy = cc.auth_proxy_container(serving) or {}
    want = {p["name"]: p["containerPort"] for p in proxy.get("ports", [])}.get(listener)
    named = _pod_ports(serving)
    exposed = {
        p["port"]: _resolve(p.get("targetPort", p["port"]), named) for p in svc["spec"]["ports"]
    }
    if not port.isdigit() or int(port) not in exposed:
        return [f"{address}: {object_name(svc)} has no port {port} (it exposes {sorted(exposed)})"]
    if want is None or exposed[int(port)] != want:
        return [
            f"{address}: {object_name(svc)} port {port} leads to container port "
            f"{exposed[int(port)]}, not to the {cc.AUTH_PROXY}'s {listener} listener ({want})"
        ]
    return []


def check_target(objects: list[dict], ui: dict, opts: dict, props: dict[str, str]) -> list[str]:
    """--inference-url / --grpc-target reach the proxy through the segserve Service; the model
    is one TorchServe loads."""
    name = object_name(ui)
    url = opts["--inference-url"]
    if not url:
        return [f"{name}: ui passes no --inference-url (the page's default is no Service)"]
    parsed = urllib.parse.urlparse(url)
    problems = []
    if parsed.scheme != "http" or parsed.port is None:
        problems.append(
            f"{name}: --inference-url {url}: the auth proxy speaks plain http; give "
            f"http://{SERVING}:<port>"
        )
    else:
        address = f"{parsed.hostname}:{parsed.port}"
        problems += [
            f"{name}: --inference-url {p}" for p in _serving_port(objects, ui, address, "http")
        ]
    protocol = opts["--protocol"]
    if protocol not in ("rest", "grpc"):
        problems.append(f"{name}: --protocol {protocol!r}: the page speaks rest or grpc")
    if protocol == "grpc":
        target = opts["--grpc-target"] or ""
        problems += [
            f"{name}: --grpc-target {p}" for p in _serving_port(objects, ui, target, "grpc")
        ]
    serving = next(
        (o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == SERVING), None
    )
    if serving is not None:
        cfg = cc.effective_config(props, cc.torchserve_container(serving))
        models = loaded_models(cfg.get("load_models", ""))
        model = opts["--model-name"]
        if model and models is not None and model not in models:
            problems.append(
                f"{name}: --model-name {model}: TorchServe loads {sorted(models)} "
                "(config.properties load_models); every prediction would be a 404"
            )
    return problems


def loaded_models(load_models: str) -> set[str] | None:
    """The model names of a ``load_models`` value (None: ``all`` or unset, not known here).

    >>> sorted(loaded_models("segmenter=segmenter.mar,other.mar"))
    ['other', 'segmenter']
    """
    if load_models.strip().lower() in ("all", ""):
        return None
    names = set()
    for entry in load_models.split(","):
        entry = entry.strip()
        names.add(
            entry.split("=", 1)[0]
            if "=" in entry
            else entry.rsplit("/", 1)[-1].removesuffix(".mar")
        )
    return names


def check_page_port(objects: list[dict], ui: dict, container: dict, opts: dict) -> list[str]:
    """The page listens on every interface, on a declared containerPort; its probes GET
    /healthz there; a Service of the page's pods targets it."""
    name = object_name(ui)
    problems = []
    if opts["--host"] not in ALL_INTERFACES:
        problems.append(
            f"{name}: ui --host {opts['--host']}: listen on 0.0.0.0, or neither the kubelet's "
            "probes nor the Service reach the page (they come to the pod IP)"
        )
    port = int(opts["--port"]) if (opts["--port"] or "").isdigit() else None
    named = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
    if port not in [p["containerPort"] for p in container.get("ports", [])]:
        problems.append(
            f"{name}: ui --port {opts['--port']} is not a containerPort of the ui container "
            f"({sorted(named.values())})"
        )
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        spec = container.get(probe)
        if not spec:
            if probe != "startupProbe":
                problems.append(f"{name}: ui has no {probe} (GET {HEALTH_PATH} on {port})")
            continue
        http = spec.get("httpGet") or {}
        if http.get("path") != HEALTH_PATH or _resolve(http.get("port"), named) != port:
            problems.append(
                f"{name}: ui {probe} should GET {HEALTH_PATH} on the page's port {port} "
                f"(it answers without calling TorchServe), got {http or 'no httpGet'}"
            )
    services = [
        s
        for s in objects
        if s["kind"] == "Service"
        and s["spec"].get("selector")
        and cc.selector_matches({"matchLabels": s["spec"]["selector"]}, _labels(ui))
    ]
    if not any(
        _resolve(p.get("targetPort", p["port"]), named) == port
        for s in services
        for p in s["spec"]["ports"]
    ):
        problems.append(
            f"{name}: no Service selects the page's pods with a port targeting {port} "
            f"({[object_name(s) for s in services] or 'none selects them'})"
        )
    return problems


def check_token(
    objects: list[dict], ui: dict, container: dict, token_file: str | None
) -> list[str]:
    """--token-file is the Secret segserve-ui-token's key ``token`` (not optional, no subPath),
    and the auth proxy reads that key from one of its token files."""
    name = object_name(ui)
    if not token_file:
        return [f"{name}: ui passes no --token-file: the proxy would refuse every prediction"]
    pod = ui["spec"]["template"]["spec"]
    problems = []
    found = cc.secret_key_at(pod, container, token_file)
    if found is None or found[:2] != (UI_TOKEN_SECRET, UI_TOKEN_KEY):
        what = f"key {found[1]} of Secret {found[0]}" if found else "no mounted Secret key"
        problems.append(
            f"{name}: --token-file {token_file} is {what}; mount key {UI_TOKEN_KEY} of Secret "
            f"{UI_TOKEN_SECRET} there (not a subPath: the page re-reads it after a rotation)"
        )
    else:
        _, _, optional, mount = found
        if optional:
            problems.append(
                f"{name}: {UI_TOKEN_SECRET} must not be optional for the page (it would start "
                "and have every prediction refused)"
            )
        if mount.get("subPath"):
            problems.append(f"{name}: a subPath mount of {UI_TOKEN_SECRET} never rotates")
    try:
        serving = find(objects, "Deployment", SERVING)
    except KeyError:
        return problems
    proxy = cc.auth_proxy_container(serving)
    cm = cc.config_map(objects, cc.AUTH_PROXY_CONFIG)
    files = cc.nginx_token_files(cm["data"].get("nginx.conf", "")) if cm else []
    if proxy is None:
        return problems
    serving_pod = serving["spec"]["template"]["spec"]
    reads = [cc.secret_key_at(serving_pod, proxy, f) for f in files]
    if not any(r is not None and r[:2] == (UI_TOKEN_SECRET, UI_TOKEN_KEY) for r in reads):
        problems.append(
            f"{object_name(serving)}: the {cc.AUTH_PROXY} reads no file holding key "
            f"{UI_TOKEN_KEY} of Secret {UI_TOKEN_SECRET} (nginx.conf's token files: {files}), so "
            "it refuses the page's token: project that Secret into its token volume "
            "(k8s/components/ui/auth-proxy-tokens.yaml)"
        )
    return problems


def _namespace_labels(objects: list[dict], namespace: str | None) -> dict[str, str]:
    """The labels of ``namespace`` (its Namespace object's, when the overlay has it), with the
    one the API server sets on every namespace."""
    labels = {"kubernetes.io/metadata.name": namespace or "default"}
    for obj in objects:
        if obj["kind"] == "Namespace" and obj["metadata"]["name"] == namespace:
            labels |= obj["metadata"].get("labels") or {}
    return labels


def _peer_matches(peer: dict, pods: dict, policy_ns: str | None, ns_labels: dict) -> bool:
    """Whether a from/to peer covers the pods of Deployment ``pods`` (an ipBlock never does:
    pod IPs are not known here)."""
    if "ipBlock" in peer:
        return False
    if "namespaceSelector" in peer:
        if not cc.selector_matches(peer["namespaceSelector"], ns_labels):
            return False
    elif pods["metadata"].get("namespace") != policy_ns:
        return False
    return "podSelector" not in peer or cc.selector_matches(peer["podSelector"], _labels(pods))


def _port_matches(rule: dict, port: int, protocol: str, named: dict[str, int]) -> bool:
    """Whether a rule's ports cover ``port`` (named ports resolve on the destination pods)."""
    if not rule.get("ports"):
        return True
    for p in rule["ports"]:
        if p.get("protocol", "TCP") != protocol:
            continue
        if "port" not in p:
            return True
        first = _resolve(p["port"], named)
        if first is not None and first <= port <= p.get("endPort", first):
            return True
    return False


def _policies(objects: list[dict], pods: dict, direction: str) -> list[dict]:
    """The NetworkPolicies that isolate ``pods`` (a Deployment) for Ingress or Egress."""
    return [
        o
        for o in objects
        if o["kind"] == "NetworkPolicy"
        and o["metadata"].get("namespace") == pods["metadata"].get("namespace")
        and cc.selector_matches(o["spec"].get("podSelector"), _labels(pods))
        and direction in cc.policy_types(o)
    ]


def allows(
    objects: list[dict],
    pods: dict,
    direction: str,
    port: int,
    protocol: str = "TCP",
    peer: dict | None = None,
) -> bool:
    """Whether ``pods`` (a Deployment) may receive (``Ingress``) or send (``Egress``) traffic
    on ``port``, from or to the pods of Deployment ``peer`` (None: some peer, any)."""
    policies = _policies(objects, pods, direction)
    if not policies:
        return True  # not isolated in that direction
    key = "from" if direction == "Ingress" else "to"
    destination = pods if direction == "Ingress" else peer
    named = _pod_ports(destination) if destination else {}
    for policy in policies:
        ns = policy["metadata"].get("namespace")
        rules = policy["spec"].get(direction.lower()) or []
        for rule in rules:
            peers = rule.get(key) or []
            if peer is not None and peers:
                ns_labels = _namespace_labels(objects, peer["metadata"].get("namespace"))
                if not any(_peer_matches(p, peer, ns, ns_labels) for p in peers):
                    continue
            if _port_matches(rule, port, protocol, named):
                return True
    return False


def check_policies(objects: list[dict], ui: dict, opts: dict) -> list[str]:
    """The page's ingress is a NetworkPolicy admitting its port; the serving pods admit the
    page on the proxy ports it calls; a limited egress still reaches DNS and those ports."""
    name = object_name(ui)
    problems = []
    page_port = int(opts["--port"]) if (opts["--port"] or "").isdigit() else None
    if not _policies(objects, ui, "Ingress"):
        problems.append(
            f"{name}: no NetworkPolicy limits the ingress of the page's pods {_labels(ui)} "
            "(k8s/components/ui/networkpolicy.yaml)"
        )
    elif page_port is not None and not allows(objects, ui, "Ingress", page_port):
        problems.append(
            f"{name}: the NetworkPolicies of the page's pods admit nobody on its port "
            f"{page_port}: the Service leads nowhere"
        )
    try:
        serving = find(objects, "Deployment", SERVING)
    except KeyError:
        return problems
    proxy = {
        p["name"]: p["containerPort"]
        for p in (cc.auth_proxy_container(serving) or {}).get("ports", [])
    }
    listeners = ["http"] + (["grpc"] if opts["--protocol"] == "grpc" else [])
    for listener in listeners:
        port = proxy.get(listener)
        if port is None:
            continue  # check_ports names the missing proxy port
        if not allows(objects, serving, "Ingress", port, peer=ui):
            problems.append(
                f"{object_name(serving)}: its NetworkPolicies do not admit the page's pods "
                f"{_labels(ui)} on {port} ({listener}, what the page calls): add a rule "
                "`from: [{podSelector: ...}]` (k8s/components/ui/kustomization.yaml)"
            )
        if not allows(objects, ui, "Egress", port, peer=serving):
            problems.append(
                f"{name}: the page's egress policy does not allow the segserve pods on {port} "
                f"({listener})"
            )
    if not allows(objects, ui, "Egress", 53, "UDP"):
        problems.append(
            f"{name}: the page's egress policy allows no DNS (53/UDP): it cannot resolve {SERVING}"
        )
    return problems

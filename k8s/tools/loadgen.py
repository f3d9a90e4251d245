"""Hold k8s/loadtest (Locust master Job + Service, workers Job) to itself and to the project.

* the master runs ``python -m loadtest.run --expect-workers N`` with options loadtest.run
  declares (read from ``loadtest/run.py``'s ``add_argument`` calls: k8s/tools does not import
  the load test's code or its dependencies), aimed at config.properties' inference and gRPC
  ports;
* ``--expect-workers`` equals the workers Job's ``parallelism`` and ``completions``;
* the workers' ``--master-host``/``--master-port`` reach the master through the Service, whose
  selector picks the master pod only and whose port is the master's ``--master-bind-port``;
* each Job runs to completion once: ``restartPolicy: Never``, ``backoffLimit``,
  ``activeDeadlineSeconds``, ``ttlSecondsAfterFinished``; requests and limits on every container;
  the report folder (``--out``) is a writable emptyDir; the workers' locustfile exists;
* the Namespace carries the label the serving NetworkPolicy admits inference traffic from.

Each check returns problems (empty when fine), naming the object.

Example:
    >>> flag_value(["--worker", "--master-port", "5557"], "--master-port")
    '5557'
"""

from __future__ import annotations

import ast
import urllib.parse
from pathlib import Path
from types import SimpleNamespace

from k8s.tools.render import object_name
from serving.properties import port_of

# k8s/base/networkpolicy.yaml admits inference (8080, 7070) only from namespaces labelled so.
INFERENCE_CLIENT_LABEL = ("segserve.io/inference-client", "true")
LOCUST_MASTER_PORT = 5557  # Locust's default --master-port / --master-bind-port
JOB_FIELDS = ("backoffLimit", "activeDeadlineSeconds", "ttlSecondsAfterFinished")
RUN_PY = Path("loadtest/run.py")
# The master's command. Compared, never run: k8s/tools needs none of the load test's packages.
MASTER_COMMAND = "python -m loadtest.run".split()
# loadtest.run's defaults for the options these checks read.
RUN_DEFAULTS = {"expect_workers": "0", "processes": "1", "master_bind_port": "5557"}


def flag_value(args: list[str], flag: str, default: str | None = None) -> str | None:
    """The value after ``flag`` (or in ``flag=value``) in ``args``, else ``default``."""
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return default


def _container(job: dict) -> dict:
    return job["spec"]["template"]["spec"]["containers"][0]


def _cmdline(job: dict) -> list[str]:
    c = _container(job)
    return [*c.get("command", []), *c.get("args", [])]


def is_master(job: dict) -> bool:
    cmd = _cmdline(job)
    return "loadtest.run" in cmd and "--expect-workers" in cmd


def is_workers(job: dict) -> bool:
    return "--worker" in _cmdline(job)


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def check_job(job: dict) -> list[str]:
    """A Job that runs once and is bounded in time, CPU and memory."""
    name = object_name(job)
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    problems = [f"{name}: spec.{f} must be set" for f in JOB_FIELDS if f not in spec]
    if pod.get("restartPolicy") != "Never":
        problems.append(f"{name}: restartPolicy must be Never (a restarted Locust starts over)")
    for c in pod["containers"]:
        res = c.get("resources", {})
        for kind in ("requests", "limits"):
            missing = [r for r in ("cpu", "memory") if r not in res.get(kind, {})]
            if missing:
                problems.append(f"{name}: container {c['name']} has no {kind} {missing}")
    return problems


def run_options(repo: Path) -> set[str]:
    """The ``--options`` loadtest/run.py's parser declares (all of them take a value)."""
    tree = ast.parse((repo / RUN_PY).read_text(encoding="utf-8"))
    return {
        arg.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument"
        for arg in node.args
        if isinstance(arg, ast.Constant) and str(arg.value).startswith("--")
    }


def parse_master_args(job: dict, repo: Path) -> SimpleNamespace | str:
    """The master's loadtest.run options (``--name value`` pairs), or what is wrong with them.

    >>> job = {"kind": "Job", "metadata": {"name": "m"}, "spec": {"template": {"spec": {
    ...     "containers": [{"command": MASTER_COMMAND,
    ...                     "args": ["--expect-workers", "2", "--users"]}]}}}}
    >>> parse_master_args(job, Path("."))
    'Job/m: option --users has no value'
    """
    name = object_name(job)
    cmd = _cmdline(job)
    if cmd[:3] != MASTER_COMMAND:
        return f"{name}: the master must run `python -m loadtest.run`, got {cmd[:3]}"
    args, values = cmd[3:], dict(RUN_DEFAULTS)
    if len(args) % 2:
        return f"{name}: option {args[-1]} has no value"
    known = run_options(repo)
    for flag, value in zip(args[::2], args[1::2], strict=True):
        if flag not in known:
            return f"{name}: {flag} is not an option of loadtest.run ({RUN_PY})"
        values[flag[2:].replace("-", "_")] = value
    try:
        for key in ("expect_workers", "processes", "master_bind_port"):
            values[key] = int(values[key])
    except ValueError as exc:
        return f"{name}: {exc}"
    for key in ("host", "grpc_host", "out"):
        values.setdefault(key, "")
    return SimpleNamespace(**values)


def check_loadtest(objects: list[dict], repo: Path, props: dict[str, str]) -> list[str]:
    """Every check of the rendered k8s/loadtest (see the module docstring)."""
    jobs = [o for o in objects if o["kind"] == "Job"]
    masters, workers = [j for j in jobs if is_master(j)], [j for j in jobs if is_workers(j)]
    if len(masters) != 1 or len(workers) != 1:
        return [
            f"k8s/loadtest: want one master Job (python -m loadtest.run --expect-workers N) and "
            f"one workers Job (locust --worker), found {len(masters)} and {len(workers)}"
        ]
    master, worker = masters[0], workers[0]
    problems = [p for j in jobs for p in check_job(j)]
    args = parse_master_args(master, repo)
    if isinstance(args, str):
        return [*problems, args]
    mname, wname = object_name(master), object_name(worker)

    # The master waits for exactly the workers the workers Job runs.
    wspec = worker["spec"]
    if not args.expect_workers == wspec.get("parallelism") == wspec.get("completions"):
        problems.append(
            f"{mname}: --expect-workers {args.expect_workers} but {wname} has parallelism "
            f"{wspec.get('parallelism')} and completions {wspec.get('completions')}: must agree"
        )
    if args.processes != 1:
        problems.append(f"{mname}: --processes {args.processes} with --expect-workers")

    # The target: the serving ports of config.properties.
    rest_port = urllib.parse.urlsplit(args.host).port
    grpc_port = int(args.grpc_host.rsplit(":", 1)[-1]) if ":" in args.grpc_host else None
    want_rest = port_of(props.get("inference_address", "http://127.0.0.1:8080"))
    want_grpc = int(props.get("grpc_inference_port", 7070))
    if rest_port != want_rest:
        problems.append(f"{mname}: --host {args.host} is not config.properties' port {want_rest}")
    if grpc_port != want_grpc:
        problems.append(f"{mname}: --grpc-host {args.grpc_host} is not port {want_grpc}")

    # The report folder must be writable: an emptyDir mounted at --out (or above it).
    pod = master["spec"]["template"]["spec"]
    empty_dirs = {v["name"] for v in pod.get("volumes", []) if "emptyDir" in v}
    out = Path(args.out) if args.out else None
    mounts = [
        Path(m["mountPath"])
        for m in _container(master).get("volumeMounts", [])
        if m["name"] in empty_dirs and not m.get("readOnly")
    ]
    if out is None or not any(out == m or m in out.parents for m in mounts):
        problems.append(f"{mname}: --out {out} is not on a writable emptyDir mount")

    # Workers -> Service -> master pod, one port all along.
    wargs = _cmdline(worker)
    host = flag_value(wargs, "--master-host", "127.0.0.1") or ""
    wport = int(flag_value(wargs, "--master-port", str(LOCUST_MASTER_PORT)) or 0)
    services = [o for o in objects if o["kind"] == "Service"]
    svc = next((s for s in services if host.split(".")[0] == s["metadata"]["name"]), None)
    if svc is None:
        problems.append(f"{wname}: --master-host {host} is no Service of k8s/loadtest")
    else:
        sname = object_name(svc)
        selector = svc["spec"].get("selector", {})
        labels = master["spec"]["template"]["metadata"].get("labels", {})
        wlabels = worker["spec"]["template"]["metadata"].get("labels", {})
        if not _selects(selector, labels) or _selects(selector, wlabels):
            problems.append(f"{sname}: selector {selector} must pick the master pod only")
        ports = {p.get("name"): p["containerPort"] for p in _container(master).get("ports", [])}
        port = next((p for p in svc["spec"]["ports"] if p["port"] == wport), None)
        if port is None:
            problems.append(f"{sname}: no port {wport} (the workers' --master-port)")
        else:
            target = port.get("targetPort", port["port"])
            target = ports.get(target, target)
            if not target == args.master_bind_port == wport:
                problems.append(
                    f"{sname}: port {wport} -> {target}, but the master binds "
                    f"{args.master_bind_port} (--master-bind-port)"
                )

    # The workers' locustfile, relative to their working dir (the repository root in the image).
    locustfile = flag_value(wargs, "-f") or flag_value(wargs, "--locustfile")
    if not locustfile or not (repo / locustfile).is_file():
        problems.append(f"{wname}: locustfile {locustfile} is not in the repository")

    key, value = INFERENCE_CLIENT_LABEL
    for ns in (o for o in objects if o["kind"] == "Namespace"):
        if ns["metadata"].get("labels", {}).get(key) != value:
            problems.append(
                f"{object_name(ns)}: needs label {key}={value}, or the serving NetworkPolicy "
                "drops the load"
            )
    return problems

"""Deploy an overlay to the current kube context and prove it answers.

Steps: render the overlay (kustomize, as `kubectl apply -k`) -> server-side apply every object
(field manager ``segserve-deploy``; Namespace first) -> wait until the Deployment's rollout is
complete -> ``kubectl port-forward`` to the Service -> one smoke prediction (a generated PNG
unless ``--image`` is given) -> stop the port-forward. ``--dry-run`` prints the plan and the
objects and touches nothing. An overlay whose MODEL_SHA256 is still the base's placeholder is
refused before anything is applied (its pods could never start).

Example:
    python k8s/tools/deploy.py --overlay gpu --image-ref registry.example.com/segserve:0.1.0-gpu
    python k8s/tools/deploy.py --overlay cpu --dry-run
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from serving.properties import DEFAULT_MODEL_NAME

if __package__ in (None, ""):  # run as a script: make `k8s.tools` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from k8s.tools.consistency import (  # noqa: E402
    API_TOKENS_SECRET,
    SHA256_PLACEHOLDER,
    placeholder_pins,
)
from k8s.tools.render import OVERLAYS_DIR, object_name, render_overlay  # noqa: E402
from k8s.tools.toolchain import require  # noqa: E402

FIELD_MANAGER = "segserve-deploy"
# Cluster-scoped and referenced kinds first, so later objects find what they need.
APPLY_ORDER = ("Namespace", "ServiceAccount", "ConfigMap", "Secret", "Service", "Deployment")


class DeployError(RuntimeError):
    """A step failed; the message says which and what to look at."""


@dataclass(frozen=True)
class Target:
    """What to deploy and how to reach it."""

    overlay: Path
    image_ref: str | None = None
    model_name: str = DEFAULT_MODEL_NAME
    deployment: str = "segserve"
    service: str = "segserve"
    service_port: int = 8080
    timeout_s: int = 900


def resolve_overlay(name_or_path: str) -> Path:
    """``cpu``/``cpu-ui``/``gpu``/``kserve`` or a path to a kustomization folder.

    >>> resolve_overlay("cpu").name
    'cpu'
    """
    path = Path(name_or_path)
    candidate = path if path.is_dir() else OVERLAYS_DIR / name_or_path
    if not (candidate / "kustomization.yaml").is_file():
        known = sorted(p.name for p in OVERLAYS_DIR.iterdir() if p.is_dir())
        raise DeployError(
            f"--overlay {name_or_path!r}: not an overlay; use one of {known} or a path"
        )
    return candidate


def set_image(objects: list[dict], image_ref: str) -> int:
    """Point every container of the serving image at ``image_ref``; returns how many changed."""
    changed = 0
    for obj in objects:
        pod = obj.get("spec", {}).get("template", {}).get("spec", {})
        for c in pod.get("initContainers", []) + pod.get("containers", []):
            if c["image"].split("@")[0].rsplit(":", 1)[0].endswith("segserve"):
                c["image"] = image_ref
                changed += 1
    return changed


def apply_order(objects: list[dict]) -> list[dict]:
    """Objects sorted for apply: known kinds in APPLY_ORDER, then the rest (CRs last)."""
    rank = {kind: i for i, kind in enumerate(APPLY_ORDER)}
    return sorted(objects, key=lambda o: rank.get(o["kind"], len(APPLY_ORDER)))


def rollout_complete(deployment: dict) -> tuple[bool, str]:
    """(done, why not) from a Deployment's spec/status, as ``kubectl rollout status`` decides.

    >>> rollout_complete({"metadata": {"generation": 2}, "spec": {"replicas": 2},
    ...   "status": {"observedGeneration": 2, "updatedReplicas": 2, "replicas": 2,
    ...              "availableReplicas": 2}})
    (True, 'rolled out')
    """
    spec, status = deployment.get("spec", {}), deployment.get("status") or {}
    want = spec.get("replicas", 1)
    if status.get("observedGeneration", 0) < deployment["metadata"].get("generation", 0):
        return False, "controller has not seen the new spec yet"
    if status.get("updatedReplicas", 0) < want:
        return False, f"{status.get('updatedReplicas', 0)}/{want} pods updated"
    if status.get("replicas", 0) > status.get("updatedReplicas", 0):
        return False, f"{status['replicas'] - status['updatedReplicas']} old pods terminating"
    if status.get("availableReplicas", 0) < want:
        return False, f"{status.get('availableReplicas', 0)}/{want} pods available"
    return True, "rolled out"


def plan(target: Target, objects: list[dict]) -> list[str]:
    """Human-readable steps (what --dry-run prints)."""
    ns = next((o["metadata"].get("namespace") for o in objects if o["kind"] == "Deployment"), None)
    steps = [f"render {target.overlay} ({len(objects)} objects)"]
    if target.image_ref:
        steps.append(f"set serving image to {target.image_ref}")
    steps += [
        f"server-side apply {object_name(o)} (field manager {FIELD_MANAGER})"
        for o in apply_order(objects)
    ]
    if any(o["kind"] == "Deployment" for o in objects):
        steps += [
            f"wait up to {target.timeout_s} s for Deployment/{ns}/{target.deployment} to roll out",
            f"kubectl port-forward -n {ns} svc/{target.service} <local>:{target.service_port}",
            f"POST a PNG to /predictions/{target.model_name} without a token; expect 401",
            f"POST it with a token of Secret {API_TOKENS_SECRET}; expect 200 and a non-empty body",
        ]
    return steps


def smoke_png(size: tuple[int, int] = (64, 64)) -> bytes:
    """A small synthetic RGB PNG (gradient) for the smoke prediction."""
    import numpy as np
    from PIL import Image

    h, w = size
    xx, yy = np.meshgrid(np.linspace(0, 255, w), np.linspace(0, 255, h))
    rgb = np.stack([xx, yy, np.full((h, w), 128.0)], axis=-1)
    buf = io.BytesIO()
    Image.fromarray(rgb.astype("uint8")).save(buf, format="PNG")
    return buf.getvalue()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def apply_objects(objects: list[dict], context: str | None) -> None:
    """Server-side apply with the kubernetes client (live API)."""
    from kubernetes import config, dynamic
    from kubernetes.client import ApiClient

    client = dynamic.DynamicClient(
        ApiClient(config.new_client_from_config(context=context).configuration)
    )
    for obj in apply_order(objects):
        api = client.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
        meta = obj["metadata"]
        api.server_side_apply(
            body=obj,
            name=meta["name"],
            namespace=meta.get("namespace"),
            field_manager=FIELD_MANAGER,
            force_conflicts=True,
        )
        print(f"applied {object_name(obj)}", flush=True)


def wait_rollout(target: Target, namespace: str, context: str | None) -> None:
    """Poll the Deployment until rollout_complete (live API)."""
    from kubernetes import client, config

    apps = client.AppsV1Api(config.new_client_from_config(context=context))
    deadline, why = time.monotonic() + target.timeout_s, ""
    while time.monotonic() < deadline:
        dep = apps.read_namespaced_deployment(target.deployment, namespace).to_dict()
        dep["metadata"]["generation"] = dep["metadata"].get("generation") or 0
        done, why = rollout_complete(_camel(dep))
        if done:
            return
        print(f"waiting: {why}", flush=True)
        time.sleep(5)
    raise DeployError(
        f"Deployment {namespace}/{target.deployment} not rolled out after "
        f"{target.timeout_s} s ({why}); see `kubectl -n {namespace} describe pods`"
    )


def _camel(d: dict) -> dict:
    """kubernetes' to_dict() is snake_case; rollout_complete reads the API's camelCase."""
    status, spec = d.get("status") or {}, d.get("spec") or {}
    return {
        "metadata": {"generation": d["metadata"]["generation"]},
        "spec": {"replicas": spec.get("replicas", 1)},
        "status": {
            "observedGeneration": status.get("observed_generation") or 0,
            "updatedReplicas": status.get("updated_replicas") or 0,
            "replicas": status.get("replicas") or 0,
            "availableReplicas": status.get("available_replicas") or 0,
        },
    }


def first_token(tokens_file_text: str) -> str | None:
    """The first token of the Secret's ``tokens`` (the proxy's format: one per line, ``#``
    comments and blank lines ignored).

    >>> first_token("# rotated 2026-12\\n\\nabc\\ndef\\n")
    'abc'
    """
    lines = (line.strip() for line in tokens_file_text.splitlines())
    return next((line for line in lines if line and not line.startswith("#")), None)


def api_token(namespace: str, context: str | None) -> str:
    """A token of the Secret the auth proxy reads (live API); DeployError saying how to create
    it when it is missing (the pods wait for it)."""
    import base64

    from kubernetes import client, config
    from kubernetes.client.exceptions import ApiException

    core = client.CoreV1Api(config.new_client_from_config(context=context))
    create = (
        f"kubectl -n {namespace} create secret generic {API_TOKENS_SECRET} "
        '--from-literal=tokens="$(openssl rand -hex 32)"'
    )
    try:
        secret = core.read_namespaced_secret(API_TOKENS_SECRET, namespace)
    except ApiException as exc:
        if exc.status == 404:
            raise DeployError(
                f"Secret {namespace}/{API_TOKENS_SECRET} does not exist: the pods wait for it. "
                f"Create it ({create}), then rerun"
            ) from None
        raise
    token = first_token(base64.b64decode((secret.data or {}).get("tokens", "")).decode())
    if token is None:
        raise DeployError(f"Secret {namespace}/{API_TOKENS_SECRET} has no token in key tokens")
    return token


def smoke_test(
    target: Target, namespace: str, context: str | None, image: bytes, token: str
) -> int:
    """Port-forward to the Service, check the proxy refuses a call without the token, POST one
    image with it; returns the response size."""
    import requests

    port = _free_port()
    cmd = [
        str(require("kubectl")),
        "port-forward",
        "-n",
        namespace,
        f"svc/{target.service}",
        f"{port}:{target.service_port}",
    ]
    if context:
        cmd[1:1] = ["--context", context]
    forward = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}/predictions/{target.model_name}"
        for _ in range(30):
            try:
                anonymous = requests.post(url, data=image, timeout=60)
                break
            except requests.ConnectionError:
                time.sleep(1)
        else:
            raise DeployError(f"port-forward to svc/{target.service} never accepted connections")
        if anonymous.status_code != 401:
            raise DeployError(
                f"a call without a token got HTTP {anonymous.status_code}, not 401: the auth "
                "proxy is not in front of TorchServe"
            )
        headers = {"Content-Type": "image/png", "Authorization": f"Bearer {token}"}
        r = requests.post(url, data=image, headers=headers, timeout=60)
        if r.status_code != 200 or not r.content:
            raise DeployError(f"smoke prediction: HTTP {r.status_code}: {r.text[:300]}")
        return len(r.content)
    finally:
        forward.terminate()
        forward.wait(timeout=10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--overlay", default="cpu", help="cpu, cpu-ui, gpu, kserve or a folder")
    parser.add_argument("--image-ref", help="serving image, e.g. registry/segserve:0.1.0")
    parser.add_argument(
        "--token",
        default=os.environ.get("SEGSERVE_TOKEN"),
        help=f"API token for the smoke test (default $SEGSERVE_TOKEN, else the Secret "
        f"{API_TOKENS_SECRET})",
    )
    parser.add_argument("--context", help="kubeconfig context (default: current)")
    parser.add_argument("--image", type=Path, help="image for the smoke prediction")
    parser.add_argument("--timeout", type=int, default=900, help="rollout timeout, seconds")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    args = parser.parse_args(argv)
    try:
        target = Target(resolve_overlay(args.overlay), args.image_ref, timeout_s=args.timeout)
        objects = render_overlay(target.overlay)
        if target.image_ref and not set_image(objects, target.image_ref):
            raise DeployError("--image-ref: no container uses the segserve image in this overlay")
        for i, step in enumerate(plan(target, objects), 1):
            print(f"{i:2d}. {step}")
        # The pods would sit in Init:Error: fetch_model.py refuses the placeholder pin.
        if unpinned := placeholder_pins(objects):
            message = (
                f"{', '.join(unpinned)}: MODEL_SHA256 is still {SHA256_PLACEHOLDER}; pin the "
                "archive's digest in the overlay's segserve-model-source (k8s/README.md step 2)"
            )
            if not args.dry_run:
                raise DeployError(message)
            print(f"warning: {message}")
        if args.dry_run:
            return 0
        apply_objects(objects, args.context)
        deployments = [o for o in objects if o["kind"] == "Deployment"]
        if deployments:
            ns = deployments[0]["metadata"]["namespace"]
            token = args.token or api_token(ns, args.context)  # before the long wait
            wait_rollout(target, ns, args.context)
            image = args.image.read_bytes() if args.image else smoke_png()
            size = smoke_test(target, ns, args.context, image, token)
            print(f"smoke prediction ok ({size:,} bytes)")
    except DeployError as exc:
        print(f"deploy: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

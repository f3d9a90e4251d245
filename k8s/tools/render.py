"""Render a kustomize overlay into a list of Kubernetes objects.

``kubectl kustomize`` with its default settings, exactly what ``kubectl apply -k`` runs (the
base's copies of config.properties and handler/metrics.yaml: ``k8s/tools/sync.py``).

Example:
    >>> objs = render_overlay(REPO / "k8s/overlays/cpu")  # doctest: +SKIP
    >>> sorted({o["kind"] for o in objs})[:2]  # doctest: +SKIP
    ['ConfigMap', 'Deployment']
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from k8s.tools.toolchain import REPO, require

OVERLAYS_DIR = REPO / "k8s" / "overlays"


class RenderError(RuntimeError):
    """kustomize could not build the overlay; the message carries its error."""


def overlays(root: Path = OVERLAYS_DIR) -> list[Path]:
    """Every overlay folder (one with a kustomization.yaml) under ``root``."""
    return sorted(p.parent for p in root.glob("*/kustomization.yaml"))


def render_text(overlay: Path, kubectl: Path | None = None) -> str:
    """The YAML stream ``kubectl kustomize`` prints for ``overlay``."""
    cmd = [
        str(kubectl or require("kubectl")),
        "kustomize",
        str(overlay),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RenderError(f"kustomize build {overlay} failed:\n{done.stderr.strip()}")
    return done.stdout


def render_overlay(overlay: Path, kubectl: Path | None = None) -> list[dict]:
    """The objects of ``overlay``, in kustomize's order."""
    return [doc for doc in yaml.safe_load_all(render_text(overlay, kubectl)) if doc]


def object_name(obj: dict) -> str:
    """``Kind/namespace/name`` for messages.

    >>> object_name({"kind": "Service", "metadata": {"name": "s", "namespace": "n"}})
    'Service/n/s'
    """
    meta = obj.get("metadata") or {}
    ns = f"{meta['namespace']}/" if meta.get("namespace") else ""
    return f"{obj.get('kind', '?')}/{ns}{meta.get('name', '?')}"


def find(objects: list[dict], kind: str, name: str | None = None) -> dict:
    """The one object of ``kind`` (and ``name``); KeyError naming what is missing."""
    for obj in objects:
        if obj.get("kind") == kind and (name is None or obj["metadata"]["name"] == name):
            return obj
    raise KeyError(f"no {kind}{'/' + name if name else ''} in the rendered overlay")

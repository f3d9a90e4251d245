"""Validate rendered objects strictly: built-in kinds with kubernetes-validate, CRDs with the
vendored schemas in ``k8s/tools/schemas/`` (made by ``crd_schema.py``).

Strict means an unknown or misspelt field is an error, and a kind with no schema is an error
too (kubernetes-validate's CLI only warns about a missing schema; its Python API raises).

Example:
    >>> validate_object({"apiVersion": "v1", "kind": "ServiceAccount",
    ...                  "metadata": {"name": "x"}}, "1.35.0")
    []
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import jsonschema
import kubernetes_validate

from k8s.tools.render import object_name

SCHEMAS_DIR = Path(__file__).resolve().parent / "schemas"
DEFAULT_K8S_VERSION = "1.35.0"


@cache
def crd_schema(api_version: str, kind: str) -> dict | None:
    """Vendored schema for a custom resource, or None when it is not a vendored CRD."""
    group, _, version = api_version.rpartition("/")
    path = SCHEMAS_DIR / f"{group}_{version}_{kind.lower()}.json"
    return json.loads(path.read_text()) if group and path.is_file() else None


def _format(error: jsonschema.ValidationError) -> str:
    where = ".".join(str(p) for p in error.absolute_path) or "(root)"
    return f"{where}: {error.message}"


def validate_object(obj: dict, k8s_version: str = DEFAULT_K8S_VERSION) -> list[str]:
    """Problems with ``obj`` (empty when valid), each prefixed with the object's name."""
    name = object_name(obj)
    schema = crd_schema(obj.get("apiVersion", ""), obj.get("kind", ""))
    if schema is not None:
        validator = jsonschema.Draft7Validator(schema)
        errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
        return [f"{name}: {_format(e)}" for e in errors]
    try:
        kubernetes_validate.validate(obj, k8s_version, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return [
            f"{name}: no schema for {obj.get('apiVersion')} {obj.get('kind')} in Kubernetes "
            f"{k8s_version} (misspelt apiVersion/kind, or a CRD without a vendored schema)"
        ]
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(p) for p in exc.path) or "(root)"
        return [f"{name}: {where}: {exc.message}"]
    return []

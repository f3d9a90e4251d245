"""Turn a CustomResourceDefinition into the strict JSON schema ``validate.py`` checks objects with.

The schemas under ``k8s/tools/schemas/`` were made with this from the upstream CRDs (sources in
``schemas/SOURCES.md``): descriptions dropped, ``additionalProperties: false`` added wherever a
CRD lists ``properties`` without ``additionalProperties`` (a misspelt field fails, as
kubernetes-validate's strict mode does for built-in kinds), and subtrees larger than
``--max-subtree-chars`` outside ``--keep`` paths replaced by their bare type (KServe's
InferenceService embeds whole PodSpecs: 2 MB of schema for fields we never set).

Example:
    python k8s/tools/crd_schema.py monitoring.coreos.com_servicemonitors.yaml \\
        -o k8s/tools/schemas/monitoring.coreos.com_v1_servicemonitor.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml


def strict_schema(node: Any) -> Any:
    """Drop descriptions; close every object that lists its properties.

    >>> strict_schema({"description": "x", "properties": {"a": {"type": "string"}}})
    {'properties': {'a': {'type': 'string'}}, 'additionalProperties': False}
    """
    if isinstance(node, list):
        return [strict_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {k: strict_schema(v) for k, v in node.items() if k != "description"}
    if "properties" in out and "additionalProperties" not in out:
        if not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    return out


def prune(node: Any, max_chars: int, keep: tuple[str, ...], path: str = "") -> Any:
    """Replace big subtrees (outside ``keep`` dotted paths) by their bare ``type``.

    >>> prune({"properties": {"big": {"type": "object", "properties": {"x": {}}}}}, 10, ())
    {'properties': {'big': {'type': 'object'}}}
    """
    if not isinstance(node, dict) or "properties" not in node:
        return node
    props = {}
    for name, sub in node["properties"].items():
        sub_path = f"{path}.{name}" if path else name
        kept = any(k == sub_path or k.startswith(sub_path + ".") for k in keep)
        inside_kept = any(sub_path.startswith(k + ".") or sub_path == k for k in keep)
        if inside_kept or kept or len(json.dumps(sub)) <= max_chars:
            props[name] = sub if inside_kept else prune(sub, max_chars, keep, sub_path)
        else:
            props[name] = {
                k: v for k, v in sub.items() if k in ("type", "x-kubernetes-int-or-string")
            }
    return {**node, "properties": props}


def crd_to_schema(crd: dict, version: str, max_chars: int, keep: tuple[str, ...]) -> dict:
    """The strict (and pruned) openAPIV3Schema of ``version`` in ``crd``."""
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            schema = strict_schema(v["schema"]["openAPIV3Schema"])
            schema = prune(schema, max_chars, keep)
            # Objects carry apiVersion/kind/metadata/status; metadata is checked by the server.
            schema["properties"]["metadata"] = {"type": "object"}
            return schema
    names = [v["name"] for v in crd["spec"]["versions"]]
    raise SystemExit(f"{crd['metadata']['name']}: no version {version!r}; it has {names}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("crd", type=Path)
    parser.add_argument("-o", "--out", type=Path, required=True)
    parser.add_argument("--version", default=None, help="CRD version (default: the storage one)")
    parser.add_argument("--max-subtree-chars", type=int, default=1_000_000)
    parser.add_argument("--keep", action="append", default=[], help="dotted path kept in full")
    args = parser.parse_args(argv)
    crd = yaml.safe_load(args.crd.read_text())
    version = args.version or next(v["name"] for v in crd["spec"]["versions"] if v.get("storage"))
    schema = crd_to_schema(crd, version, args.max_subtree_chars, tuple(args.keep))
    args.out.write_text(json.dumps(schema, separators=(",", ":"), sort_keys=True) + "\n")
    print(f"wrote {args.out} ({args.out.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

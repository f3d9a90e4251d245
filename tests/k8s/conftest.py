"""Fixtures for the Kubernetes tests: tool checks and a writable copy of the manifests.

The image tests run last; their images build in the background meanwhile
(``tests/k8s/background_build.py``).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from k8s.tools.sync import sync
from k8s.tools.toolchain import ToolError, require
from tests.k8s import background_build

REPO = Path(__file__).resolve().parents[2]
# The fixtures that need an image (tests/k8s/test_image.py, test_ui_image.py) and its target.
IMAGE_FIXTURES = {"serving_image": "serve", "ui_image": "ui"}


@pytest.hookimpl(trylast=True)  # after -m/-k have deselected
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    needing = [item for item in items if IMAGE_FIXTURES.keys() & set(item.fixturenames)]
    if not needing:
        return
    items[:] = [item for item in items if item not in needing] + needing
    if not config.option.collectonly:
        background_build.plan(
            [t for f, t in IMAGE_FIXTURES.items() if any(f in i.fixturenames for i in needing)]
        )


def pytest_unconfigure(config: pytest.Config) -> None:
    background_build.stop()


# `make test` fetches both tools first (make k8s-tools): a missing tool is a failure, never a
# skip, or the manifests would go untested without anyone noticing.
@pytest.fixture(scope="session")
def kubectl() -> Path:
    try:
        return require("kubectl")
    except ToolError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="session")
def promtool() -> Path:
    try:
        return require("promtool")
    except ToolError as exc:
        pytest.fail(str(exc))


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    """What validate.py reads, copied so a test can break it. enable_envvars_config=true is
    ensured so each test sees only the breakage it makes."""
    dst = tmp_path / "repo"
    shutil.copytree(REPO / "k8s", dst / "k8s", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "tests/k8s/promtool", dst / "tests/k8s/promtool")
    (dst / "handler").mkdir()
    shutil.copy2(REPO / "handler/metrics.yaml", dst / "handler/metrics.yaml")
    (dst / "loadtest").mkdir()  # what k8s/loadtest's Jobs run (k8s/tools/loadgen.py reads them)
    for name in ("locustfile.py", "run.py"):
        shutil.copy2(REPO / "loadtest" / name, dst / "loadtest" / name)
    text = (REPO / "config.properties").read_text()
    if "enable_envvars_config=true" not in text:
        text += "\nenable_envvars_config=true\n"
    (dst / "config.properties").write_text(text)
    sync(dst)  # the base's copies follow the sources, as `make k8s-sync` keeps them
    return dst


def self_signed_cert(folder: Path) -> tuple[Path, Path]:
    """A throwaway certificate for 127.0.0.1 (openssl CLI): (cert.pem, key.pem)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("the HTTPS tests need the openssl CLI to make a throwaway certificate")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
        + ["-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1"]
        + ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )
    return cert, key


def edit(path: Path, old: str, new: str) -> None:
    """Replace exactly one occurrence (so a test cannot silently break nothing)."""
    text = path.read_text()
    assert text.count(old) == 1, f"{old!r} occurs {text.count(old)} times in {path}"
    path.write_text(text.replace(old, new))

"""Fixtures for the Kubernetes tests: tool checks and a writable copy of the manifests."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from k8s.tools.toolchain import ToolError, require

REPO = Path(__file__).resolve().parents[2]


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
    return dst


def edit(path: Path, old: str, new: str) -> None:
    """Replace exactly one occurrence (so a test cannot silently break nothing)."""
    text = path.read_text()
    assert text.count(old) == 1, f"{old!r} occurs {text.count(old)} times in {path}"
    path.write_text(text.replace(old, new))

"""pyproject.toml's extras match what the code imports; the serving image installs only `serve`.

Each stage's code (and the local modules it imports, lazily or not) may import only what
`dependencies` + that stage's extra declare; every declared distribution has a user; the serving
image (k8s/Dockerfile) installs `dependencies` + `serve` and nothing else; `make install` installs
every extra. Fast and offline: it reads files and the installed distributions' metadata.
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import subprocess
import sys
from collections import defaultdict
from functools import cache
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]
PROJECT = "segserve"

# stage (an extra) -> the code that runs in it, repository-relative
STAGES = {
    # what the image runs (TorchServe's worker + handler/, k8s/base/scripts/ in the init container
    # and preStop hook) and the local serve stage (serving/: archive, start/stop; client/)
    "serve": ("handler", "serving", "client", "k8s/base/scripts"),
    "train": ("training",),
    "loadtest": ("loadtest",),
    "k8s": ("k8s/tools",),
    "bench": ("benchmarks",),
    "ui": ("ui",),
    # `make test`: the suite and everything it exercises
    "dev": (
        "tests",
        "handler",
        "serving",
        "client",
        "k8s",
        "training",
        "loadtest",
        "benchmarks",
        "ui",
    ),
}
SKIP_DIRS = {".venv", "venv", "__pycache__", "node_modules", "runs", "tmp", "logs", "build", "dist"}
GENERATED = ("client/_grpc",)  # protoc output (git-ignored)

# Imported, but deliberately not declared: the import is guarded and the feature documented.
OPTIONAL_IMPORTS = {
    "boto3": "k8s/base/scripts/fetch_model.py, s3:// MODEL_URLs only (k8s/README.md: add it to "
    "the image)",
}
# Every venv has it (k8s/tools/toolchain.py runs `python -m pip download`).
VENV_PROVIDED = {"pip"}
# Declared, but no code imports them: why each is there.
NOT_IMPORTED = {
    "torchvision": "smp requires it unpinned; pinned to match the torch pin",
    "onnx": "torch.onnx.export (training/export.py --onnx) needs it",
    "sqlalchemy": "mlflow-skinny's SQLite tracking store (training/tracking.py) needs it",
    "alembic": "mlflow-skinny's SQLite tracking store creates its tables with it",
    "pytest-timeout": "pytest plugin",
    "ruff": "make lint",
}


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


_REQ = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?\s*([^;]*)")


def _parse(req: str) -> tuple[str, tuple[str, ...], str]:
    """``"segserve[a, b]"`` -> ``("segserve", ("a", "b"), "")``; name canonical, spec unspaced."""
    m = _REQ.match(req)
    assert m, f"unparseable requirement {req!r} in pyproject.toml"
    extras = tuple(e.strip() for e in (m.group(2) or "").split(",") if e.strip())
    return _canon(m.group(1)), extras, m.group(3).replace(" ", "")


@cache
def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def _extras() -> dict[str, list[str]]:
    return _pyproject().get("optional-dependencies", {})


def _expand(reqs: list[str], seen: tuple[str, ...] = ()) -> list[str]:
    """Requirement strings, self-references (``segserve[x]``) replaced by extra x's list."""
    out = []
    for req in reqs:
        name, extras, _ = _parse(req)
        if name != _canon(PROJECT):
            out.append(req)
            continue
        for extra in extras:
            assert extra in _extras(), f"{req!r} names no extra of pyproject.toml"
            assert extra not in seen, f"extras include each other in a cycle: {seen + (extra,)}"
            out += _expand(_extras()[extra], seen + (extra,))
    return out


def install_set(extra: str | None) -> dict[str, str]:
    """What ``pip install .[extra]`` asks for directly: canonical name -> specifier."""
    reqs = list(_pyproject().get("dependencies", []))
    if extra is not None:
        reqs += _extras()[extra]
    return {_parse(r)[0]: _parse(r)[2] for r in _expand(reqs)}


# --- what the code imports -----------------------------------------------------------------------


def _python_files() -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(REPO):
        rel = Path(dirpath).relative_to(REPO).as_posix()
        dirnames[:] = [
            d
            for d in dirnames
            if not d.startswith(".")
            and not d.endswith(".egg-info")
            and not (rel == "." and d in SKIP_DIRS)
            and d not in ("__pycache__", ".venv")
            and f"{rel}/{d}".removeprefix("./") not in GENERATED
        ]
        files += [Path(dirpath, f) for f in filenames if f.endswith(".py")]
    return sorted(files)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


_DASH_M = re.compile(r"""["']-m["']\s*,\s*["']([A-Za-z_][\w.]*)["']""")


class Code:
    """The repository's Python files: local module graph + third-party top-level imports."""

    def __init__(self) -> None:
        self.files = {_module_name(p): p for p in _python_files()}
        stems = defaultdict(list)  # bare imports, as TorchServe's worker does for the .mar handler
        for module in self.files:
            stems[module.rsplit(".", 1)[-1]].append(module)
        tops = {m.split(".")[0] for m in self.files} | {
            p.name for p in REPO.iterdir() if p.is_dir() and not p.name.startswith(".")
        }
        self.local_edges: dict[str, set[str]] = {}
        self.third_party: dict[str, set[str]] = {}  # module -> top-level names it imports
        for module, path in self.files.items():
            edges, third = set(), set()
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for name in self._imported(tree, path.read_text(encoding="utf-8")):
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top == "__future__":
                    continue
                if top in tops:
                    parts = name.split(".")
                    edges |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
                elif top in stems:
                    edges |= set(stems[top])
                else:
                    third.add(top)
            self.local_edges[module] = {e for e in edges if e in self.files}
            self.third_party[module] = third

    @staticmethod
    def _imported(tree: ast.AST, source: str) -> set[str]:
        names = set(_DASH_M.findall(source))  # python -m X in a subprocess
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module)
                names |= {f"{node.module}.{a.name}" for a in node.names}
        return names

    def closure(self, roots: tuple[str, ...]) -> set[str]:
        todo = [
            m
            for m, p in self.files.items()
            if any(p.relative_to(REPO).as_posix().startswith(f"{r}/") for r in roots)
        ]
        seen = set()
        while todo:
            module = todo.pop()
            if module not in seen:
                seen.add(module)
                todo += self.local_edges[module]
        return seen

    def imports_of(self, roots: tuple[str, ...]) -> dict[str, set[str]]:
        """Third-party top-level name -> the files (of roots' closure) that import it."""
        out = defaultdict(set)
        for module in self.closure(roots):
            for top in self.third_party[module]:
                out[top].add(self.files[module].relative_to(REPO).as_posix())
        return out


@cache
def code() -> Code:
    return Code()


@cache
def providers() -> dict[str, frozenset[str]]:
    """Top-level module -> canonical names of the installed distributions that provide it."""
    return {
        top: frozenset(_canon(d) for d in dists)
        for top, dists in importlib.metadata.packages_distributions().items()
    }


def _unprovided(extra: str) -> list[str]:
    declared = install_set(extra)
    problems = []
    for top, users in sorted(code().imports_of(STAGES[extra]).items()):
        if top in OPTIONAL_IMPORTS or top in VENV_PROVIDED:
            continue
        dists = providers().get(top)
        where = ", ".join(sorted(users)[:3]) + (" ..." if len(users) > 3 else "")
        if not dists:
            problems.append(f"{top} (imported by {where}): no installed distribution provides it")
        elif not dists & declared.keys():
            problems.append(f"{top} (imported by {where}): declare {' or '.join(sorted(dists))}")
    return problems


# --- tests ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra", sorted(STAGES))
def test_each_stage_imports_only_what_its_extra_declares(extra: str) -> None:
    problems = _unprovided(extra)
    assert not problems, (
        f"pip install '.[{extra}]' misses what the {extra} code imports (pyproject.toml "
        f"`dependencies` + optional-dependencies.{extra}):\n  " + "\n  ".join(problems)
    )


def test_serve_holds_only_what_the_serving_code_uses() -> None:
    """Nothing of train/loadtest/k8s/bench/test rides into the image: each of core + serve has
    a user in handler/, serving/, client/ or k8s/base/scripts/."""
    used = set()
    for top in code().imports_of(STAGES["serve"]):
        used |= providers().get(top, frozenset())
    serve = install_set("serve")
    unused = sorted(set(serve) - used)
    assert not unused, (
        f"dependencies + serve (the serving image) hold {unused}, which no serving code imports: "
        "move them to the extra that uses them"
    )
    others = {"train", "loadtest", "k8s", "bench", "test"}
    for req in _extras()["serve"]:
        name, extras, _ = _parse(req)
        assert name != _canon(PROJECT), f"serve must not pull other extras in ({req!r})"
    for extra in sorted(others):
        leaked = sorted((set(install_set(extra)) - used) & set(serve))
        assert not leaked, f"{leaked} of the {extra} extra would install into the serving image"


def test_every_declared_distribution_has_a_user() -> None:
    imported = set()
    for top in code().imports_of(STAGES["dev"]):
        imported |= providers().get(top, frozenset())
    declared = set(install_set("dev"))
    unused = sorted(declared - imported - set(NOT_IMPORTED))
    assert not unused, f"declared in pyproject.toml, imported nowhere: {unused}"
    stale = sorted(set(NOT_IMPORTED) - declared)
    assert not stale, f"NOT_IMPORTED lists undeclared {stale}"
    stale = sorted(set(OPTIONAL_IMPORTS) - set(code().imports_of(STAGES["dev"])))
    assert not stale, f"OPTIONAL_IMPORTS lists {stale}, which nothing imports any more"


def test_one_specifier_per_distribution() -> None:
    """A distribution in several lists has the same pin in each (pins live in one place)."""
    specs = defaultdict(set)
    lists = {"dependencies": _pyproject().get("dependencies", []), **_extras()}
    for reqs in lists.values():
        for req in reqs:
            name, _, spec = _parse(req)
            if name != _canon(PROJECT):
                specs[name].add(spec)
    conflicting = {n: sorted(s) for n, s in specs.items() if len(s) > 1}
    assert not conflicting, f"different specifiers for one distribution: {conflicting}"


def test_dev_is_every_extra_and_make_install_installs_it() -> None:
    everything = set()
    for extra in _extras():
        everything |= set(install_set(extra))
    missing = sorted(everything - set(install_set("dev")))
    assert not missing, f"the dev extra (make install) misses {missing}"
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    installs = re.findall(r"pip install\b[^\n]*?-e\s+['\"]?\.\[([^\]]+)\]", makefile)
    assert installs, "the Makefile installs the project nowhere (pip install -e '.[...]')"
    for extras in installs:
        reqs = [f"{PROJECT}[{extras}]"]
        assert set(install_set(None)) | {_parse(r)[0] for r in _expand(reqs)} == everything, (
            f"make install installs .[{extras}], not every extra: make test would miss some"
        )


# --- the serving image ---------------------------------------------------------------------------

DOCKERFILE = REPO / "k8s" / "Dockerfile"
# k8s/tools/requirements.py as the Dockerfile runs it: `... pyproject.toml --extra X [--only D |
# --without D ...]`
_REQUIREMENTS_RUN = re.compile(
    r"python3? (?:\S*/)?requirements\.py pyproject\.toml --extra (\S+)"
    r"((?:\s+\\?\s*--(?:only|without) \S+)*)"
)


def _requirements_module():
    spec = importlib.util.spec_from_file_location(
        "requirements", REPO / "k8s/tools/requirements.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _dockerfile_runs() -> list[tuple[str, str]]:
    """``(extra, "--only D --without E ...")`` per requirements.py run in the Dockerfile, the
    flags sorted (their order does not matter)."""
    runs = _REQUIREMENTS_RUN.findall(DOCKERFILE.read_text(encoding="utf-8"))
    return sorted((extra, _flags(flags.replace("\\", " "))) for extra, flags in runs)


def _flags(text: str) -> str:
    words = text.split()
    return " ".join(
        sorted(f"{flag} {dist}" for flag, dist in zip(words[::2], words[1::2], strict=True))
    )


def test_dockerfile_installs_exactly_core_plus_serve() -> None:
    runs = [run for run in _dockerfile_runs() if run[0] == "serve"]
    assert runs == [("serve", ""), ("serve", "--only torch")], runs
    requirements = _requirements_module()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = requirements.stage_requirements(project, "serve")
    got = {_parse(r)[0]: _parse(r)[2] for r in reqs}
    assert got == install_set("serve"), "the image's list differs from dependencies + serve"
    torch = requirements.select(reqs, only="torch")
    assert torch == [f"torch{install_set(None)['torch']}"], torch


# What the web page's image (--target ui) leaves out of core + ui, and why.
UI_IMAGE_LEAVES_OUT = {
    "torch": "the page imports no torch (handler.imaging/errors are numpy + pillow)",
    "selenium": "drives a browser for make ui-shot and the tests, not for the page",
}
# Installed to compile the gRPC stubs in the build stage, then uninstalled.
UI_IMAGE_STUB_TOOLS = ("grpcio-tools", "torchserve")


def test_ui_image_installs_core_plus_ui_without_torch() -> None:
    runs = [run for run in _dockerfile_runs() if run[0] == "ui"]
    without = _flags(
        " ".join(f"--without {d}" for d in [*UI_IMAGE_LEAVES_OUT, *UI_IMAGE_STUB_TOOLS])
    )
    only = [("ui", f"--only {d}") for d in UI_IMAGE_STUB_TOOLS]
    assert sorted(runs) == sorted([("ui", without), *only]), runs
    requirements = _requirements_module()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = requirements.stage_requirements(project, "ui")
    kept = {_parse(r)[0] for r in requirements.select(reqs, without=[*UI_IMAGE_LEAVES_OUT])}
    assert kept == set(install_set("ui")) - set(UI_IMAGE_LEAVES_OUT)
    assert "torch" in install_set(None) and "torch" not in kept


def test_requirements_cli_prints_what_the_image_installs(tmp_path: Path) -> None:
    script = REPO / "k8s/tools/requirements.py"
    done = subprocess.run(
        [sys.executable, str(script), str(REPO / "pyproject.toml"), "--extra", "serve"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert {_parse(r)[0] for r in done.stdout.split()} == set(install_set("serve"))
    bad = subprocess.run(
        [sys.executable, str(script), str(REPO / "pyproject.toml"), "--extra", "nope"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "no extra 'nope'" in bad.stderr, bad.stderr


def test_dockerfile_installs_nothing_else() -> None:
    outside = DOCKERFILE.read_text(encoding="utf-8")
    assert re.search(r"^COPY\b[^\n]*\bpyproject\.toml\b", outside, re.M), "COPY pyproject.toml"
    ignore = (REPO / "k8s" / "Dockerfile.dockerignore").read_text(encoding="utf-8").split()
    assert "!pyproject.toml" in ignore, "k8s/Dockerfile.dockerignore keeps pyproject.toml out"
    outside = re.sub(r"^\s*#[^\n]*\n", "", outside, flags=re.M)  # comments
    joined = re.sub(r"\\\n", " ", outside)
    commands = re.findall(r"pip install ([^&;\n]*)", joined)
    assert commands, "k8s/Dockerfile installs nothing with pip"
    for args in commands:
        # an index, not a package: `${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}`
        tokens = re.sub(r'\$\{\w+:\+--index-url "\$\w+"\}', "", args).split()
        left = []
        while tokens:
            token = tokens.pop(0)
            if token in ("-r", "--requirement", "-c", "--constraint", "--index-url", "-i"):
                tokens.pop(0)
            elif not token.startswith("-"):
                left.append(token)
        assert not left, (
            f"k8s/Dockerfile: `pip install {args.strip()}` names {left}; install from the "
            "requirements its script reads from pyproject.toml (dependencies + serve) only"
        )

"""The copies kustomize needs inside ``k8s/``, refreshed from their sources (``make k8s-sync``).

kustomize loads a generator's files only from inside the kustomization's folder, so
``kubectl apply -k`` cannot read the repository's ``config.properties`` and
``handler/metrics.yaml``. The base holds byte-equal copies in ``k8s/base/config/``; the sources
stay the only place to edit. ``make k8s-validate`` (and the tests) fail when a copy drifts.

Example:
    >>> drift(REPO)
    []
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `k8s.tools` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from k8s.tools.toolchain import REPO  # noqa: E402

# copy inside k8s/ -> its source, repository-relative
COPIES = {
    "k8s/base/config/config.properties": "config.properties",
    "k8s/base/config/metrics.yaml": "handler/metrics.yaml",
}


def drift(repo: Path = REPO) -> list[str]:
    """One line per copy that is missing or differs from its source."""
    problems = []
    for copy, source in COPIES.items():
        have = repo / copy
        if not have.is_file() or have.read_bytes() != (repo / source).read_bytes():
            problems.append(
                f"{copy}: {'missing' if not have.is_file() else 'differs from'} {source}, its "
                "source (kustomize reads the copy): run `make k8s-sync` and commit both"
            )
    return problems


def sync(repo: Path = REPO) -> list[str]:
    """Copy every source over its copy where they differ; the copies that changed."""
    changed = []
    for copy, source in COPIES.items():
        have, want = repo / copy, (repo / source).read_bytes()
        if not have.is_file() or have.read_bytes() != want:
            have.parent.mkdir(parents=True, exist_ok=True)
            have.write_bytes(want)
            changed.append(copy)
    return changed


def main() -> int:
    for copy in sync():
        print(f"k8s-sync: {copy} refreshed from {COPIES[copy]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

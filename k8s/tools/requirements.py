"""The pip requirements of one stage, read from pyproject.toml (where the pins live, only there).

The images install with it: ``python3 requirements.py pyproject.toml --extra serve`` prints the
core ``dependencies`` plus the ``serve`` extra, self-references such as ``segserve[serve]``
expanded, one per line. ``--only torch`` prints only the torch pin (an image may take torch
from another index first), ``--without torch`` everything else; both repeat (the web demo's
image: ``--extra ui --without torch --without selenium``). Standard library only: it runs in a
bare ``python3`` before anything is installed.

Example:
    >>> project = {"dependencies": ["torch==2.15.0", "numpy>=1.26"],
    ...            "optional-dependencies": {"serve": ["grpcio==1.85.1"],
    ...                                      "loadtest": ["segserve[serve]", "locust==2.47.0"]}}
    >>> stage_requirements(project, "loadtest")
    ['torch==2.15.0', 'numpy>=1.26', 'grpcio==1.85.1', 'locust==2.47.0']
    >>> select(stage_requirements(project, "serve"), only="torch")
    ['torch==2.15.0']
    >>> select(stage_requirements(project, "loadtest"), without=["torch", "Locust"])
    ['numpy>=1.26', 'grpcio==1.85.1']
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import tomllib

_SELF_REFERENCE = re.compile(r"(?P<name>[A-Za-z0-9_.-]+)\[(?P<extras>[^\]]+)\]")
_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def _expand(project: dict[str, Any], reqs: Iterable[str]) -> Iterator[str]:
    extras = project["optional-dependencies"]
    for req in reqs:
        ref = _SELF_REFERENCE.fullmatch(req.replace(" ", ""))
        if ref and ref["name"] == project.get("name", ref["name"]):
            for extra in ref["extras"].split(","):
                yield from _expand(project, extras[extra])
        else:
            yield req


def stage_requirements(project: dict[str, Any], extra: str | None) -> list[str]:
    """``dependencies`` + the ``extra``'s list (None: the core alone), in order, each once."""
    extras = project["optional-dependencies"]
    if extra is not None and extra not in extras:
        raise KeyError(f"pyproject.toml has no extra {extra!r}; it has {sorted(extras)}")
    reqs = project["dependencies"] + (extras[extra] if extra else [])
    return list(dict.fromkeys(_expand(project, reqs)))


def distribution(req: str) -> str:
    """The distribution a requirement names, normalised (PEP 503).

    >>> distribution("Torch_Model.Archiver==0.12.0")
    'torch-model-archiver'
    """
    match = _NAME.match(req.strip())
    if match is None:
        raise ValueError(f"not a requirement: {req!r}")
    return re.sub(r"[-_.]+", "-", match.group()).lower()


def _names(dists: str | Sequence[str] | None) -> set[str] | None:
    if dists is None:
        return None
    return {distribution(d) for d in ([dists] if isinstance(dists, str) else dists)}


def select(
    reqs: list[str],
    only: str | Sequence[str] | None = None,
    without: str | Sequence[str] | None = None,
) -> list[str]:
    """The requirements naming ``only`` (one distribution or several), or all but ``without``
    (idem); both: those of ``only`` not in ``without``."""
    keep, drop = _names(only), _names(without) or set()
    return [
        r for r in reqs if (keep is None or distribution(r) in keep) and distribution(r) not in drop
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pyproject", type=Path)
    parser.add_argument("--extra", help="the stage's extra (default: the core alone)")
    parser.add_argument(
        "--only",
        metavar="DIST",
        action="append",
        help="print only this distribution's pin (repeat)",
    )
    parser.add_argument(
        "--without", metavar="DIST", action="append", help="leave this distribution out (repeat)"
    )
    args = parser.parse_args(argv)
    project = tomllib.loads(args.pyproject.read_text(encoding="utf-8"))["project"]
    try:
        reqs = select(stage_requirements(project, args.extra), args.only, args.without)
    except KeyError as exc:
        parser.error(f"{args.pyproject}: {exc.args[0]}")
    if not reqs:
        parser.error(f"{args.pyproject}: no requirement left (--only {args.only})")
    sys.stdout.write("".join(r + "\n" for r in reqs))
    return 0


if __name__ == "__main__":
    sys.exit(main())

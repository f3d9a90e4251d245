"""Read a Java ``.properties`` file the way TorchServe does (last duplicate key wins).

Example:
    >>> parse_properties("# c\\na=1\\n b = x y \\na=2\\n")
    {'a': '2', 'b': 'x y'}
"""

from __future__ import annotations

from pathlib import Path


def parse_properties(text: str) -> dict[str, str]:
    """``key=value`` / ``key:value`` lines; ``#``/``!`` comments; no line continuations."""
    props: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#!":
            continue
        cut = min((i for i in (line.find("="), line.find(":")) if i >= 0), default=-1)
        if cut < 0:
            props[line] = ""
            continue
        props[line[:cut].strip()] = line[cut + 1 :].strip()
    return props


def load_properties(path: Path) -> dict[str, str]:
    """Parsed ``path``; FileNotFoundError names the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: TorchServe config not found")
    return parse_properties(path.read_text(encoding="utf-8"))


def port_of(address: str) -> int:
    """Port of a TorchServe address such as ``http://0.0.0.0:8080``.

    >>> port_of("https://127.0.0.1:8443")
    8443
    """
    return int(address.rstrip("/").rsplit(":", 1)[1])

"""The one reader of TorchServe's ``config.properties``: server control, k8s tools and tests.

Read the way TorchServe (``java.util.Properties``) reads it: ``key=value`` or ``key:value``,
the first separator wins, ``#``/``!`` comment lines, the last duplicate key wins, no line
continuations (the project's files use none). The one writer is
``serving.server.write_properties``.

Example:
    >>> parse_properties("# c\\na=1\\n b = x y \\na=2\\nurl=http://h:80\\n")
    {'a': '2', 'b': 'x y', 'url': 'http://h:80'}
"""

from __future__ import annotations

from pathlib import Path

# The project's defaults (README "Default names and ports"): TorchServe's own ports, and the
# name a model is served under unless a recipe or a flag says otherwise.
DEFAULT_MODEL_NAME = "segmenter"
INFERENCE_PORT = 8080
MANAGEMENT_PORT = 8081
METRICS_PORT = 8082
GRPC_INFERENCE_PORT = 7070
GRPC_MANAGEMENT_PORT = 7071


def parse_properties(text: str) -> dict[str, str]:
    """``key=value`` / ``key:value`` lines; ``#``/``!`` comments; a bare key maps to ``""``."""
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


def read_properties(path: str | Path) -> dict[str, str]:
    """Parsed ``path``; FileNotFoundError names the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: TorchServe config not found")
    return parse_properties(path.read_text(encoding="utf-8"))


def port_of(address: str) -> int:
    """Port of a TorchServe address such as ``http://0.0.0.0:8080``.

    >>> port_of("https://127.0.0.1:8443")
    8443
    """
    return int(address.rstrip("/").rsplit(":", 1)[1])

"""Find the TorchServe API token: explicit value or key file, then environment, then default.

TorchServe 0.12 enforces token authorisation by default and writes ``key_file.json`` in the
directory it was started from::

    {"management": {"key": "...", "expiration time": "..."},
     "inference":  {"key": "...", "expiration time": "..."},
     "API":        {"key": "..."}}

Example:
    >>> import json, pathlib, tempfile
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "key_file.json"
    >>> _ = path.write_text(json.dumps({"inference": {"key": "abc"}, "management": {"key": "m"}}))
    >>> resolve_token("inference", key_file=path, environ={})
    'abc'
    >>> resolve_token("management", environ={"SEGSERVE_MANAGEMENT_TOKEN": "env"})
    'env'
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from client.errors import ConfigurationError

TOKEN_KINDS = ("inference", "management")
ENV_VARS = {"inference": "SEGSERVE_TOKEN", "management": "SEGSERVE_MANAGEMENT_TOKEN"}
DEFAULT_KEY_FILE = Path("key_file.json")


def read_key_file(path: Path, kind: str) -> str:
    """The ``kind`` key from a TorchServe key file, or a ConfigurationError naming the file."""
    if kind not in TOKEN_KINDS:
        raise ConfigurationError(f"token kind {kind!r} is not one of {list(TOKEN_KINDS)}")
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigurationError(
            f"key file {path} does not exist: TorchServe writes key_file.json in the directory "
            "it was started from (see `make serve`)"
        ) from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigurationError(f"key file {path} is not readable JSON: {exc}") from None
    return key_from_key_file(data, path, kind)


def key_from_key_file(data: object, path: Path, kind: str) -> str:
    """The ``kind`` key of a key file's parsed JSON ``data`` (read from ``path``).

    >>> key_from_key_file({"inference": {"key": "k1"}}, Path("key_file.json"), "inference")
    'k1'
    """
    entry = data.get(kind) if isinstance(data, dict) else None
    key = entry.get("key") if isinstance(entry, dict) else None
    if not isinstance(key, str) or not key:
        raise ConfigurationError(
            f"key file {path} has no '{kind}.key' entry; is it TorchServe's key_file.json?"
        )
    return key


def resolve_token(
    kind: str,
    token: str | None = None,
    key_file: Path | str | None = None,
    environ: Mapping[str, str] | None = None,
) -> str | None:
    """The token to send, or None when none is configured (server started without auth).

    Explicit beats implicit: the ``token`` argument, then the given ``key_file``, then
    ``$SEGSERVE_TOKEN`` / ``$SEGSERVE_MANAGEMENT_TOKEN``, then ``./key_file.json`` if it exists.
    An explicit key file that is missing is an error; a missing default one is not.
    """
    if kind not in TOKEN_KINDS:
        raise ConfigurationError(f"token kind {kind!r} is not one of {list(TOKEN_KINDS)}")
    if token:
        return token
    if key_file is not None:
        return read_key_file(Path(key_file), kind)
    env = os.environ if environ is None else environ
    if env.get(ENV_VARS[kind]):
        return env[ENV_VARS[kind]]
    if DEFAULT_KEY_FILE.is_file():
        return read_key_file(DEFAULT_KEY_FILE, kind)
    return None


def bearer(token: str | None) -> dict[str, str]:
    """``{"Authorization": "Bearer <token>"}``, or ``{}`` without a token."""
    return {"Authorization": f"Bearer {token}"} if token else {}

"""The TorchServe a fault run runs against: fault archives, a per-run config, a started server.

* :func:`build_fault_archive` packs an export like ``make archive`` does, then
  :func:`add_fault_handler` makes ``loadtest/fault_handler.py`` its entry point: the real
  handler, which first sleeps for the seconds in the request header :data:`FAULT_HEADER`.
  Production archives never contain it;
* :func:`write_server_config` writes a copy of the repo's config.properties with overrides
  (a small ``job_queue_size``, other models), paths made absolute;
* :func:`start_fault_server` does both and starts TorchServe on free ports (the scenarios of
  :mod:`loadtest.chaos` each get a fresh one).
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path
from typing import Any

from loadtest.errors import ChaosError

FAULT_HEADER = "X-Segserve-Fault-Sleep"
FAULT_ENTRY_POINT = "fault_handler.py"
# The fault-injecting handler packed into fault archives (a real, linted module).
FAULT_HANDLER_FILE = Path(__file__).resolve().with_name("fault_handler.py")
REPO = Path(__file__).resolve().parent.parent


def add_fault_handler(mar: Path) -> Path:
    """Rewrite ``mar`` in place so that TorchServe loads ``loadtest/fault_handler.py``."""
    buf = io.BytesIO()
    with zipfile.ZipFile(mar) as src, zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename == "MAR-INF/MANIFEST.json":
                manifest = json.loads(data)
                manifest["model"]["handler"] = FAULT_ENTRY_POINT
                data = json.dumps(manifest, indent=2).encode()
            dst.writestr(item, data)
        dst.writestr(FAULT_ENTRY_POINT, FAULT_HANDLER_FILE.read_bytes())
    tmp = mar.with_suffix(".mar.tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, mar)
    return mar


def build_fault_archive(export_dir: Path, store: Path, **options: Any) -> Path:
    """``store/<model_name>.mar`` from ``export_dir`` with the fault handler; ``options`` are
    :class:`serving.archive.ArchiveOptions` fields (batch_size, response_timeout_s, ...)."""
    from serving.archive import ArchiveError, ArchiveOptions, build_archive

    # The scenarios reason about THE worker (kill it, hold it with a slow request): pin one.
    options.setdefault("min_workers", 1)
    try:
        mar = build_archive(export_dir, store, ArchiveOptions(**options))
    except ArchiveError as exc:
        raise ChaosError(str(exc)) from None
    return add_fault_handler(mar)


# A server-wide pin to one worker per model, for runs that reason about a single worker.
ONE_WORKER = {"default_workers_per_model": "1"}


def write_server_config(out: Path, overrides: dict[str, str], base: Path | None = None) -> Path:
    """A copy of ``base`` (the repo's config.properties) with ``overrides``, paths made absolute.

    Example:
        >>> import tempfile
        >>> path = write_server_config(Path(tempfile.mkdtemp()) / "c.properties",
        ...                            {"job_queue_size": "2"})
        >>> "job_queue_size=2" in path.read_text()
        True
    """
    from serving.properties import read_properties
    from serving.server import runtime_properties, write_properties

    base = Path(base or REPO / "config.properties").resolve()
    props = runtime_properties(read_properties(base), base.parent, None, None)
    props.update({k: str(v) for k, v in overrides.items()})
    out.parent.mkdir(parents=True, exist_ok=True)
    return write_properties(props, out)


def start_fault_server(
    export_dir: Path, work: Path, name: str, config: dict[str, str], **options: Any
) -> Any:
    """A TorchServe on free ports serving ``export_dir``'s fault archive (``options``: archive
    fields) with ``config`` overrides, all under ``work/<name>``; its ``ServerInfo``."""
    from serving.server import Ports, ServerError, start

    store = work / name / "store"
    build_fault_archive(export_dir, store, **options)
    conf = write_server_config(work / name / "config.properties", config)
    try:
        return start(conf, store, work / name / "server", Ports.free(), timeout_s=240)
    except ServerError as exc:
        raise ChaosError(f"{name}: TorchServe did not start: {exc}") from None

"""Experiment tracking: every training run is an MLflow run; evaluate and export append to it.

A training run logs the resolved recipe (flattened, as params), one point per epoch of every
number in its ``metrics.jsonl`` rows (step = epoch), and ``curves.png``. The run's id lives in
``RUN_DIR/tracking.json`` (:data:`TRACKING_FILE`), so ``evaluate`` (metrics, per-class table,
confusion matrix) and ``export`` (metadata, the model files or, above
``track.log_model_max_mb``, their list and sizes) of that run dir append to the same run, and
``--resume`` continues it. A sweep writes the file before training, to nest each trial under
the sweep's own run (:func:`prepare_run`).

Where: ``track.uri`` when set, else ``$MLFLOW_TRACKING_URI``, else the local SQLite store
``runs/mlruns/mlflow.db`` with artifacts in ``runs/mlruns/artifacts`` (MLflow 3 refuses its
old file store unless ``MLFLOW_ALLOW_FILE_STORE`` is set; ``make mlflow-ui`` shows the local
store). Only rank 0 of a DDP job tracks (train.py builds a tracker there only).

Tracking never stops training: mlflow missing, a store that cannot be opened, a server that
does not answer, a rejected value: the first failure is one :class:`TrackingWarning`, then
that tracker (and, for the rest of the process, that URI) does nothing.

Example:
    >>> flatten({"model": {"arch": "Unet", "kwargs": {}}, "data": {"size": [64, 64]}})
    {'model.arch': 'Unet', 'model.kwargs': '{}', 'data.size': '[64, 64]'}
    >>> NO_TRACKING.enabled
    False
"""

from __future__ import annotations

import atexit
import json
import math
import os
import re
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

TRACKING_FILE = "tracking.json"
# The local store, relative to the working directory (the repository root under make).
DEFAULT_STORE_DIR = Path("runs/mlruns")
DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "artifacts"

# MLflow retries an HTTP request 7 times with exponential backoff and a 120 s timeout each:
# an unreachable server would stall every log call for minutes. A tracker gives up after its
# first failure anyway, so one retry and a 10 s timeout bound that cost to ~20 s per run.
# setdefault: a value the user exported wins.
HTTP_ENV_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}

# mlflow.utils.validation's limits (checked here so one long value is not a lost batch).
MAX_PARAM_VALUE = 6000
MAX_BATCH = 100

# URIs that failed in this process: later trackers on them stay silent no-ops.
_FAILED_URIS: set[str] = set()


class TrackingWarning(UserWarning):
    """Tracking failed; the run goes on untracked (the message says what failed and why)."""


# --- pure helpers --------------------------------------------------------------------------------


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested mapping as ``{"a.b": "value"}``, every value a string (lists as YAML-ish text).

    An empty mapping stays one key (``model.kwargs: {}``), so the params show every key.

    Example:
        >>> flatten({"a": {"b": 1, "c": None}, "d": (1, 2), "e": ["x"]})
        {'a.b': '1', 'a.c': 'None', 'd': '[1, 2]', 'e': '["x"]'}
    """
    out: dict[str, str] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, dotted + "."))
        elif isinstance(value, (list, tuple, Mapping)):
            out[dotted] = json.dumps(value, default=str)
        else:
            out[dotted] = str(value)
    return out


def metric_key(name: str) -> str:
    """``name`` with what MLflow refuses in a key (anything but letters, digits, ``_-./`` and
    space) replaced by ``_``, cut to 250 characters.

    Example:
        >>> metric_key("per_class_iou.traffic light"), metric_key("iou[car]")
        ('per_class_iou.traffic light', 'iou_car_')
    """
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", str(name))[:250]


def numeric_items(row: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Every number of a history row (nested dicts as ``key.sub``); ``epoch`` and non-numbers
    (None, strings) left out.

    Example:
        >>> numeric_items({"epoch": 2, "val_miou": 0.5, "per_class_iou": {"a": 0.4}, "x": None})
        {'val_miou': 0.5, 'per_class_iou.a': 0.4}
    """
    out: dict[str, float] = {}
    for key, value in row.items():
        if not prefix and key == "epoch":
            continue
        if isinstance(value, Mapping):
            out.update(numeric_items(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[metric_key(f"{prefix}{key}")] = float(value)
    return out


def resolve_uri(uri: str | None, environ: Mapping[str, str] | None = None) -> str:
    """The tracking URI: ``uri``, else ``$MLFLOW_TRACKING_URI``, else the local SQLite store
    under ``runs/mlruns`` (as an absolute path, so the run dir's record names one place).

    Example:
        >>> resolve_uri("http://127.0.0.1:5000", {})
        'http://127.0.0.1:5000'
        >>> resolve_uri(None, {"MLFLOW_TRACKING_URI": "sqlite:////tmp/x.db"})
        'sqlite:////tmp/x.db'
        >>> resolve_uri(None, {}).endswith("runs/mlruns/mlflow.db")
        True
    """
    environ = os.environ if environ is None else environ
    chosen = uri or environ.get("MLFLOW_TRACKING_URI")
    if chosen:
        return chosen
    return "sqlite:///" + str((DEFAULT_STORE_DIR / DB_FILE).resolve())


def sqlite_artifact_root(uri: str) -> str | None:
    """For a SQLite store, the folder beside the database where its artifacts go (the store
    itself would put them under the working directory); None for other stores, whose server
    or configuration decides.

    Example:
        >>> sqlite_artifact_root("sqlite:////data/mlruns/mlflow.db")
        'file:///data/mlruns/artifacts'
        >>> sqlite_artifact_root("http://127.0.0.1:5000") is None
        True
    """
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri.removeprefix("sqlite:///")).expanduser()
    return (db.resolve().parent / ARTIFACTS_DIR).as_uri()


# --- the record in the run dir -------------------------------------------------------------------


@dataclass(frozen=True)
class RunRef:
    """Which MLflow run a run dir (or a sweep dir) logs to: ``RUN_DIR/tracking.json``."""

    uri: str
    experiment_id: str
    run_id: str
    parent_run_id: str | None = None

    def write(self, folder: Path) -> Path:
        path = Path(folder) / TRACKING_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def read(cls, folder: Path) -> RunRef | None:
        """The record in ``folder``; None when absent or unreadable (then nothing is tracked)."""
        path = Path(folder) / TRACKING_FILE
        try:
            data = json.loads(path.read_text())
            return cls(
                **{k: data[k] for k in ("uri", "experiment_id", "run_id")},
                parent_run_id=data.get("parent_run_id"),
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None


# --- the tracker ---------------------------------------------------------------------------------


def _warn(message: str) -> None:
    warnings.warn(message, TrackingWarning, stacklevel=3)


def _client(uri: str) -> Any:
    """An ``MlflowClient`` on ``uri`` (mlflow imported here: optional, heavy, ~3 s)."""
    for key, value in HTTP_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    from mlflow.tracking import MlflowClient

    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).expanduser().parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri)


class Tracker:
    """One MLflow run that never raises: the first failure warns once (naming the URI and the
    error) and turns this tracker into a no-op; the training goes on.

    :data:`NO_TRACKING` is the disabled one (tracking off, ranks > 0, no ``tracking.json``).
    """

    def __init__(self, ref: RunRef | None = None, client: Any = None) -> None:
        self.ref, self._client = ref, client
        self._atexit: Callable[[], None] | None = None

    @property
    def enabled(self) -> bool:
        return self.ref is not None and self._client is not None

    def _do(self, what: str, method: str | Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``client.<method>(*args)`` (or ``method(*args)``); None once disabled or on failure."""
        if not self.enabled:
            return None
        try:
            fn = getattr(self._client, method) if isinstance(method, str) else method
            return fn(*args, **kwargs)
        except Exception as exc:  # mlflow, sqlalchemy, requests: any of them means "untracked"
            self.disable(f"{what} failed", exc)
            return None

    def disable(self, what: str, exc: BaseException | None = None) -> None:
        """Warn once and stop tracking (a failure, or a caller that knows tracking is moot)."""
        uri = self.ref.uri if self.ref else "?"
        if uri not in _FAILED_URIS:
            _FAILED_URIS.add(uri)
            detail = f": {type(exc).__name__}: {str(exc).splitlines()[0][:300]}" if exc else ""
            _warn(
                f"experiment tracking to {uri}: {what}{detail}. The run continues without "
                "tracking (track.enabled=false or --no-track silences this)"
            )
        self._client = None
        self._forget_atexit()

    # -- logging --

    def log_params(self, params: Mapping[str, str]) -> None:
        if not self.enabled or not params:
            return
        from mlflow.entities import Param

        items = [Param(metric_key(k), str(v)[:MAX_PARAM_VALUE]) for k, v in params.items()]
        for i in range(0, len(items), MAX_BATCH):
            self._do(
                "logging params", "log_batch", self.ref.run_id, params=items[i : i + MAX_BATCH]
            )

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if not self.enabled or not metrics:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(metric_key(k), float(v), now, step or 0)
            for k, v in metrics.items()
            if v is not None and not (isinstance(v, float) and math.isinf(v))
        ]
        for i in range(0, len(items), MAX_BATCH * 10):
            self._do(
                "logging metrics",
                "log_batch",
                self.ref.run_id,
                metrics=items[i : i + MAX_BATCH * 10],
            )

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self.enabled or not tags:
            return
        from mlflow.entities import RunTag

        items = [RunTag(metric_key(k), str(v)[:MAX_PARAM_VALUE]) for k, v in tags.items()]
        self._do("setting tags", "log_batch", self.ref.run_id, tags=items)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self.enabled and Path(path).is_file():
            self._do(
                f"logging {Path(path).name}",
                "log_artifact",
                self.ref.run_id,
                str(path),
                artifact_path,
            )

    def log_files(self, paths: Iterable[Path], artifact_path: str | None = None) -> None:
        for path in paths:
            self.log_artifact(path, artifact_path)

    def log_json(self, data: Any, name: str, artifact_path: str | None = None) -> None:
        """``data`` as the artifact ``artifact_path/name`` (written to a temp folder first)."""
        if not self.enabled:
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_text(json.dumps(data, indent=2, default=str) + "\n")
            self.log_artifact(path, artifact_path)

    # -- run status --

    def set_status(self, status: str) -> None:
        """RUNNING (again, on resume), or a final one: FINISHED, FAILED, KILLED."""
        if not self.enabled:
            return
        if status == "RUNNING":
            self._do("reopening the run", "update_run", self.ref.run_id, "RUNNING")
            self._remember_atexit()
        else:
            self._do("closing the run", "set_terminated", self.ref.run_id, status)
            self._forget_atexit()

    def _remember_atexit(self) -> None:
        # A run that dies (exception, Ctrl-C) would read RUNNING forever: at exit, FAILED.
        # --resume reopens it.
        if self._atexit is None and self.enabled:
            self._atexit = lambda: self.set_status("FAILED")
            atexit.register(self._atexit)

    def _forget_atexit(self) -> None:
        if self._atexit is not None:
            atexit.unregister(self._atexit)
            self._atexit = None

    # -- what train / evaluate / export log --

    def log_epoch(self, row: Mapping[str, Any]) -> None:
        """One ``metrics.jsonl`` row as metrics at step = its epoch."""
        self.log_metrics(numeric_items(row), step=int(row["epoch"]))

    def log_evaluation(self, metrics: Mapping[str, Any], out_dir: Path) -> None:
        """Dataset-level scores as ``<eval folder>.<score>`` (``eval.miou``, per class
        ``eval.iou.<class>``), and the folder's metrics.json, per_class.md and
        confusion_matrix.png under the artifact folder of the same name."""
        prefix = Path(out_dir).name
        scores = {
            f"{prefix}.{key}": metrics[key]
            for key in ("miou", "pixel_accuracy", "mean_accuracy", "mean_dice", "boundary_f1")
            if isinstance(metrics.get(key), (int, float))
        }
        for name, iou in zip(
            metrics.get("class_names", []), metrics.get("per_class_iou", []), strict=False
        ):
            if isinstance(iou, (int, float)):
                scores[f"{prefix}.iou.{name}"] = iou
        self.log_metrics(scores, step=int(metrics.get("epoch") or 0))
        names = ("metrics.json", "per_class.md", "confusion_matrix.png")
        self.log_files([Path(out_dir) / n for n in names], prefix)

    def log_export(self, export_dir: Path, report: Mapping[str, Any], max_mb: float) -> None:
        """metadata.json, a list of the exported files with their sizes (``export/files.json``)
        and the model files themselves while together at most ``max_mb``."""
        export_dir = Path(export_dir)
        models = [Path(p) for p in (report.get("runtime_files") or {}).values()]
        files = {p.name: p.stat().st_size for p in sorted(export_dir.iterdir()) if p.is_file()}
        total_mb = sum(p.stat().st_size for p in models if p.is_file()) / 2**20
        upload = total_mb <= max_mb
        self.log_json({"files": files, "model_files_logged": upload}, "files.json", "export")
        self.log_artifact(export_dir / "metadata.json", "export")
        if upload:
            self.log_files(models, "export")
        parity = report.get("parity") or {}
        self.log_metrics(
            {"export.model_mb": total_mb}
            | (
                {"export.parity_max_abs_logit_diff": parity["max_abs_logit_diff"]}
                if isinstance(parity.get("max_abs_logit_diff"), (int, float))
                else {}
            )
        )
        self.set_tags({"export.runtimes": ",".join(sorted(report.get("runtime_files") or {}))})


NO_TRACKING = Tracker()


# --- opening runs --------------------------------------------------------------------------------


def _experiment_id(client: Any, name: str, uri: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=sqlite_artifact_root(uri))
    except Exception:  # created meanwhile by another process
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def _source_tags() -> dict[str, str]:
    """Who ran what: MLflow's own context tags (user, source, git commit) when it has them."""
    try:
        from mlflow.tracking.context.registry import resolve_tags

        return {k: str(v) for k, v in resolve_tags().items()}
    except Exception:  # an optional nicety; its absence must not cost the run
        return {}


def _open(ref: RunRef) -> Tracker | None:
    """A tracker on ``ref`` (its run may not exist yet), or None when ``ref.uri`` failed
    before in this process or mlflow cannot open it (missing, a URI it does not take: warned)."""
    if ref.uri in _FAILED_URIS:
        return None
    try:
        return Tracker(ref, _client(ref.uri))
    except Exception as exc:  # ImportError (not installed) or a URI mlflow does not take
        Tracker(ref).disable("opening the store", exc)
        return None


def prepare_run(
    recipe: Any,
    run_dir: Path,
    run_name: str | None = None,
    parent: RunRef | None = None,
    tags: Mapping[str, str] | None = None,
) -> RunRef | None:
    """Create the MLflow run ``recipe`` will train into and record it in ``run_dir``; None
    (after one warning) when that fails, or when ``track.enabled`` is false.

    Training started in ``run_dir`` continues this run while it has no epoch logged, so a
    sweep nests a trial under ``parent`` (its own run) this way.
    """
    track = recipe.track
    if not track.enabled:
        return None
    uri = parent.uri if parent is not None else resolve_uri(track.uri)
    tracker = _open(RunRef(uri, "", ""))
    if tracker is None:
        return None
    client = tracker._client

    def create() -> RunRef:
        experiment = _experiment_id(client, track.experiment or recipe.name, uri)
        all_tags = _source_tags() | {"segserve.run_dir": str(Path(run_dir).resolve())}
        if parent is not None:
            all_tags["mlflow.parentRunId"] = parent.run_id
        run = client.create_run(
            experiment, tags=all_tags | dict(tags or {}), run_name=run_name or Path(run_dir).name
        )
        ref = RunRef(uri, experiment, run.info.run_id, parent.run_id if parent else None)
        ref.write(run_dir)
        return ref

    return tracker._do("creating the run", create)


def _existing_run(tracker: Tracker) -> Any:
    """The MLflow run ``tracker.ref`` names; None when it was deleted, or when the store fails
    (then warned and disabled)."""
    try:
        return tracker._client.get_run(tracker.ref.run_id)
    except Exception as exc:  # MlflowException, or the store's own error
        if getattr(exc, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
            tracker.disable("reading the run failed", exc)
        return None


def _logged_epochs(tracker: Tracker) -> int:
    """The last epoch the run holds (0: none), from its ``val_miou`` history."""
    history = tracker._do("reading the run", "get_metric_history", tracker.ref.run_id, "val_miou")
    return max((m.step for m in history or []), default=0)


def start_training(
    recipe: Any, run_dir: Path, resume: bool, history: list[dict[str, Any]]
) -> Tracker:
    """The tracker of a training run (call on rank 0 only), status RUNNING.

    A new run logs the recipe as params. ``RUN_DIR/tracking.json`` names the run to continue
    when training resumes, or when its run holds no epoch yet (a sweep's prepared trial, a
    run that died in its first epoch); then params it lacks are added, a value that changed
    (``train.epochs`` grown on resume) becomes a tag ``resumed.<key>``, and ``history`` rows
    it lacks (a crash between checkpoint and log) are logged.
    """
    if not recipe.track.enabled:
        return NO_TRACKING
    run_dir = Path(run_dir)
    ref = RunRef.read(run_dir)
    tracker = _open(ref) if ref is not None else None
    if tracker is not None:
        run = _existing_run(tracker)
        if run is None:  # deleted (a new run below), or the store failed (warned: untracked)
            tracker = None
        elif not resume and _logged_epochs(tracker) > 0:
            tracker = None  # a finished run's record in a reused dir: this is a new run
    if tracker is None:
        ref = prepare_run(recipe, run_dir)
        if ref is None:
            return NO_TRACKING
        tracker, run = _open(ref), None
        if tracker is None:
            return NO_TRACKING
    params = flatten(recipe.to_dict())
    logged = dict(run.data.params) if run is not None else {}
    tracker.log_params({k: v for k, v in params.items() if metric_key(k) not in logged})
    changed = {
        k: v
        for k, v in params.items()
        if metric_key(k) in logged and logged[metric_key(k)] != v[:MAX_PARAM_VALUE]
    }
    tracker.set_tags({f"resumed.{k}": v for k, v in changed.items()})
    done = _logged_epochs(tracker) if run is not None else 0
    for row in history:
        if row["epoch"] > done:
            tracker.log_epoch(row)
    tracker.set_status("RUNNING")
    return tracker


def finish_training(tracker: Tracker, run_dir: Path, summary: Mapping[str, Any]) -> None:
    """The run's outcome (best mIoU and epoch, early stop) and files; status FINISHED."""
    if not tracker.enabled:
        return
    tracker.log_metrics({"best_miou": summary["best_miou"], "best_epoch": summary["best_epoch"]})
    tracker.set_tags({"stopped_early": summary["stopped_early"]})
    run_dir = Path(run_dir)
    tracker.log_files([run_dir / n for n in ("curves.png", "metrics.csv", "recipe.yaml")])
    tracker.set_status("FINISHED")


def for_run_dir(run_dir: Path) -> Tracker:
    """The run ``RUN_DIR/tracking.json`` names, for evaluate/export to append to (its status
    left as it is); :data:`NO_TRACKING` when the run dir has no record."""
    ref = RunRef.read(Path(run_dir))
    tracker = _open(ref) if ref is not None else None
    return tracker or NO_TRACKING

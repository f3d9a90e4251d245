"""training/tracking.py: real tiny runs tracked into a real MLflow store (SQLite in tmp_path),
read back with MlflowClient; an unreachable server costs one warning, never the run."""

from __future__ import annotations

import contextlib
import io
import json
import time
import warnings
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import free_port
from tests.training.test_train import TINY
from training.cli import _track_sets, build_parser
from training.config import apply_overrides, load_recipe, recipe_from_dict
from training.evaluate import run_evaluation
from training.export import export_run
from training.tracking import TRACKING_FILE, RunRef, TrackingWarning, flatten
from training.train import train


def tiny(uri: str, *overrides: str):
    return apply_overrides(recipe_from_dict(TINY), [f"track.uri={uri}", *overrides])


def artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> dict[str, int]:
    """Every artifact of the run, path -> size, recursively."""
    found: dict[str, int] = {}
    for info in client.list_artifacts(run_id, path):
        if info.is_dir:
            found |= artifacts(client, run_id, info.path)
        else:
            found[info.path] = info.file_size
    return found


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    return "sqlite:///" + str(tmp_path_factory.mktemp("mlruns") / "mlflow.db")


@pytest.fixture(scope="module")
def tracked(store: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, RunRef]:
    """One epoch, then --resume to two: one MLflow run; then evaluate and export append."""
    run_dir = tmp_path_factory.mktemp("run") / "tiny"
    train(tiny(store, "train.epochs=1"), run_dir)
    first = RunRef.read(run_dir)
    train(tiny(store, "train.epochs=2"), run_dir, resume=True)
    assert RunRef.read(run_dir) == first, "the resumed run must continue the same MLflow run"
    with contextlib.redirect_stdout(io.StringIO()):  # the parity lines
        run_evaluation(run_dir)
        export_run(run_dir)
    return run_dir, first


def test_a_training_run_is_an_mlflow_run(tracked, store: str) -> None:
    run_dir, ref = tracked
    assert json.loads((run_dir / TRACKING_FILE).read_text())["run_id"] == ref.run_id
    assert ref.uri == store
    client = MlflowClient(store)
    run = client.get_run(ref.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "tiny"
    # params: the resolved recipe as the first epoch ran it, flattened; the grown
    # train.epochs of the resume is a tag (MLflow params cannot change)
    first = flatten(tiny(store, "train.epochs=1").to_dict())
    assert run.data.params == first
    assert run.data.params["model.arch"] == "Unet"
    assert run.data.params["data.input_size"] == "[64, 64]"
    assert run.data.tags["resumed.train.epochs"] == "2"
    assert run.data.tags["segserve.run_dir"] == str(run_dir.resolve())


def test_every_epoch_is_one_metric_point(tracked, store: str) -> None:
    run_dir, ref = tracked
    client = MlflowClient(store)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for key in ("val_miou", "train_loss", "val_loss", "lr", "pixel_acc", "per_class_iou.disc"):
        history = sorted(client.get_metric_history(ref.run_id, key), key=lambda m: m.step)
        assert [m.step for m in history] == [1, 2], key
        expected = [r["per_class_iou"]["disc"] if "." in key else r[key] for r in rows]
        assert [m.value for m in history] == pytest.approx(expected), key
    best = client.get_metric_history(ref.run_id, "best_miou")
    assert best[-1].value == pytest.approx(max(r["val_miou"] for r in rows))


def test_evaluate_and_export_append_to_the_same_run(tracked, store: str) -> None:
    run_dir, ref = tracked
    client = MlflowClient(store)
    files = artifacts(client, ref.run_id)
    for name in ("curves.png", "metrics.csv", "recipe.yaml"):
        assert files[name] == (run_dir / name).stat().st_size, name
    for name in ("metrics.json", "per_class.md", "confusion_matrix.png"):
        assert files[f"eval/{name}"] == (run_dir / "eval" / name).stat().st_size, name
    assert files["export/model.pt"] == (run_dir / "export" / "model.pt").stat().st_size
    assert files["export/metadata.json"] == (run_dir / "export" / "metadata.json").stat().st_size
    listing = json.loads(
        Path(client.download_artifacts(ref.run_id, "export/files.json", str(run_dir))).read_text()
    )
    assert listing["files"]["model.pt"] == (run_dir / "export" / "model.pt").stat().st_size
    assert listing["model_files_logged"] is True
    evaluated = json.loads((run_dir / "eval" / "metrics.json").read_text())
    metrics = client.get_run(ref.run_id).data.metrics
    assert metrics["eval.miou"] == pytest.approx(evaluated["miou"])
    assert metrics["eval.iou.disc"] == pytest.approx(evaluated["per_class_iou"][1])
    assert metrics["export.model_mb"] > 0
    assert len(client.search_runs([ref.experiment_id])) == 1  # nothing opened a second run


def test_an_export_too_large_to_upload_logs_its_list_only(tmp_path: Path, store: str) -> None:
    run_dir = tmp_path / "big"
    train(tiny(store, "train.epochs=1", "track.log_model_max_mb=0.001"), run_dir)
    with contextlib.redirect_stdout(io.StringIO()):
        export_run(run_dir)
    ref = RunRef.read(run_dir)
    files = artifacts(MlflowClient(store), ref.run_id)
    assert "export/files.json" in files and "export/metadata.json" in files
    assert "export/model.pt" not in files


def test_an_unreachable_server_warns_once_and_training_completes(tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{free_port()}"  # nobody listens there
    run_dir = tmp_path / "untracked"
    started = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = train(tiny(uri, "train.epochs=2"), run_dir)
        with contextlib.redirect_stdout(io.StringIO()):
            run_evaluation(run_dir)
    elapsed = time.monotonic() - started
    ours = [w for w in caught if issubclass(w.category, TrackingWarning)]
    assert len(ours) == 1, [str(w.message) for w in ours]
    assert uri in str(ours[0].message) and "continues without tracking" in str(ours[0].message)
    assert summary["epochs_completed"] == 2
    assert (run_dir / "checkpoints" / "best.pt").is_file()
    assert not (run_dir / TRACKING_FILE).exists()
    # MLflow's own retries (7, backoff, 120 s timeouts) would take minutes; ours take seconds
    assert elapsed < 90, f"an unreachable tracking server cost {elapsed:.0f} s"


def test_tracking_off_writes_no_record(tmp_path: Path) -> None:
    store = tmp_path / "store"
    run_dir = tmp_path / "off"
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrackingWarning)
        train(
            tiny(f"sqlite:///{store}/mlflow.db", "train.epochs=1", "track.enabled=false"), run_dir
        )
    assert not (run_dir / TRACKING_FILE).exists() and not store.exists()
    assert load_recipe(run_dir / "recipe.yaml").track.enabled is False


def test_cli_flags_mirror_the_recipe_keys() -> None:
    args = build_parser().parse_args(
        ["train", "--config", "c.yaml", "--track-uri", "http://h:5000", "--experiment", "e 1"]
    )
    sets = _track_sets(args)
    recipe = apply_overrides(recipe_from_dict(TINY), sets)
    assert (recipe.track.uri, recipe.track.experiment, recipe.track.enabled) == (
        "http://h:5000",
        "e 1",
        True,
    )
    args = build_parser().parse_args(["train", "--config", "c.yaml", "--no-track"])
    assert apply_overrides(recipe_from_dict(TINY), _track_sets(args)).track.enabled is False

"""training/sweep.py: a real 2-trial sweep on the embedded data (1 epoch, 64 px), rerun
without retraining, an interrupted trial resumed, the winner promoted; the Pareto front; bad
--grid values as CLI errors (exit 2) naming the key.

The tests that train (marked slow) take ~35 s together here; the 2-trial sweep is shared."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.training.test_train import TINY
from training.cli import EXIT_USER_ERROR, main
from training.config import ConfigError, apply_overrides, load_recipe, recipe_from_dict, save_recipe
from training.sweep import (
    DONE,
    PENDING,
    SweepOptions,
    SweepState,
    Trial,
    pareto_front,
    promote,
    run_sweep,
    trial_recipe,
)
from training.tracking import RunRef
from training.train import train

GRID = ["model.arch=Unet,UnetPlusPlus"]
FAST = SweepOptions(latency_runs=3)


def base_config(folder: Path, *overrides: str) -> Path:
    """The tiny recipe (8 images of 64 px, a 3-stage resnet18), 1 epoch, as a YAML file."""
    recipe = apply_overrides(
        recipe_from_dict(TINY),
        ["name=tiny", "train.epochs=1", "export.drift_reference_images=2", *overrides],
    )
    path = folder / "tiny.yaml"
    save_recipe(recipe, path)
    return path


def quiet_sweep(*args, **kwargs) -> SweepState:
    with contextlib.redirect_stdout(io.StringIO()):  # epoch, parity and result lines
        return run_sweep(*args, **kwargs)


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, SweepState]:
    folder = tmp_path_factory.mktemp("sweep")
    config = base_config(folder)
    sweep_dir = folder / "sweeps" / "tiny"
    return config, sweep_dir, quiet_sweep(config, GRID, sweep_dir=sweep_dir, options=FAST)


@pytest.mark.slow
def test_a_sweep_trains_evaluates_exports_and_compares(swept) -> None:
    _, sweep_dir, state = swept
    assert [t.name for t in state.trials] == ["t000-Unet", "t001-UnetPlusPlus"]
    assert [t.status for t in state.trials] == [DONE, DONE], [t.error for t in state.trials]
    for trial in state.trials:
        run_dir = sweep_dir / trial.name
        assert load_recipe(run_dir / "recipe.yaml").model.arch == trial.overrides["model.arch"]
        evaluated = json.loads((run_dir / "eval" / "metrics.json").read_text())
        assert trial.val_miou == pytest.approx(evaluated["miou"])
        assert (run_dir / "export" / "model.pt").is_file()
        assert trial.parameters > 0 and trial.latency_cpu_ms > 0 and trial.train_time_s > 0
    # UnetPlusPlus's nested decoder has more weights than Unet's
    assert state.trials[1].parameters > state.trials[0].parameters
    rows = list(csv.DictReader((sweep_dir / "results.csv").open()))
    assert [r["trial"] for r in rows] == ["t000-Unet", "t001-UnetPlusPlus"]
    assert rows[0]["overrides"] == "model.arch=Unet"
    assert float(rows[1]["val_miou"]) == pytest.approx(state.trials[1].val_miou, abs=1e-4)
    for column in ("iou_background", "iou_disc", "train_time_s", "parameters", "latency_cpu_ms"):
        assert column in rows[0], column
    assert "yes" in {r["pareto"] for r in rows}
    table = (sweep_dir / "results.md").read_text()
    assert "| t001-UnetPlusPlus | model.arch=UnetPlusPlus | done |" in table
    assert (sweep_dir / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_each_trial_is_a_tracked_run_nested_under_the_sweep(swept) -> None:
    _, sweep_dir, state = swept
    parent = RunRef.read(sweep_dir)
    client = MlflowClient(parent.uri)
    assert client.get_run(parent.run_id).data.params["grid.model.arch"] == "Unet,UnetPlusPlus"
    children = client.search_runs(
        [parent.experiment_id], f"tags.mlflow.parentRunId = '{parent.run_id}'"
    )
    assert sorted(r.info.run_name for r in children) == ["t000-Unet", "t001-UnetPlusPlus"]
    for trial in state.trials:
        ref = RunRef.read(sweep_dir / trial.name)
        run = client.get_run(ref.run_id)
        assert run.data.params["model.arch"] == trial.overrides["model.arch"]
        assert len(client.get_metric_history(ref.run_id, "val_miou")) == 1  # 1 epoch, 1 point
        assert run.data.metrics["eval.miou"] == pytest.approx(trial.val_miou)
        assert run.data.metrics["latency_cpu_ms"] == pytest.approx(trial.latency_cpu_ms)
    assert "results.md" in {a.path for a in client.list_artifacts(parent.run_id)}


@pytest.mark.slow
def test_rerunning_the_sweep_trains_nothing_again(swept) -> None:
    config, sweep_dir, state = swept
    stamps = {t.name: (sweep_dir / t.name / "checkpoints" / "last.pt").stat().st_mtime_ns
              for t in state.trials}  # fmt: skip
    again = quiet_sweep(config, GRID, sweep_dir=sweep_dir, options=FAST)
    assert [t.status for t in again.trials] == [DONE, DONE]
    assert [t.val_miou for t in again.trials] == [t.val_miou for t in state.trials]
    for name, stamp in stamps.items():
        assert (sweep_dir / name / "checkpoints" / "last.pt").stat().st_mtime_ns == stamp, name
    # and a sweep dir holding another grid is refused, not mixed
    with pytest.raises(ConfigError, match="another grid"):
        quiet_sweep(config, ["optim.lr=0.1,0.2"], sweep_dir=sweep_dir, options=FAST)


@pytest.mark.slow
def test_promote_writes_a_loadable_recipe_and_keeps_an_existing_file(swept, tmp_path) -> None:
    _, sweep_dir, state = swept
    best = max(state.trials, key=lambda t: t.val_miou)
    path = promote(sweep_dir, "BEST", configs_dir=tmp_path)
    assert path == tmp_path / "tiny.yaml"
    recipe = load_recipe(path)
    assert recipe.model.arch == best.overrides["model.arch"]
    assert (recipe.name, recipe.output_dir) == ("tiny", "runs/tiny")
    trained = load_recipe(sweep_dir / best.name / "recipe.yaml")
    assert recipe.model == trained.model and recipe.optim == trained.optim
    with pytest.raises(ConfigError, match="already exists; pass --force"):
        promote(sweep_dir, "t000-Unet", configs_dir=tmp_path)
    promote(sweep_dir, "t000-Unet", configs_dir=tmp_path, force=True)
    assert load_recipe(path).model.arch == "Unet"
    with pytest.raises(ConfigError, match="t001-UnetPlusPlus"):  # the message lists the names
        promote(sweep_dir, "t999", configs_dir=tmp_path)


@pytest.mark.slow
def test_promote_from_the_command_line(swept, tmp_path: Path, capsys) -> None:
    config, sweep_dir, _ = swept
    # no --grid: a rerun of the sweep the folder holds
    args = ["sweep", "--config", str(config), "--sweep-dir", str(sweep_dir), "--promote", "BEST",
            "--configs-dir", str(tmp_path), "--latency-runs", "3"]  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(args) == 0
        assert load_recipe(tmp_path / "tiny.yaml").name == "tiny"
        assert main(args) == EXIT_USER_ERROR  # the file exists now
    err = capsys.readouterr().err
    assert "already exists; pass --force" in err and "Traceback" not in err
    with contextlib.redirect_stdout(io.StringIO()):
        assert main([*args, "--force"]) == 0


@pytest.mark.slow
def test_an_interrupted_trial_resumes_from_its_last_checkpoint(tmp_path: Path) -> None:
    config = base_config(tmp_path, "train.epochs=2")
    sweep_dir = tmp_path / "sweep"
    base = load_recipe(config)
    trial = Trial("t000-0.003", {"optim.lr": "0.003"})
    run_dir = sweep_dir / trial.name
    # the trial's first epoch, as a sweep interrupted during epoch 2 leaves it
    half = apply_overrides(trial_recipe(base, trial, run_dir), ["train.epochs=1"])
    train(half, run_dir)
    first_row = (run_dir / "metrics.jsonl").read_text().splitlines()[0]
    ref = RunRef.read(run_dir)
    state = quiet_sweep(config, ["optim.lr=0.003"], sweep_dir=sweep_dir, options=FAST)
    assert [t.status for t in state.trials] == [DONE]
    rows = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2 and rows[0] == first_row  # epoch 1 kept, epoch 2 trained
    assert RunRef.read(run_dir).run_id == ref.run_id
    steps = MlflowClient(ref.uri).get_metric_history(ref.run_id, "val_miou")
    assert sorted(m.step for m in steps) == [1, 2]


def test_no_trial_starts_once_the_budget_is_spent(tmp_path: Path) -> None:
    config = base_config(tmp_path)
    options = SweepOptions(budget_minutes=0, latency_runs=3)
    state = quiet_sweep(config, GRID, sweep_dir=tmp_path / "s", options=options)
    assert [t.status for t in state.trials] == [PENDING]  # the first one was refused
    assert not (tmp_path / "s" / "t000-Unet").exists()
    assert (tmp_path / "s" / "results.md").is_file()


@pytest.mark.slow
def test_optuna_search_over_the_same_values(tmp_path: Path) -> None:
    config = base_config(tmp_path)
    options = SweepOptions(search="optuna", trials=2, latency_runs=3, seed=1)
    grid = ["optim.lr=0.003,0.001"]
    state = quiet_sweep(config, grid, sweep_dir=tmp_path / "s", options=options)
    assert 1 <= len(state.trials) <= 2 and all(t.status == DONE for t in state.trials)
    assert {t.overrides["optim.lr"] for t in state.trials} <= {"0.003", "0.001"}
    assert (tmp_path / "s" / "optuna.db").is_file()
    import optuna

    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 's/optuna.db'}")
    assert len(study.trials) == 2 and study.best_value == pytest.approx(
        max(t.train_best_miou for t in state.trials)
    )


def test_pareto_front() -> None:
    # (latency ms, mIoU): lower latency and higher mIoU win
    points = [(40.0, 0.80), (20.0, 0.70), (30.0, 0.60), (60.0, 0.85), (20.0, 0.65), (50.0, 0.80)]
    assert pareto_front(points) == [1, 0, 3]  # (30, .60), (20, .65), (50, .80) dominated
    assert pareto_front([]) == []
    assert pareto_front([(10.0, 0.5), (10.0, 0.5)]) == [0]  # a duplicate adds nothing
    assert pareto_front([(math.nan, 0.9), (5.0, 0.1)]) == [1]  # unmeasured: not on it


@pytest.mark.parametrize(
    ("grid", "named"),
    [
        ("model.nosuch=1,2", "model.nosuch"),
        ("optim.lr=fast,0.1", "optim.lr"),
        ("nosection.key=1", "nosection"),
        ("model.arch=Unet,NoSuchNet", "model.arch"),
        ("model.arch", "model.arch"),
    ],
)
def test_a_bad_grid_is_a_cli_error_naming_the_key(tmp_path: Path, capsys, grid, named) -> None:
    config = base_config(tmp_path)
    status = main(["sweep", "--config", str(config), "--grid", grid,
                   "--sweep-dir", str(tmp_path / "s")])  # fmt: skip
    err = capsys.readouterr().err
    assert status == EXIT_USER_ERROR
    assert err.startswith("error: ") and named in err and "Traceback" not in err
    assert not (tmp_path / "s").exists()  # nothing trained, nothing written

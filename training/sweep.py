"""Sweeps: train a grid of recipe overrides (or an Optuna TPE search over the same values),
then evaluate, export and time every trial, and compare them.

``python -m training sweep --config C --grid model.arch=Unet,FPN --grid optim.lr=1e-3,3e-4``
trains the cartesian product of the ``--grid`` values, each combination applied as
``--set key=value`` overrides (:func:`training.config.apply_overrides`) on the recipe. With
``--search optuna --trials N``, Optuna's TPE sampler picks N combinations from the same lists
(a combination already trained is not trained again; its score is reused).

Everything lives in the sweep dir (default ``runs/sweeps/<name>/``), so rerunning the same
command picks up where it stopped: a finished trial is skipped, an interrupted one resumes
from its ``checkpoints/last.pt`` (``train --resume``)::

    sweep.json           the state: base recipe, grid, search, each trial's status and results
    tracking.json        the sweep's MLflow run; each trial's run is nested under it
    <trial>/             one run dir per trial (recipe.yaml, checkpoints/, eval/, export/)
    results.csv/.md      trial, overrides, val mIoU, per-class IoU, train time, parameters,
                         latency; pareto.png: val mIoU against CPU latency, Pareto front marked

``--budget-minutes M`` starts no new trial after M minutes of this invocation. After the
trials, each is evaluated (:func:`training.evaluate.run_evaluation`), exported
(:func:`training.export.export_run`) and its TorchScript model timed at the recipe's input
size: median of ``latency_runs`` batch-1 forwards after warm-up, the trials taking turns (so
that load from elsewhere slows all alike), on CPU (``latency_threads``, 1: as served), and on GPU
too when CUDA is available; ``--remeasure`` times every finished trial again. A failed trial
(its error in the table) stays failed on reruns. ``--promote BEST`` (or a trial's name) writes
the winner's recipe to ``configs/<name>.yaml``.

Example:
    >>> grid = parse_grid(["model.arch=Unet,FPN", "optim.lr=1e-3"])
    >>> grid_combinations(grid)
    [{'model.arch': 'Unet', 'optim.lr': '1e-3'}, {'model.arch': 'FPN', 'optim.lr': '1e-3'}]
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import re
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from training import tracking
from training.config import ConfigError, Recipe, apply_overrides, load_recipe, save_recipe

STATE_FILE = "sweep.json"
SEARCHES = ("grid", "optuna")
BEST = "BEST"
# Trial statuses, in order. "failed" keeps the error; a rerun retries nothing failed.
PENDING, TRAINING, TRAINED, EXPORTED, DONE, FAILED = (
    "pending", "training", "trained", "exported", "done", "failed"
)  # fmt: skip


# --- the grid ------------------------------------------------------------------------------------


def split_values(text: str) -> list[str]:
    """Comma-separated values; commas inside brackets or quotes stay (a list is one value).

    Example:
        >>> split_values("Unet,FPN"), split_values("[16,8,8],[8,8,8]"), split_values("'a,b',c")
        (['Unet', 'FPN'], ['[16,8,8]', '[8,8,8]'], ["'a,b'", 'c'])
    """
    values, depth, quote, current = [], 0, "", ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            values.append(current.strip())
            current = ""
            continue
        current += char
    values.append(current.strip())
    return values


def parse_grid(items: Sequence[str]) -> dict[str, list[str]]:
    """``["key=v1,v2", ...]`` → ``{key: [v1, v2]}`` (values as written: YAML, parsed later by
    the recipe's override mechanism). A malformed item raises :class:`ConfigError` naming it.

    Example:
        >>> parse_grid(["model.arch=Unet,FPN", "optim.lr=1e-3, 3e-4"])
        {'model.arch': ['Unet', 'FPN'], 'optim.lr': ['1e-3', '3e-4']}
    """
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(
                f"--grid {item!r}: expected key=value1,value2, e.g. --grid model.arch=Unet,FPN"
            )
        values = split_values(raw)
        if any(v == "" for v in values):
            raise ConfigError(f"--grid {key}: an empty value in {raw!r}; e.g. {key}=a,b")
        if key in grid:
            raise ConfigError(f"--grid {key}: given twice; put every value in one --grid {key}=")
        if len(set(values)) != len(values):
            raise ConfigError(f"--grid {key}: a value repeats in {raw!r}")
        grid[key] = values
    return grid


def grid_combinations(grid: Mapping[str, Sequence[str]]) -> list[dict[str, str]]:
    """The cartesian product, first key slowest, each as ``{key: value}``.

    Example:
        >>> len(grid_combinations({"a": ["1", "2"], "b": ["x", "y", "z"]}))
        6
    """
    keys = list(grid)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*grid.values())]


def override_items(overrides: Mapping[str, str]) -> list[str]:
    """``{key: value}`` → ``["key=value", ...]``, what ``--set`` takes.

    >>> override_items({"model.arch": "FPN", "optim.lr": "3e-4"})
    ['model.arch=FPN', 'optim.lr=3e-4']
    """
    return [f"{k}={v}" for k, v in overrides.items()]


def check_grid(base: Recipe, grid: Mapping[str, Sequence[str]]) -> None:
    """Every ``--grid`` value applies to ``base`` and every combination builds a model (an
    unknown key, a bad value, an architecture that takes no such kwarg): else a
    :class:`ConfigError` that names the ``--grid`` key."""
    from training.model import check_model_config

    if not grid:
        raise ConfigError("--grid: give at least one, e.g. --grid model.arch=Unet,FPN")
    for key, values in grid.items():
        for value in values:
            try:
                apply_overrides(base, [f"{key}={value}"])
            except ConfigError as exc:
                raise ConfigError(f"--grid {key}={value}: {exc}") from None
    for combo in grid_combinations(grid):
        try:
            check_model_config(apply_overrides(base, override_items(combo)).model)
        except ConfigError as exc:
            where = " ".join(override_items(combo))
            raise ConfigError(f"--grid {', '.join(grid)}: the combination {where}: {exc}") from None


def trial_name(index: int, overrides: Mapping[str, str]) -> str:
    """A folder name: the trial's number and its values.

    Example:
        >>> trial_name(3, {"model.arch": "DeepLabV3Plus", "optim.lr": "3e-4"})
        't003-DeepLabV3Plus-3e-4'
    """
    slug = "-".join(re.sub(r"[^A-Za-z0-9.-]+", "_", v).strip("_") for v in overrides.values())
    return f"t{index:03d}-{slug}"[:60].rstrip("-_")


# --- comparing -----------------------------------------------------------------------------------


def pareto_front(points: Sequence[tuple[float | None, float | None]]) -> list[int]:
    """Indices of the points no other point beats: ``(latency, score)``, lower latency and
    higher score better. Sorted by latency; a point with a NaN or None coordinate is never on
    the front; of exact duplicates only the first counts.

    Example:
        >>> pareto_front([(10, 0.5), (20, 0.7), (15, 0.4), (30, 0.7), (5, 0.2)])
        [4, 0, 1]
        >>> pareto_front([(1.0, float("nan")), (2.0, 0.1)])
        [1]
    """

    def valid(p: tuple[float, float]) -> bool:
        return all(v is not None and not math.isnan(v) for v in p)

    order = sorted(
        (i for i, p in enumerate(points) if valid(p)),
        key=lambda i: (points[i][0], -points[i][1], i),
    )
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:  # faster ones came first: it must score strictly higher
            front.append(i)
            best = points[i][1]
    return front


@torch.inference_mode()
def measure_latencies(
    models: Sequence[tuple[Path, Sequence[int]]],
    device: str = "cpu",
    runs: int = 20,
    warmup: int = 5,
) -> list[float]:
    """Median milliseconds of a batch-1 forward of each TorchScript ``(model_path, (H, W))``,
    loaded the way the handler loads it, all timed together (``handler.runtime.time_forwards``:
    turns, ``warmup`` untimed forwards each)."""
    from handler.runtime import load_scripted_model, time_forwards

    calls = [
        (load_scripted_model(path, device), torch.rand(1, 3, int(h), int(w), device=device))
        for path, (h, w) in models
    ]
    return time_forwards(calls, device, runs, warmup)


def count_parameters(checkpoint: Path) -> int:
    """Trainable and frozen parameters of the checkpoint's model (buffers left out)."""
    from training.checkpoint import load_checkpoint
    from training.model import model_from_checkpoint

    model = model_from_checkpoint(load_checkpoint(checkpoint))
    return sum(p.numel() for p in model.parameters())


# --- the state -----------------------------------------------------------------------------------


@dataclass
class Trial:
    """One combination: where it trains, how far it got, what it scored."""

    name: str
    overrides: dict[str, str]
    status: str = PENDING
    error: str | None = None
    optuna_number: int | None = None
    train_time_s: float = 0.0
    train_best_miou: float | None = None
    val_miou: float | None = None
    per_class_iou: dict[str, float | None] = field(default_factory=dict)
    parameters: int | None = None
    latency_cpu_ms: float | None = None
    latency_gpu_ms: float | None = None


@dataclass
class SweepState:
    """``sweep.json``: what was asked (compared on every rerun) and every trial so far."""

    name: str
    base: dict[str, Any]
    grid: dict[str, list[str]]
    search: str
    seed: int = 0
    trials: list[Trial] = field(default_factory=list)
    # how the latencies were measured: threads, runs, load average, GPU name
    measured: dict[str, Any] = field(default_factory=dict)

    def trial_for(self, overrides: Mapping[str, str]) -> Trial:
        """The trial of these overrides, added (pending) when new."""
        for trial in self.trials:
            if trial.overrides == dict(overrides):
                return trial
        trial = Trial(trial_name(len(self.trials), overrides), dict(overrides))
        self.trials.append(trial)
        return trial

    def save(self, sweep_dir: Path) -> None:
        path = Path(sweep_dir) / STATE_FILE
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")
        os.replace(tmp, path)  # atomic: an interrupted write leaves the old state

    @classmethod
    def load(cls, sweep_dir: Path) -> SweepState | None:
        path = Path(sweep_dir) / STATE_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            data["trials"] = [Trial(**t) for t in data.get("trials", [])]
            return cls(**data)
        except (ValueError, TypeError) as exc:
            raise ConfigError(
                f"{path}: not a sweep state ({exc}); delete it to start over"
            ) from None


def _comparable(recipe_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The base recipe as a rerun must match it: where it is tracked does not count."""
    return {k: v for k, v in recipe_dict.items() if k != "track"}


def open_state(
    sweep_dir: Path, name: str, base: Recipe, grid: Mapping[str, list[str]], search: str, seed: int
) -> SweepState:
    """The sweep dir's state, or a new one; a sweep dir that holds another sweep (another base
    recipe, grid or search) is refused rather than mixed."""
    state = SweepState.load(sweep_dir)
    if state is None:
        return SweepState(name, base.to_dict(), dict(grid), search, seed)
    asked = {"base recipe": _comparable(base.to_dict()), "grid": dict(grid), "search": search}
    held = {"base recipe": _comparable(state.base), "grid": state.grid, "search": state.search}
    differs = [k for k in asked if asked[k] != held[k]]
    if search == "optuna" and seed != state.seed:
        differs.append("seed")
    if differs:
        raise ConfigError(
            f"{sweep_dir}: holds a sweep with another {', '.join(differs)} (grid there: "
            f"{state.grid}, search {state.search}); pass --name for a new sweep, or delete the "
            "folder to start this one over"
        )
    return state


# --- one trial -----------------------------------------------------------------------------------


def trial_recipe(base: Recipe, trial: Trial, run_dir: Path) -> Recipe:
    """The base recipe with the trial's overrides, trained into ``run_dir``."""
    return apply_overrides(
        base, override_items(trial.overrides) + [f"output_dir={json.dumps(str(run_dir))}"]
    )


def train_trial(base: Recipe, trial: Trial, run_dir: Path, parent: tracking.RunRef | None) -> None:
    """Train (or resume) one trial; a training error marks it failed instead of raising."""
    from training.checkpoint import load_checkpoint
    from training.train import train

    recipe = trial_recipe(base, trial, run_dir)
    last = run_dir / "checkpoints" / "last.pt"
    if last.is_file() and load_checkpoint(last)["epoch"] >= recipe.train.epochs:
        trial.status = TRAINED  # trained, but the state was not saved before the interruption
        return
    if not (run_dir / tracking.TRACKING_FILE).is_file():
        tags = {"segserve.sweep": base.name, "segserve.trial": trial.name}
        tracking.prepare_run(recipe, run_dir, trial.name, parent, tags)
    started = time.perf_counter()
    try:
        summary = train(recipe, run_dir, resume=last.is_file())
    except Exception as exc:  # one bad combination must not end the sweep
        _fail(trial, run_dir, exc, "training")
        return
    trial.train_time_s += time.perf_counter() - started
    trial.train_best_miou = summary["best_miou"]
    trial.status = TRAINED


def _fail(trial: Trial, run_dir: Path, exc: BaseException, stage: str) -> None:
    """Mark the trial failed at ``stage``; its MLflow run says so too (a failed training is a
    FAILED run; a trained run whose export failed stays FINISHED, with a tag)."""
    trial.status, trial.error = FAILED, f"{stage}: {type(exc).__name__}: {exc}"
    print(f"trial {trial.name} failed: {trial.error}")
    traceback.print_exc()
    tracker = tracking.for_run_dir(run_dir)
    tracker.set_tags({"segserve.sweep.failed": trial.error})
    if stage == "training":
        tracker.set_status("FAILED")


def export_trial(trial: Trial, run_dir: Path) -> None:
    """Evaluate, export and count one trained trial (the project's own functions)."""
    from training.evaluate import run_evaluation
    from training.export import export_run

    try:
        metrics = run_evaluation(run_dir)
        # TorchScript only: it is what is timed (the promoted recipe keeps its export.runtimes)
        export_run(run_dir, runtimes=["torchscript"])
        trial.parameters = count_parameters(run_dir / "checkpoints" / "best.pt")
    except Exception as exc:  # an export that fails its parity check, say: this trial only
        _fail(trial, run_dir, exc, "evaluate/export")
        return
    trial.val_miou = metrics["miou"]
    trial.per_class_iou = dict(zip(metrics["class_names"], metrics["per_class_iou"], strict=True))
    trial.status = EXPORTED


def time_trials(
    trials: Sequence[Trial], sweep_dir: Path, runs: int, threads: int = 1
) -> dict[str, Any]:
    """Time every trial's exported model together (:func:`measure_latencies`), on CPU with
    ``threads`` threads and, when CUDA is available, on GPU; each becomes DONE and its run gets
    the figures. Returns how it was measured (for the table's note).

    One thread by default: how TorchServe runs the model here (workers x 1 thread,
    handler/sizing.py), and the one figure a busy neighbour does not wreck: a 2-thread forward
    waits for its slower thread (measured on 2 cores beside one busy process: Unet 206 ms
    with 2 threads, 32 ms with 1).
    """
    from training.export import load_exported

    models, timed = [], []
    for trial in trials:
        try:
            _, meta = load_exported(sweep_dir / trial.name / "export")
        except Exception as exc:  # its export removed or damaged since: this trial only
            _fail(trial, sweep_dir / trial.name, exc, "timing")
            continue
        models.append((sweep_dir / trial.name / "export" / "model.pt", meta.preprocess.input_size))
        timed.append(trial)
    how = {"threads": threads, "runs": runs, "load_average": os.getloadavg()[0]}
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cpu = measure_latencies(models, "cpu", runs)
    finally:
        torch.set_num_threads(previous)
    gpu = _gpu_latencies(models, runs) if torch.cuda.is_available() else [None] * len(models)
    if torch.cuda.is_available():
        how["gpu"] = torch.cuda.get_device_name(0)
    for trial, cpu_ms, gpu_ms in zip(timed, cpu, gpu, strict=True):
        trial.latency_cpu_ms, trial.latency_gpu_ms, trial.status = cpu_ms, gpu_ms, DONE
        measured = {
            "latency_cpu_ms": cpu_ms,
            "latency_gpu_ms": gpu_ms,
            "parameters": trial.parameters,
            "train_time_s": trial.train_time_s,
        }
        tracking.for_run_dir(sweep_dir / trial.name).log_metrics(
            {k: v for k, v in measured.items() if v is not None}
        )
    return how


def _gpu_latencies(models: Sequence[tuple[Path, Sequence[int]]], runs: int) -> list[float | None]:
    try:
        return list(measure_latencies(models, "cuda", runs))
    except Exception as exc:  # a trace with CPU-only constants, say: CPU figures still stand
        print(f"GPU latency not measured: {type(exc).__name__}: {exc}")
        return [None] * len(models)


# --- the sweep -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepOptions:
    """How to run a sweep (the CLI's flags)."""

    search: str = "grid"
    trials: int | None = None  # optuna: how many trials (default: every combination)
    budget_minutes: float | None = None
    seed: int = 0
    latency_runs: int = 20
    latency_threads: int = 1
    remeasure: bool = False  # time every finished trial again (another machine, less load)


def default_sweep_dir(name: str) -> Path:
    """``runs/sweeps/<name>``."""
    return Path("runs") / "sweeps" / name


def run_sweep(
    config: Path,
    grid_items: Sequence[str],
    sets: Sequence[str] = (),
    name: str | None = None,
    sweep_dir: Path | None = None,
    options: SweepOptions = SweepOptions(),
) -> SweepState:
    """Train, evaluate, export and time every trial; write the comparison table and picture
    into the sweep dir; return the state (``trials`` with their results).

    A config error (an unknown ``--grid`` key, a bad value) raises :class:`ConfigError` before
    anything trains. ``grid_items`` may be empty when ``sweep_dir`` already holds the sweep.
    """
    if options.search not in SEARCHES:
        raise ConfigError(f"--search: {options.search!r} is not one of {list(SEARCHES)}")
    base = load_recipe(config, list(sets))
    name = name or Path(config).stem
    sweep_dir = Path(sweep_dir) if sweep_dir else default_sweep_dir(name)
    grid = parse_grid(grid_items)
    if not grid and (held := SweepState.load(sweep_dir)) is not None:
        grid = held.grid  # a rerun (e.g. to --promote) of the sweep the folder holds
    check_grid(base, grid)
    state = open_state(sweep_dir, name, base, grid, options.search, options.seed)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    state.save(sweep_dir)
    parent, sweep_tracker = _sweep_run(base, sweep_dir, state)
    deadline = (
        None if options.budget_minutes is None else time.monotonic() + 60 * options.budget_minutes
    )
    if options.search == "grid":
        _grid_search(base, state, sweep_dir, parent, deadline)
    else:
        _optuna_search(base, state, sweep_dir, parent, deadline, options)
    for trial in state.trials:
        if trial.status == TRAINED:
            export_trial(trial, sweep_dir / trial.name)
            state.save(sweep_dir)
    # Timed together, so that the figures compare: every finished trial when one is new
    if options.remeasure or any(t.status == EXPORTED for t in state.trials):
        timed = [t for t in state.trials if t.status in (EXPORTED, DONE)]
        state.measured = time_trials(
            timed, sweep_dir, options.latency_runs, options.latency_threads
        )
        state.save(sweep_dir)
    outputs = write_results(state, sweep_dir)
    _log_sweep(sweep_tracker, state, outputs)
    return state


def _out_of_budget(deadline: float | None) -> bool:
    if deadline is not None and time.monotonic() > deadline:
        print("--budget-minutes spent: no new trial started (rerun the sweep to continue)")
        return True
    return False


def _run_trial(base: Recipe, state: SweepState, trial: Trial, sweep_dir: Path, parent) -> None:
    trial.status, trial.error = TRAINING, None
    state.save(sweep_dir)  # "training": a rerun resumes it
    print(f"trial {trial.name}: {' '.join(override_items(trial.overrides))}")
    train_trial(base, trial, sweep_dir / trial.name, parent)
    state.save(sweep_dir)


def _grid_search(base, state: SweepState, sweep_dir: Path, parent, deadline) -> None:
    for overrides in grid_combinations(state.grid):
        trial = state.trial_for(overrides)
        if trial.status in (PENDING, TRAINING):
            if _out_of_budget(deadline):
                break
            _run_trial(base, state, trial, sweep_dir, parent)


def _optuna_search(base, state: SweepState, sweep_dir: Path, parent, deadline, options) -> None:
    """TPE over the grid's value lists, the study kept in ``optuna.db`` (resumable); the
    objective is the trial's best val mIoU during training."""
    try:
        import optuna
    except ImportError:
        raise ConfigError(
            "--search optuna needs optuna: pip install optuna (or --search grid)"
        ) from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=state.name,
        storage=f"sqlite:///{(sweep_dir / 'optuna.db').resolve()}",
        sampler=optuna.samplers.TPESampler(seed=options.seed),
        direction="maximize",
        load_if_exists=True,
    )
    space = {k: optuna.distributions.CategoricalDistribution(v) for k, v in state.grid.items()}
    wanted = options.trials or len(grid_combinations(state.grid))
    for trial in state.trials:  # interrupted ones first: their optuna trial waits for a value
        if trial.status in (PENDING, TRAINING) and trial.optuna_number is not None:
            if _out_of_budget(deadline):
                return
            _run_trial(base, state, trial, sweep_dir, parent)
            _tell(study, trial, trial.optuna_number)
    # A failed combination counts as a trial too: else a sweep of failing ones never ends.
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)
    while len(study.get_trials(deepcopy=False, states=done)) < wanted:
        if _out_of_budget(deadline):
            return
        asked = study.ask(space)
        trial = state.trial_for({k: str(asked.params[k]) for k in state.grid})
        if trial.status in (PENDING, TRAINING):
            trial.optuna_number = asked.number
            _run_trial(base, state, trial, sweep_dir, parent)
        _tell(study, trial, asked.number)  # an earlier trial's combination: its score again


def _tell(study: Any, trial: Trial, number: int) -> None:
    """Give Optuna trial ``number`` the trial's score (or FAIL), unless it already has one
    (told just before an interruption)."""
    import optuna

    if study.get_trials(deepcopy=False)[number].state != optuna.trial.TrialState.RUNNING:
        return
    if trial.train_best_miou is not None and trial.status in (TRAINED, DONE):
        study.tell(number, trial.train_best_miou)
    else:
        study.tell(number, state=optuna.trial.TrialState.FAIL)


def _sweep_run(
    base: Recipe, sweep_dir: Path, state: SweepState
) -> tuple[tracking.RunRef | None, tracking.Tracker]:
    """The sweep's own MLflow run (created once, reopened on reruns; its trials nest in it)
    and its tracker, status RUNNING."""
    created = None
    if tracking.RunRef.read(sweep_dir) is None and base.track.enabled:
        tags = {"segserve.sweep": state.name}
        created = tracking.prepare_run(base, sweep_dir, f"sweep {state.name}", tags=tags)
    tracker = tracking.for_run_dir(sweep_dir)
    if created is not None:
        grid = {f"grid.{k}": ",".join(v) for k, v in state.grid.items()}
        tracker.log_params(grid | {"search": state.search, "seed": str(state.seed)})
    tracker.set_status("RUNNING")
    return (tracker.ref if tracker.enabled else None), tracker


def _log_sweep(tracker: tracking.Tracker, state: SweepState, outputs: Sequence[Path]) -> None:
    scores = [t.val_miou for t in state.trials if t.status == DONE and t.val_miou is not None]
    if scores:
        tracker.log_metrics({"best_val_miou": max(scores), "trials_done": len(scores)})
    tracker.log_files(outputs)
    tracker.set_status("FINISHED")


# --- the table and the picture -------------------------------------------------------------------


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def result_rows(state: SweepState) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the comparison table; a Pareto column marks the front."""
    classes = list(next((t.per_class_iou for t in state.trials if t.per_class_iou), {}))
    gpu = any(t.latency_gpu_ms is not None for t in state.trials)
    front = set(_front(state.trials))
    header = [
        "trial",
        "overrides",
        "status",
        "val_miou",
        *[f"iou_{c}" for c in classes],
        "train_time_s",
        "parameters",
        "latency_cpu_ms",
        *(["latency_gpu_ms"] if gpu else []),
        "pareto",
    ]
    rows = []
    for i, t in enumerate(state.trials):
        rows.append(
            [
                t.name,
                " ".join(override_items(t.overrides)),
                t.status if not t.error else f"{t.status}: {t.error[:80]}",
                _fmt(t.val_miou),
                *[_fmt(t.per_class_iou.get(c)) for c in classes],
                _fmt(t.train_time_s, 1),
                _fmt(t.parameters),
                _fmt(t.latency_cpu_ms, 2),
                *([_fmt(t.latency_gpu_ms, 2)] if gpu else []),
                "yes" if i in front else "",
            ]
        )
    return header, rows


def _front(trials: Sequence[Trial]) -> list[int]:
    """The Pareto front among the finished trials (indices into ``trials``)."""
    return pareto_front([(t.latency_cpu_ms, t.val_miou) if t.status == DONE else (None, None)
                         for t in trials])  # fmt: skip


def write_results(state: SweepState, sweep_dir: Path) -> list[Path]:
    """``results.csv``, ``results.md`` and ``pareto.png`` in the sweep dir; their paths."""
    import csv

    header, rows = result_rows(state)
    csv_path, md_path, png_path = (
        sweep_dir / n for n in ("results.csv", "results.md", "pareto.png")
    )
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    how = state.measured
    timing = (
        f"median of {how['runs']} batch-1 forwards of the exported TorchScript model, the trials "
        f"taking turns, {how['threads']} CPU thread(s), load average {how['load_average']:.1f}"
        + (f", GPU {how['gpu']}" if how.get("gpu") else "")
        if how
        else "not measured yet"
    )
    note = (
        f"Sweep `{state.name}` ({state.search}); val mIoU from `evaluate`; latency: {timing}.\n\n"
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    md_path.write_text(note + "\n".join(lines) + "\n")
    plot_pareto(state.trials, png_path)
    print(f"sweep results: {md_path}, {csv_path}, {png_path}")
    return [csv_path, md_path, png_path]


def plot_pareto(trials: Sequence[Trial], path: Path) -> None:
    """val mIoU against CPU latency, one labelled dot per finished trial, the Pareto front as a
    step line (Agg canvas, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    done = [
        t
        for t in trials
        if t.status == DONE and t.latency_cpu_ms is not None and t.val_miou is not None
    ]
    front = [done[i] for i in pareto_front([(t.latency_cpu_ms, t.val_miou) for t in done])]
    fig = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.scatter(
        [t.latency_cpu_ms for t in done],
        [t.val_miou for t in done],
        color="tab:blue",
        label="trial",
    )
    if front:
        ax.step(
            [t.latency_cpu_ms for t in front],
            [t.val_miou for t in front],
            where="post",
            color="tab:red",
            label="Pareto front",
        )
        ax.scatter(
            [t.latency_cpu_ms for t in front],
            [t.val_miou for t in front],
            s=90,
            facecolors="none",
            edgecolors="tab:red",
        )
    for t in done:
        ax.annotate(
            t.name,
            (t.latency_cpu_ms, t.val_miou),
            textcoords="offset points",
            xytext=(5, 4),
            fontsize=7,
        )
    ax.set(
        xlabel="CPU latency, batch 1 (ms, median)",
        ylabel="val mIoU",
        title="val mIoU against latency",
    )
    ax.margins(x=0.2, y=0.12)  # room for the labels right of the dots
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path)


# --- promoting the winner ------------------------------------------------------------------------


def pick_trial(state: SweepState, which: str) -> Trial:
    """``BEST`` (highest val mIoU; ties: the faster) or a trial's name, among finished trials."""
    done = [t for t in state.trials if t.status == DONE and t.val_miou is not None]
    if which == BEST:
        if not done:
            raise ConfigError(f"--promote {BEST}: no trial of sweep {state.name!r} has finished")
        return max(done, key=lambda t: (t.val_miou, -(t.latency_cpu_ms or 0.0)))
    for trial in done:
        if trial.name == which:
            return trial
    raise ConfigError(
        f"--promote {which!r}: not a finished trial of sweep {state.name!r}; choose {BEST} or one "
        f"of {[t.name for t in done]}"
    )


def promote(
    sweep_dir: Path,
    which: str = BEST,
    name: str | None = None,
    configs_dir: Path = Path("configs"),
    force: bool = False,
) -> Path:
    """Write the chosen trial's resolved recipe as ``configs_dir/<name>.yaml`` (name: the
    sweep's), its ``name`` and ``output_dir`` (``runs/<name>``) set; an existing file is
    kept unless ``force``."""
    state = SweepState.load(sweep_dir)
    if state is None:
        raise ConfigError(f"{sweep_dir}: no sweep here ({STATE_FILE} missing); run the sweep first")
    trial = pick_trial(state, which)
    name = name or state.name
    path = Path(configs_dir) / f"{name}.yaml"
    if path.exists() and not force:
        raise ConfigError(
            f"--promote: {path} already exists; pass --force to overwrite it, or --promote-as "
            "another name"
        )
    recipe = load_recipe(Path(sweep_dir) / trial.name / "recipe.yaml")
    recipe = dataclasses.replace(recipe, name=name, output_dir=f"runs/{name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_recipe(recipe, path)
    print(f"promoted {trial.name} (val mIoU {_fmt(trial.val_miou)}) to {path}")
    return path

"""``python -m training``: train, evaluate, export, predict and check data from the command line.

Each subcommand is a thin wrapper over one library function; heavy modules are imported only
by the subcommand that needs them. A bad recipe, bad data or a bad checkpoint prints one line
to stderr and exits with status 2 (no traceback): the message already names the fix.

Example:
    $ python -m training train --config configs/default.yaml --run-dir runs/default \\
          --set train.epochs=2 --set optim.lr=0.001
    $ torchrun --nproc_per_node=2 -m training train --config configs/default.yaml
    $ python -m training evaluate --run-dir runs/default
    $ python -m training export --run-dir runs/default --runtimes torchscript,onnx,onnx_int8
    $ python -m training evaluate --run-dir runs/default --split test --tta flip --scales 0.75,1
    $ python -m training predict --run-dir runs/default --input photos/ --out preds
    $ python -m training check-data --config configs/cityscapes.yaml --out reports/cityscapes
    $ python -m training sweep --config configs/default.yaml --grid model.arch=Unet,FPN \\
          --grid optim.lr=1e-3,3e-4 --budget-minutes 60 --promote BEST
    $ python -m training card --run-dir runs/default
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from training.config import SYNTHETIC_MODES, ConfigError, load_recipe

EXIT_USER_ERROR = 2


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message is the whole story: print it, no traceback."""
    from handler.artifact import MetadataError
    from training.card import CardError
    from training.checkpoint import CheckpointError
    from training.datasets import DataError
    from training.inference import InferenceError

    errors: list[type[BaseException]] = [
        ConfigError, DataError, CheckpointError, MetadataError, InferenceError, CardError
    ]  # fmt: skip
    try:
        from training.predict import PredictError

        errors.append(PredictError)
    except ImportError:  # predict is optional for training-only installs
        pass
    return tuple(errors)


def _print_json(data: Any) -> None:
    from training.metrics import jsonable

    print(json.dumps(jsonable(data), indent=2, default=str))


# --- subcommands ---------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    from training.train import train

    recipe = load_recipe(args.config, args.set + _track_sets(args))
    run_dir = Path(args.run_dir or recipe.output_dir)
    summary = train(recipe, run_dir, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        summary = {k: v for k, v in summary.items() if k != "final"}
        _print_json(summary)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from training.sweep import DONE, PENDING, SweepOptions, default_sweep_dir, promote, run_sweep

    options = SweepOptions(
        search=args.search,
        trials=args.trials,
        budget_minutes=args.budget_minutes,
        seed=args.seed,
        latency_runs=args.latency_runs,
        latency_threads=args.latency_threads,
        remeasure=args.remeasure,
    )
    sweep_dir = Path(args.sweep_dir) if args.sweep_dir else None
    sets = args.set + _track_sets(args)
    state = run_sweep(Path(args.config), args.grid, sets, args.name, sweep_dir, options)
    if args.promote:
        folder = sweep_dir or default_sweep_dir(state.name)
        promote(folder, args.promote, args.promote_as, Path(args.configs_dir), args.force)
    failed = [t.name for t in state.trials if t.status not in (DONE, PENDING)]
    if failed:
        print(f"{len(failed)} trial(s) did not finish: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from training.evaluate import eval_dir_name, run_evaluation
    from training.inference import options_from_args

    options = options_from_args(args)
    data_root = Path(args.data_root) if args.data_root else None
    run_dir = Path(args.run_dir)
    out = Path(args.out) if args.out else run_dir / eval_dir_name(args.split, data_root, options)
    metrics = run_evaluation(
        run_dir,
        Path(args.checkpoint) if args.checkpoint else None,
        split=args.split,
        data_root=data_root,
        options=options,
        out_dir=out,
    )
    _print_json({k: metrics[k] for k in metrics if not k.startswith(("confusion", "per_class"))})
    print(f"wrote {out}", file=sys.stderr)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from training.export import export_run

    result = export_run(
        Path(args.run_dir),
        Path(args.checkpoint) if args.checkpoint else None,
        onnx=True if args.onnx else None,
        runtimes=args.runtimes.split(",") if args.runtimes else None,
    )
    _print_json(result)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from training.inference import options_from_args
    from training.predict import PredictError, Predictor, list_images, write_predictions

    if bool(args.export_dir) == bool(args.run_dir):
        raise PredictError("predict: pass either --run-dir RUN_DIR or --export-dir EXPORT_DIR")
    inputs = [*args.images, *(args.input or [])]
    if not inputs:
        raise PredictError("predict: no images; pass --input IMAGE_OR_FOLDER (repeatable)")
    if not args.out_dir:
        raise PredictError("predict: pass --out DIR, the folder for the masks and overlays")
    export_dir = Path(args.export_dir) if args.export_dir else Path(args.run_dir) / "export"
    if args.threads is not None:
        if args.threads < 1:
            raise PredictError(f"predict: --threads {args.threads}: give 1 or more")
        import torch

        torch.set_num_threads(args.threads)
    predictor = Predictor.from_export(export_dir, device=args.device, runtime=args.runtime)
    options = options_from_args(args)
    for done in write_predictions(predictor, list_images(inputs), Path(args.out_dir), options):
        print(
            f"{done.source} -> {done.mask} + {done.overlay.name}  "
            f"(mean confidence {done.mean_confidence:.3f})"
        )
    return 0


def check_data(recipe: Any, survey: Any = None) -> tuple[dict[str, int], list[str]]:
    """Load every sample of the train and val splits (and a test split, when the layout has
    one or ``data.split`` draws one); (samples per split, problems found).

    Each problem is the data error's own message, which names the file and the fix. A
    ``training.data_report.DataSurvey`` given as ``survey`` sees every sample that loads.
    """
    from training.datasets import DataError, build_dataset
    from training.layouts import optional_test_split
    from training.resolve import resolve_preprocess_spec

    spec = resolve_preprocess_spec(recipe)
    counts: dict[str, int] = {}
    problems: list[str] = []
    test = optional_test_split(recipe.data)
    splits = (recipe.data.train_split, recipe.data.val_split, *([test] if test else []))
    for split in dict.fromkeys(splits):
        try:
            dataset = build_dataset(recipe.data, split, spec, train=False)
        except DataError as exc:
            counts[split] = 0
            problems.append(f"{split}: {exc}")
            continue
        counts[split] = len(dataset)
        if survey is not None:
            survey.start_split(split, dataset)
        for i in range(len(dataset)):
            try:
                sample = dataset.load_raw(i)
            except DataError as exc:
                problems.append(f"{split}: {exc}")
                continue
            if survey is not None:
                survey.add(split, i, *sample)
    return counts, problems


def cmd_check_data(args: argparse.Namespace) -> int:
    from training.data_report import DataSurvey

    recipe = load_recipe(args.config, args.set)
    survey = DataSurvey(samples_per_split=args.samples)
    counts, problems = check_data(recipe, survey)
    for problem in problems:
        print(problem)
    summary = ", ".join(f"{split}: {n} samples" for split, n in counts.items())
    print(f"{recipe.data.kind} data: {summary}; {len(problems)} problem(s)")
    out = Path(args.out) if args.out else Path(recipe.output_dir) / "check-data"
    if any(s.sizes for s in survey.splits.values()):
        print(f"data report (class distribution, image sizes, samples) in {out}:")
        for path in survey.write(out):
            print(f"  {path}")
    else:
        print("no sample could be read: no data report written")
    return 1 if problems else 0


# --- parser --------------------------------------------------------------------------------------


def cmd_card(args: argparse.Namespace) -> int:
    from training.card import write_card

    path = write_card(
        Path(args.run_dir),
        Path(args.out) if args.out else None,
        low_iou=args.low_iou,
        max_pixels=args.max_pixels,
        latency_forwards=args.forwards,
        device=args.device,
    )
    print(f"wrote {path}")
    return 0


def cmd_samples(args: argparse.Namespace) -> int:
    from training.synthetic import write_folder_dataset, write_samples

    size = tuple(args.size)
    if args.splits:
        counts = write_folder_dataset(args.out_dir, args.splits, args.seed, size, args.mode)
        shown = ", ".join(f"{split}: {n}" for split, n in counts.items())
        print(f"wrote a folder dataset ({shown}) to {args.out_dir}")
        return 0
    paths = write_samples(args.out_dir, args.n, seed=args.seed, size=size, mode=args.mode)
    print(f"wrote {len(paths)} images to {args.out_dir}")
    return 0


def _split_counts(text: str) -> dict[str, int]:
    """``train=367,val=101`` → ``{"train": 367, "val": 101}`` (argparse type of --splits)."""
    from training.synthetic import SPLITS

    counts: dict[str, int] = {}
    for item in text.split(","):
        split, _, n = item.partition("=")
        if split not in SPLITS or not n.isdigit():
            raise argparse.ArgumentTypeError(
                f"{item!r}: expected SPLIT=N with SPLIT in {list(SPLITS)}, e.g. train=300,val=60"
            )
        counts[split] = int(n)
    return counts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training", description="segserve training: recipe → checkpoint → export"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a recipe (torchrun for several processes)")
    p.add_argument("--config", required=True, help="recipe YAML, e.g. configs/default.yaml")
    p.add_argument("--run-dir", help="output folder (default: the recipe's output_dir)")
    p.add_argument(
        "--resume", action="store_true", help="continue from RUN_DIR/checkpoints/last.pt"
    )
    _add_set(p)
    _add_track(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "sweep", help="train a grid (or Optuna search) of overrides; compare, pick, promote"
    )
    p.add_argument("--config", required=True, help="the base recipe YAML")
    p.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="values to try for one recipe key, e.g. --grid model.arch=Unet,FPN (repeatable; "
        "the trials are the cartesian product)",
    )
    p.add_argument("--name", help="the sweep's name (default: the config's file stem)")
    p.add_argument("--sweep-dir", help="default: runs/sweeps/<name>")
    p.add_argument("--search", choices=["grid", "optuna"], default="grid")
    p.add_argument("--trials", type=int, help="--search optuna: how many (default: grid size)")
    p.add_argument("--seed", type=int, default=0, help="--search optuna: the sampler's seed")
    p.add_argument(
        "--budget-minutes", type=float, help="start no new trial after this many minutes"
    )
    p.add_argument("--latency-runs", type=int, default=20, help="timed forwards per trial (median)")
    p.add_argument(
        "--latency-threads",
        type=int,
        default=1,
        help="CPU threads per timed forward (1: as served)",
    )
    p.add_argument(
        "--remeasure", action="store_true", help="time every finished trial again, together"
    )
    p.add_argument(
        "--promote", metavar="BEST|TRIAL", help="write that trial's recipe to configs/<name>.yaml"
    )
    p.add_argument("--promote-as", help="the promoted recipe's name (default: the sweep's)")
    p.add_argument("--configs-dir", default="configs", help="where --promote writes")
    p.add_argument("--force", action="store_true", help="--promote may overwrite the file")
    _add_set(p)
    _add_track(p)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("evaluate", help="metrics, confusion matrix and overlays into RUN_DIR/eval")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--checkpoint", help="default: RUN_DIR/checkpoints/best.pt")
    p.add_argument("--split", default="val", help="any split the dataset has (default: val)")
    p.add_argument("--data-root", help="another copy of the data: same layout, this root")
    p.add_argument(
        "--out",
        help="output folder (default: RUN_DIR/eval for the plain val evaluation, which export "
        "reads; RUN_DIR/eval-<split>[-root-<name>][-<tta>] otherwise)",
    )
    _add_inference(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("export", help="TorchScript (+ ONNX) and metadata into RUN_DIR/export")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--checkpoint", help="default: RUN_DIR/checkpoints/best.pt")
    p.add_argument("--onnx", action="store_true", help="also write model.onnx")
    p.add_argument(
        "--runtimes",
        help="comma-separated, e.g. torchscript,onnx,onnx_int8 (default: the recipe's "
        "export.runtimes)",
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "predict", help="segment images (files or folders): class-id mask + overlay PNG each"
    )
    p.add_argument("--run-dir", help="a run folder: its export/ is used")
    p.add_argument("--export-dir", help="folder with model.pt + metadata.json")
    p.add_argument("images", nargs="*", help="image files or folders (or --input)")
    p.add_argument(
        "--input", action="append", help="an image file or a folder of images (repeatable)"
    )
    p.add_argument(
        "--out",
        "--out-dir",
        dest="out_dir",
        help="where <stem>.png (class ids, palette PNG) and <stem>_overlay.png go",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--runtime",
        default="torchscript",
        help="which exported model: torchscript (model.pt), onnx or onnx_int8",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (default: torch's); the served worker's count gives its mask bit "
        "for bit on CPUs whose kernels split sums by thread (AVX-512 ones do)",
    )
    _add_inference(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("samples", help="write images of the embedded dataset (demo, load tests)")
    p.add_argument("--out-dir", required=True)
    p.add_argument("-n", type=int, default=4, help="how many images (default 4)")
    p.add_argument("--size", type=int, nargs=2, default=[128, 128], metavar=("H", "W"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--mode",
        choices=SYNTHETIC_MODES,
        default="default",
        help="imbalanced: thin and rare classes too",
    )
    p.add_argument(
        "--splits",
        type=_split_counts,
        help="write a folder dataset instead (images/, masks/, classes.yaml), e.g. "
        "train=367,val=101,test=233",
    )
    p.set_defaults(func=cmd_samples)

    p = sub.add_parser(
        "check-data",
        help="load every sample of a recipe's data; list problems; write a data report",
    )
    p.add_argument("--config", required=True)
    p.add_argument(
        "--out",
        help="folder for the data report (default: the recipe's output_dir/check-data)",
    )
    p.add_argument(
        "--samples", type=int, default=4, help="samples per split in samples.png (default 4)"
    )
    _add_set(p)
    p.set_defaults(func=cmd_check_data)

    _add_card(sub)
    return parser


def _add_card(sub: Any) -> None:
    from handler.imaging import DEFAULT_MAX_PIXELS
    from training.card import LATENCY_FORWARDS, LOW_IOU

    p = sub.add_parser(
        "card", help="write RUN_DIR/MODEL_CARD.md from the run's metadata and evaluation"
    )
    p.add_argument("--run-dir", required=True)
    p.add_argument("--out", help="default: RUN_DIR/MODEL_CARD.md")
    p.add_argument(
        "--low-iou",
        type=float,
        default=LOW_IOU,
        help=f"classes under this IoU are named in the limitations (default {LOW_IOU})",
    )
    p.add_argument(
        "--forwards",
        type=int,
        default=LATENCY_FORWARDS,
        help=f"batch-1 forwards timed for the latency, median (default {LATENCY_FORWARDS}; "
        "0: not measured)",
    )
    p.add_argument("--device", default="cpu", help="where the latency is measured (cpu, cuda)")
    p.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help="the archive's --max-pixels, for the input policy (default: the handler's)",
    )
    p.set_defaults(func=cmd_card)


def _add_inference(p: argparse.ArgumentParser) -> None:
    from training.inference import add_arguments

    add_arguments(p)


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe value, e.g. --set train.epochs=5 (repeatable)",
    )


def _add_track(p: argparse.ArgumentParser) -> None:
    p.add_argument("--track-uri", help="MLflow tracking URI (the recipe's track.uri)")
    p.add_argument("--experiment", help="MLflow experiment (default: the recipe's name)")
    p.add_argument(
        "--no-track", action="store_true", help="no MLflow tracking (track.enabled=false)"
    )


def _track_sets(args: argparse.Namespace) -> list[str]:
    """The tracking flags as ``--set`` overrides (JSON-quoted: a URI is no YAML to parse)."""
    sets = [f"track.uri={json.dumps(args.track_uri)}"] if args.track_uri else []
    if args.experiment:
        sets.append(f"track.experiment={json.dumps(args.experiment)}")
    return sets + (["track.enabled=false"] if args.no_track else [])


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m training`` and ``segserve-train``; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except _user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

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
    $ python -m training predict --export-dir runs/default/export street.jpg --out-dir preds
    $ python -m training check-data --config configs/cityscapes.yaml
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from training.config import ConfigError, load_recipe

EXIT_USER_ERROR = 2


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message is the whole story: print it, no traceback."""
    from handler.artifact import MetadataError
    from training.checkpoint import CheckpointError
    from training.datasets import DataError

    errors: list[type[BaseException]] = [ConfigError, DataError, CheckpointError, MetadataError]
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

    recipe = load_recipe(args.config, args.set)
    run_dir = Path(args.run_dir or recipe.output_dir)
    summary = train(recipe, run_dir, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        summary = {k: v for k, v in summary.items() if k != "final"}
        _print_json(summary)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from training.evaluate import run_evaluation

    metrics = run_evaluation(Path(args.run_dir), Path(args.checkpoint) if args.checkpoint else None)
    _print_json({k: metrics[k] for k in metrics if not k.startswith(("confusion", "per_class"))})
    print(f"wrote {Path(args.run_dir) / 'eval'}", file=sys.stderr)
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
    import numpy as np
    from PIL import Image

    from training.predict import Predictor

    predictor = Predictor.from_export(
        Path(args.export_dir), device=args.device, runtime=args.runtime
    )
    palette = [c for rgb in predictor.metadata.palette for c in rgb]
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in map(Path, args.images):
        mask, confidence = predictor.predict_file(path)
        # A palette PNG: exact class ids for tools, the dataset's colours for people.
        img = Image.fromarray(mask.astype(np.uint8), mode="P")
        img.putpalette(palette)
        target = out_dir / f"{path.stem}.png"
        img.save(target)
        print(f"{path} -> {target}  (mean confidence {float(confidence.mean()):.3f})")
    return 0


def check_data(recipe: Any) -> tuple[dict[str, int], list[str]]:
    """Load every sample of the train and val splits; (samples per split, problems found).

    Each problem is the data error's own message, which names the file and the fix.
    """
    from training.datasets import DataError, build_dataset
    from training.resolve import resolve_preprocess_spec

    spec = resolve_preprocess_spec(recipe)
    counts: dict[str, int] = {}
    problems: list[str] = []
    for split in dict.fromkeys((recipe.data.train_split, recipe.data.val_split)):
        try:
            dataset = build_dataset(recipe.data, split, spec, train=False)
        except DataError as exc:
            counts[split] = 0
            problems.append(f"{split}: {exc}")
            continue
        counts[split] = len(dataset)
        for i in range(len(dataset)):
            try:
                dataset.load_raw(i)
            except DataError as exc:
                problems.append(f"{split}: {exc}")
    return counts, problems


def cmd_check_data(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.config, args.set)
    counts, problems = check_data(recipe)
    for problem in problems:
        print(problem)
    summary = ", ".join(f"{split}: {n} samples" for split, n in counts.items())
    print(f"{recipe.data.kind} data: {summary}; {len(problems)} problem(s)")
    return 1 if problems else 0


# --- parser --------------------------------------------------------------------------------------


def cmd_samples(args: argparse.Namespace) -> int:
    from training.synthetic import write_samples

    paths = write_samples(args.out_dir, args.n, seed=args.seed, size=tuple(args.size))
    print(f"wrote {len(paths)} images to {args.out_dir}")
    return 0


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
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="metrics, confusion matrix and overlays into RUN_DIR/eval")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--checkpoint", help="default: RUN_DIR/checkpoints/best.pt")
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

    p = sub.add_parser("predict", help="segment image files with an exported model")
    p.add_argument("--export-dir", required=True, help="folder with model.pt + metadata.json")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--out-dir", required=True, help="where the palette PNG masks go")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--runtime",
        default="torchscript",
        help="which exported model: torchscript (model.pt), onnx or onnx_int8",
    )
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("samples", help="write images of the embedded dataset (demo, load tests)")
    p.add_argument("--out-dir", required=True)
    p.add_argument("-n", type=int, default=4, help="how many images (default 4)")
    p.add_argument("--size", type=int, nargs=2, default=[128, 128], metavar=("H", "W"))
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_samples)

    p = sub.add_parser("check-data", help="load every sample of a recipe's data; list problems")
    p.add_argument("--config", required=True)
    _add_set(p)
    p.set_defaults(func=cmd_check_data)
    return parser


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe value, e.g. --set train.epochs=5 (repeatable)",
    )


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

"""Evaluate a checkpoint on a split (default: validation): metrics, per-class table, pictures.

The model sees exactly what serving would feed it (``handler.preprocessing``, the validation
transform) and its logits are upsampled to each image's native size before the argmax, so the
scores are those of the masks a client would get back, at the labels' own resolution. (The
training loop's ``val_miou`` may be measured at ``input_size`` and so differ slightly.)

Writes ``run_dir/eval/``: ``metrics.json``, ``per_class.md``, ``confusion_matrix.png``
(row-normalised: each row shows where that class's pixels went) and ``overlays/*.png``
(image | truth | prediction | errors, titled, with a legend of the classes shown, upscaled
with nearest neighbour to at least ``figures.MIN_PANEL_HEIGHT`` px, for ``eval.num_overlays``
evenly spaced samples).

``run_dir/eval/`` is the validation split's plain evaluation, the one the export and the
archive manifest read. Another split, another copy of the data (``data_root``) or test-time
augmentation / sliding windows (:mod:`training.inference`) write to their own folder,
``run_dir/eval-<split>[-root-<name>][-<options>]/`` (:func:`eval_dir_name`).

Example:
    >>> metrics = run_evaluation(Path("runs/default"))  # doctest: +SKIP
    >>> sorted(metrics)[:3]  # doctest: +SKIP
    ['boundary_f1', 'boundary_tolerance', 'checkpoint']
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from handler.artifact import parse_metadata
from handler.preprocessing import PreprocessSpec
from training import figures
from training.inference import InferenceOptions, segment_with_options
from training.metrics import BoundaryF1, ConfusionMatrix, jsonable
from training.predict import Model, segment

METRICS_FILE = "metrics.json"
IGNORE_COLOUR = (255, 255, 255)
ERROR_COLOUR = (255, 0, 0)


@dataclass(frozen=True)
class EvalTarget:
    """What the labels mean, from the checkpoint's metadata."""

    class_names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    ignore_index: int = 255


def overlay_indices(num_samples: int, num_overlays: int) -> list[int]:
    """Evenly spaced sample indices, first and last included.

    Example:
        >>> overlay_indices(10, 4), overlay_indices(10, 1)
        ([0, 3, 6, 9], [0])
    """
    if num_overlays <= 0 or num_samples <= 0:
        return []
    if num_overlays >= num_samples:
        return list(range(num_samples))
    if num_overlays == 1:
        return [0]
    return sorted({round(i * (num_samples - 1) / (num_overlays - 1)) for i in range(num_overlays)})


def colourise(mask: np.ndarray, palette: Sequence[Sequence[int]], ignore_index: int) -> np.ndarray:
    """Class mask → RGB uint8 with the palette; ``ignore_index`` pixels white.

    Example:
        >>> colourise(np.array([[0, 1, 255]]), [[0, 0, 0], [10, 20, 30]], 255)[0].tolist()
        [[0, 0, 0], [10, 20, 30], [255, 255, 255]]
    """
    table = np.asarray(palette, dtype=np.uint8)
    out = np.empty((*mask.shape, 3), dtype=np.uint8)
    ignored = mask == ignore_index
    out[ignored] = IGNORE_COLOUR
    out[~ignored] = table[mask[~ignored]]
    return out


def overlay_panel(
    rgb: np.ndarray, truth: np.ndarray, pred: np.ndarray, target: EvalTarget
) -> np.ndarray:
    """``image | truth | prediction | errors`` side by side, ``(H, 4W, 3)`` uint8.

    The error panel is the image in dimmed grey with wrong pixels red and ignored ones white.
    """
    half = lambda a, b: ((a.astype(np.uint16) + b) // 2).astype(np.uint8)  # noqa: E731
    truth_rgb = half(rgb, colourise(truth, target.palette, target.ignore_index))
    pred_rgb = half(rgb, colourise(pred, target.palette, target.ignore_index))
    ignored = truth == target.ignore_index
    truth_rgb[ignored] = IGNORE_COLOUR  # unblended, so void regions stand out
    grey = (rgb.mean(axis=2, keepdims=True) * 0.5).astype(np.uint8).repeat(3, axis=2)
    grey[(pred != truth) & ~ignored] = ERROR_COLOUR
    grey[ignored] = IGNORE_COLOUR
    return np.concatenate([rgb, truth_rgb, pred_rgb, grey], axis=1)


OVERLAY_TITLES = ("image", "ground truth", "prediction", "errors")


def overlay_figure(
    rgb: np.ndarray, truth: np.ndarray, pred: np.ndarray, target: EvalTarget
) -> tuple[np.ndarray, list[figures.Box]]:
    """:func:`overlay_panel`'s four panels as a figure a person can read: column titles, the
    panels upscaled (nearest) to at least ``figures.MIN_PANEL_HEIGHT`` px, and a legend of the
    classes in the truth or the prediction, the ignore colour and the error colour.

    Returns (figure, the four panels' boxes ``(top, left, height, width)`` in it).
    """
    panel = overlay_panel(rgb, truth, pred, target)
    w = rgb.shape[1]
    panels = [panel[:, i * w : (i + 1) * w] for i in range(4)]
    present = np.union1d(np.unique(truth[truth != target.ignore_index]), np.unique(pred))
    entries = figures.class_legend(target.class_names, target.palette, present.tolist())
    if bool((truth == target.ignore_index).any()):
        entries.append(figures.LegendEntry(f"ignored ({target.ignore_index})", IGNORE_COLOUR))
    entries.append(figures.LegendEntry("error (wrong class)", ERROR_COLOUR))
    return figures.compose_row(panels, OVERLAY_TITLES, entries)


def save_confusion_matrix(matrix: np.ndarray, class_names: Sequence[str], path: Path) -> None:
    """Row-normalised confusion matrix picture (matplotlib, Agg canvas, no global backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = matrix.sum(axis=1, keepdims=True)
    normalised = np.divide(matrix, rows, out=np.zeros(matrix.shape), where=rows > 0)
    n = len(class_names)
    side = max(4.0, 0.45 * n + 2.0)
    fig = Figure(figsize=(side + 1.0, side))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(normalised, vmin=0.0, vmax=1.0, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(n), labels=class_names, rotation=60, ha="right")
    ax.set_yticks(range(n), labels=class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    ax.set_title("confusion matrix (row-normalised)")
    if n <= 25:  # the numbers are unreadable beyond that
        for i in range(n):
            for j in range(n):
                value = normalised[i, j]
                colour = "white" if value > 0.5 else "black"
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color=colour)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def per_class_markdown(metrics: dict[str, Any], class_names: Sequence[str]) -> str:
    """The per-class Markdown table; an undefined score (class absent) shows as "—"."""

    def cell(value: float | None) -> str:
        return "—" if value is None or math.isnan(value) else f"{value:.4f}"

    # An evaluation written before per-class boundary F1 existed has no such column to show.
    boundary = metrics.get("per_class_boundary_f1")
    lines = [
        f"mIoU {cell(metrics['miou'])} · pixel accuracy {cell(metrics['pixel_accuracy'])} · "
        f"mean accuracy {cell(metrics.get('mean_accuracy'))} · "
        f"mean Dice {cell(metrics['mean_dice'])} · boundary F1 {cell(metrics['boundary_f1'])} "
        f"(tolerance {metrics['boundary_tolerance']} px) · {metrics['num_images']} images",
        "",
        "| class | IoU | accuracy | Dice |" + (" boundary F1 |" if boundary else "") + " pixels |",
        "|---|---:|---:|---:|" + ("---:|" if boundary else "") + "---:|",
    ]
    for i, name in enumerate(class_names):
        lines.append(
            f"| {name} | {cell(metrics['per_class_iou'][i])} | "
            f"{cell(metrics['per_class_accuracy'][i])} | {cell(metrics['per_class_dice'][i])} | "
            + (f"{cell(boundary[i])} | " if boundary else "")
            + f"{metrics['pixels_per_class'][i]} |"
        )
    return "\n".join(lines) + "\n"


def read_metrics(eval_dir: Path, checkpoint: Path | None = None) -> dict[str, Any] | None:
    """An evaluation's ``metrics.json`` as :func:`run_evaluation` wrote it, the one reader of
    that file; None when it is absent or unreadable, or (with ``checkpoint``) when it was
    computed from another checkpoint: a score of other weights must not describe this model.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> read_metrics(folder) is None
        True
        >>> _ = (folder / METRICS_FILE).write_text('{"checkpoint": "a.pt", "miou": 0.5}')
        >>> read_metrics(folder)["miou"], read_metrics(folder, Path("b.pt"))
        (0.5, None)
    """
    path = Path(eval_dir) / METRICS_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    if checkpoint is not None:
        if Path(str(data.get("checkpoint", ""))).resolve() != Path(checkpoint).resolve():
            return None
    return data


def _file_stem(index: int, name: str) -> str:
    return f"{index:05d}_" + re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")[-80:]


@torch.no_grad()
def evaluate_model(
    model: Model,
    dataset: Any,
    spec: PreprocessSpec,
    target: EvalTarget,
    out_dir: Path | None,
    boundary_tolerance: int = 2,
    num_overlays: int = 4,
    batch_size: int = 8,
    device: str = "cpu",
    options: InferenceOptions | None = None,
) -> dict[str, Any]:
    """Score ``model`` on every sample of ``dataset`` (anything with ``load_raw`` and ``len``).

    ``model`` is any ``Tensor -> Tensor`` callable (eager, TorchScript, an ONNX Runtime model
    from ``handler.runtime.load_model``). With ``out_dir`` None nothing is written (the
    export's INT8 check scores models this way). ``options`` (TTA, sliding window) replaces
    the serving path by :func:`training.inference.segment_with_options`; None or plain
    options keep it.
    """
    n = len(dataset)
    if n == 0:
        raise ValueError("the split is empty: nothing to evaluate")
    plain = options is None or options.is_plain
    if not plain:
        options.check_for(spec)
    num_classes = len(target.class_names)
    cm = ConfusionMatrix(num_classes, target.ignore_index)
    bf = BoundaryF1(num_classes, target.ignore_index, tolerance=boundary_tolerance)
    chosen = set(overlay_indices(n, num_overlays)) if out_dir is not None else set()
    if out_dir is not None:
        overlay_dir = out_dir / "overlays"
        overlay_dir.mkdir(parents=True, exist_ok=True)
        for old in overlay_dir.glob("*.png"):  # a previous run's pictures would mislead
            old.unlink()
    for start in range(0, n, batch_size):
        samples = [dataset.load_raw(i) for i in range(start, min(start + batch_size, n))]
        images = [rgb for rgb, _, _ in samples]
        if plain:
            predictions = segment(model, images, spec, device)
        else:
            predictions = segment_with_options(model, images, spec, options, device)
        for offset, ((rgb, truth, name), (pred, _)) in enumerate(
            zip(samples, predictions, strict=True)
        ):
            truth_t, pred_t = torch.from_numpy(truth).long(), torch.from_numpy(pred)
            cm.update(pred_t, truth_t)
            bf.update(pred_t, truth_t)
            if start + offset in chosen:
                picture, _ = overlay_figure(rgb, truth, pred, target)
                figures.save_png(picture, overlay_dir / f"{_file_stem(start + offset, name)}.png")
    metrics = cm.compute()
    metrics.update(
        boundary_f1=bf.compute(),
        per_class_boundary_f1=bf.per_class(),
        boundary_tolerance=boundary_tolerance,
        num_images=n,
        class_names=list(target.class_names),
        pixels_per_class=cm.pixels_per_class(),
        confusion_matrix=cm.matrix.tolist(),
    )
    if out_dir is not None:
        (out_dir / "per_class.md").write_text(per_class_markdown(metrics, target.class_names))
        matrix_png = out_dir / "confusion_matrix.png"
        save_confusion_matrix(cm.matrix.numpy(), target.class_names, matrix_png)
    return metrics


def eval_dir_name(
    split: str = "val", data_root: Path | None = None, options: InferenceOptions | None = None
) -> str:
    """The output folder of an evaluation inside the run: ``eval`` for the plain validation
    evaluation (the one export and the archive manifest read), else
    ``eval-<split>[-root-<folder name>][-<options tag>]``.

    Example:
        >>> eval_dir_name(), eval_dir_name("test"), eval_dir_name("val", Path("/data/copy2"))
        ('eval', 'eval-test', 'eval-val-root-copy2')
        >>> eval_dir_name("val", options=InferenceOptions(flip=True))
        'eval-val-flip'
    """
    tag = options.tag if options is not None else ""
    if split == "val" and data_root is None and not tag:
        return "eval"
    parts = [split]
    if data_root is not None:
        parts.append("root-" + (Path(data_root).expanduser().resolve().name or "root"))
    if tag:
        parts.append(tag)
    return "eval-" + re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(parts))


def _data_config(recipe: Any, data_root: Path | None) -> Any:
    """The recipe's data section, pointed at ``data_root`` when given (same layout)."""
    import dataclasses

    from training.datasets import DataError

    if data_root is None:
        return recipe.data
    if recipe.data.kind == "synthetic":
        raise DataError(
            f"--data-root {data_root}: this run trained on data.kind=synthetic, which has no "
            "files to point elsewhere; drop --data-root"
        )
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise DataError(f"--data-root {data_root}: not a folder; pass the copy's root folder")
    return dataclasses.replace(recipe.data, root=str(root))


def run_evaluation(
    run_dir: Path,
    checkpoint: Path | None = None,
    device: str = "cpu",
    split: str = "val",
    data_root: Path | None = None,
    options: InferenceOptions | None = None,
    out_dir: Path | None = None,
) -> dict[str, Any]:
    """Evaluate ``run_dir``'s checkpoint (default ``checkpoints/best.pt``) on ``split`` (any
    split the dataset has; "train"/"val" are the recipe's) of the recipe's data, or of the
    same layout under ``data_root``, with optional TTA / sliding window ``options``.

    Writes ``out_dir`` (default ``run_dir/`` :func:`eval_dir_name`) and returns the metrics as
    written to its ``metrics.json`` (``nan`` → ``None``).
    """
    from training.checkpoint import load_checkpoint
    from training.config import recipe_from_dict
    from training.datasets import DataError, build_dataset
    from training.model import model_from_checkpoint

    run_dir = Path(run_dir)
    checkpoint = Path(checkpoint) if checkpoint else run_dir / "checkpoints" / "best.pt"
    ckpt = load_checkpoint(checkpoint)
    recipe = recipe_from_dict(ckpt["recipe"])
    meta = parse_metadata(ckpt["metadata"])
    spec = meta.preprocess
    if options is not None:
        options.check_for(spec)
    target = EvalTarget(meta.class_names, meta.palette, meta.ignore_index)
    data = _data_config(recipe, data_root)
    dataset = build_dataset(data, split, spec, train=False)
    names = tuple(dataset.info.class_names)
    if names != tuple(meta.class_names):
        raise DataError(
            f"{data.root}: its classes {list(names)} differ from the checkpoint's "
            f"{list(meta.class_names)}; evaluate on data labelled with the model's classes"
        )
    model = model_from_checkpoint(ckpt).to(device)
    name = eval_dir_name(split, data_root, options)
    out_dir = Path(out_dir) if out_dir else run_dir / name
    if name != "eval" and out_dir.resolve() == (run_dir / "eval").resolve():
        raise DataError(
            f"--out {out_dir}: RUN_DIR/eval holds the plain validation evaluation that export and "
            f"the archive manifest read; write this one elsewhere (default {run_dir / name})"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = evaluate_model(
        model,
        dataset,
        spec,
        target,
        out_dir,
        boundary_tolerance=recipe.eval.boundary_tolerance,
        num_overlays=recipe.eval.num_overlays,
        batch_size=recipe.data.batch_size,
        device=device,
        options=options,
    )
    resolved = {"train": recipe.data.train_split, "val": recipe.data.val_split}.get(split, split)
    result = jsonable(
        {
            "checkpoint": str(checkpoint),
            "split": resolved,
            "epoch": ckpt.get("epoch"),
            "data_root": data.root,
            "inference": (options or InferenceOptions()).describe(),
        }
        | metrics
    )
    (out_dir / METRICS_FILE).write_text(json.dumps(result, indent=2) + "\n")
    from training.tracking import for_run_dir  # the run's MLflow run, if it has one

    for_run_dir(run_dir).log_evaluation(result, out_dir)
    return result

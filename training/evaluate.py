"""Evaluate a checkpoint on the validation split: metrics, per-class table, pictures.

The model sees exactly what serving would feed it (``handler.preprocessing``, the validation
transform) and its logits are upsampled to each image's native size before the argmax, so the
scores are those of the masks a client would get back, at the labels' own resolution. (The
training loop's ``val_miou`` may be measured at ``input_size`` and so differ slightly.)

Writes ``run_dir/eval/``: ``metrics.json``, ``per_class.md``, ``confusion_matrix.png``
(row-normalised: each row shows where that class's pixels went) and ``overlays/*.png``
(image | truth | prediction | errors, for ``eval.num_overlays`` evenly spaced samples).

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
from PIL import Image

from handler.artifact import parse_metadata
from handler.preprocessing import PreprocessSpec
from training.metrics import BoundaryF1, ConfusionMatrix, jsonable
from training.predict import Model, segment

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
        >>> overlay_indices(10, 4)
        [0, 3, 6, 9]
    """
    if num_overlays <= 0 or num_samples <= 0:
        return []
    if num_overlays >= num_samples:
        return list(range(num_samples))
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

    lines = [
        f"mIoU {cell(metrics['miou'])} · pixel accuracy {cell(metrics['pixel_accuracy'])} · "
        f"mean Dice {cell(metrics['mean_dice'])} · boundary F1 {cell(metrics['boundary_f1'])} "
        f"(tolerance {metrics['boundary_tolerance']} px) · {metrics['num_images']} images",
        "",
        "| class | IoU | accuracy | Dice | pixels |",
        "|---|---:|---:|---:|---:|",
    ]
    for i, name in enumerate(class_names):
        lines.append(
            f"| {name} | {cell(metrics['per_class_iou'][i])} | "
            f"{cell(metrics['per_class_accuracy'][i])} | {cell(metrics['per_class_dice'][i])} | "
            f"{metrics['pixels_per_class'][i]} |"
        )
    return "\n".join(lines) + "\n"


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
) -> dict[str, Any]:
    """Score ``model`` on every sample of ``dataset`` (anything with ``load_raw`` and ``len``).

    ``model`` is any ``Tensor -> Tensor`` callable (eager, TorchScript, an ONNX Runtime model
    from ``handler.runtime.load_model``). With ``out_dir`` None nothing is written (the
    export's INT8 check scores models this way).
    """
    n = len(dataset)
    if n == 0:
        raise ValueError("the validation split is empty: nothing to evaluate")
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
        predictions = segment(model, [rgb for rgb, _, _ in samples], spec, device)
        for offset, ((rgb, truth, name), (pred, _)) in enumerate(
            zip(samples, predictions, strict=True)
        ):
            truth_t, pred_t = torch.from_numpy(truth).long(), torch.from_numpy(pred)
            cm.update(pred_t, truth_t)
            bf.update(pred_t, truth_t)
            if start + offset in chosen:
                panel = overlay_panel(rgb, truth, pred, target)
                Image.fromarray(panel).save(overlay_dir / f"{_file_stem(start + offset, name)}.png")
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


def run_evaluation(
    run_dir: Path, checkpoint: Path | None = None, device: str = "cpu"
) -> dict[str, Any]:
    """Evaluate ``run_dir``'s checkpoint (default ``checkpoints/best.pt``) into ``run_dir/eval``.

    Returns the metrics as written to ``eval/metrics.json`` (``nan`` → ``None``).
    """
    from training.checkpoint import load_checkpoint
    from training.config import recipe_from_dict
    from training.datasets import build_dataset
    from training.model import model_from_checkpoint

    run_dir = Path(run_dir)
    checkpoint = Path(checkpoint) if checkpoint else run_dir / "checkpoints" / "best.pt"
    ckpt = load_checkpoint(checkpoint)
    recipe = recipe_from_dict(ckpt["recipe"])
    meta = parse_metadata(ckpt["metadata"])
    spec = meta.preprocess
    target = EvalTarget(meta.class_names, meta.palette, meta.ignore_index)
    model = model_from_checkpoint(ckpt).to(device)
    dataset = build_dataset(recipe.data, "val", spec, train=False)
    out_dir = run_dir / "eval"
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
    )
    result = jsonable(
        {"checkpoint": str(checkpoint), "split": recipe.data.val_split, "epoch": ckpt.get("epoch")}
        | metrics
    )
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    return result

"""The model card: ``RUN_DIR/MODEL_CARD.md``, written from what the run has on disk.

Two halves. :func:`collect_card_facts` reads the run through each file's own reader (the
metadata: ``handler.artifact.load_metadata``, else the checkpoint's copy; ``eval/metrics.json``:
``training.evaluate.read_metrics``; ``metrics.jsonl``: ``training.train.read_history``; split
lists: ``training.layouts.read_listing``) and measures what no file records (the exported
TorchScript's latency). :func:`render_card` turns those plain dicts into Markdown and reads
nothing, so every sentence of the card is testable from a dict.

What the card holds: name and version, intended and out-of-scope use, the data (kind, root,
splits and the counts recorded), the classes with their colours, the evaluation (evaluate's
own per-class table and summary), the input policy (the metadata's preprocessing and what the
handler refuses, from ``handler.imaging``), latency, the export's parity figures, limitations
derived from the numbers (classes under ``low_iou``, classes the evaluation never saw, input
sizes unlike the training images, the synthetic-data caveat) and the resolved recipe.

``make archive`` writes the card when it is missing or older than the files it is made of and
packs it into the ``.mar`` (``serving/archive.py --model-card``).

Example:
    >>> write_card(Path("runs/default")).name  # doctest: +SKIP
    'MODEL_CARD.md'
    >>> low_iou_classes(["background", "pole"], [0.93, 0.12], LOW_IOU)
    ([('pole', 0.12)], [])
"""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from handler.artifact import METADATA_FILE, MODEL_CARD_FILE, MODEL_FILE, load_metadata
from handler.imaging import ACCEPTED_FORMATS, DEFAULT_MAX_PIXELS, MAX_JPEG_SCANS

LOW_IOU = 0.5  # a class under this IoU is named in the limitations
LATENCY_FORWARDS = 20
FEW_EVAL_IMAGES = 50  # fewer evaluation images than this: the figures are called noisy


class CardError(ValueError):
    """The card cannot be written (not a run folder, a bad option); the message says the fix."""


# --- reading the run -----------------------------------------------------------------------------


def _run_metadata(run_dir: Path) -> tuple[dict[str, Any], str, Path]:
    """(metadata dict, where it came from, the checkpoint it describes): the export's, which is
    what gets served, else the checkpoint's own copy."""
    from handler.artifact import parse_metadata
    from training.checkpoint import load_checkpoint

    exported = run_dir / "export" / METADATA_FILE
    checkpoint = run_dir / "checkpoints" / "best.pt"
    if exported.is_file():
        meta = load_metadata(exported)
        source = Path(meta.source_checkpoint) if meta.source_checkpoint else checkpoint
        return meta.to_dict(), f"export/{METADATA_FILE}", source
    if checkpoint.is_file():
        meta = parse_metadata(load_checkpoint(checkpoint)["metadata"])
        return meta.to_dict(), "checkpoints/best.pt", checkpoint
    raise CardError(
        f"{run_dir}: not a training run (no export/{METADATA_FILE}, no checkpoints/best.pt); "
        "pass the folder `python -m training train --run-dir R` wrote (e.g. runs/default)"
    )


def _split_counts(
    run_dir: Path, data: Mapping[str, Any], evaluation: Mapping[str, Any] | None
) -> dict[str, int]:
    """Images per split where the run records them: the synthetic recipe's counts, the split
    lists a ``data.split`` run wrote, the evaluated split's ``num_images``."""
    from training.datasets import DataError
    from training.layouts import read_listing
    from training.splits import SPLIT_NAMES

    counts: dict[str, int] = {}
    if data.get("kind") == "synthetic":
        synthetic = data.get("synthetic") or {}
        counts = {"train": int(synthetic["num_train"]), "val": int(synthetic["num_val"])}
    split = data.get("split")
    if isinstance(split, Mapping) and data.get("root"):
        folder = Path(split.get("dir") or run_dir / "splits")
        for name in SPLIT_NAMES:
            try:
                counts[name] = len(read_listing(folder / f"{name}.txt", Path(data["root"])))
            except DataError:  # lists gone or data moved: that count is simply not known
                pass
    if evaluation and evaluation.get("split"):
        counts.setdefault(str(evaluation["split"]), int(evaluation["num_images"]))
    return counts


def cpu_name() -> str:
    """This machine's CPU model (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def check_latency_options(device: str, forwards: int, at_least: int = 0) -> None:
    """Refuse a latency that cannot be measured here before anything is read or written."""
    if forwards < at_least:
        raise CardError(f"--forwards must be >= {at_least}, got {forwards}")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise CardError(f"--device {device}: CUDA is not available here; use --device cpu")
    elif device != "cpu":
        raise CardError(f"--device {device!r}: use cpu, cuda or cuda:N")


def measure_latency(
    model_path: Path, input_size: Sequence[int], device: str = "cpu", forwards: int = 20
) -> dict[str, Any]:
    """Median milliseconds of ``forwards`` batch-1 forwards of the exported TorchScript at
    ``input_size``, after warm-up, timed by ``handler.runtime.time_runtimes`` (the handler's
    loader), so the card and the archiver's ``--runtime auto`` measure the same thing."""
    import torch

    from handler.artifact import TORCHSCRIPT
    from handler.runtime import time_runtimes

    check_latency_options(device, forwards, at_least=1)
    size = (int(input_size[0]), int(input_size[1]))
    median = time_runtimes({TORCHSCRIPT: model_path}, size, device, forwards)[TORCHSCRIPT]
    if device.startswith("cuda"):
        where = f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    else:
        where = f"CPU ({cpu_name()}, {os.cpu_count()} cores)"
    try:  # other processes' load is not ours to control; a busy machine slows every forward
        load = round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):  # not on every platform
        load = None
    return {
        "median_ms": round(median, 2),
        "forwards": forwards,
        "input": [1, 3, *size],
        "runtime": TORCHSCRIPT,
        "device": where,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_average": load,
    }


def collect_card_facts(
    run_dir: Path,
    low_iou: float = LOW_IOU,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    latency_forwards: int = LATENCY_FORWARDS,
    device: str = "cpu",
) -> dict[str, Any]:
    """Everything the card says about ``run_dir``, as plain dicts (:func:`render_card`'s input).

    ``latency_forwards`` 0: latency is not measured (the card says so).
    """
    from training.evaluate import read_metrics
    from training.train import read_history

    run_dir = Path(run_dir)
    check_latency_options(device, latency_forwards)
    if not run_dir.is_dir():
        raise CardError(
            f"--run-dir {run_dir}: no such folder; pass a training run's folder "
            "(`python -m training train --run-dir R` writes one, e.g. runs/default)"
        )
    metadata, meta_source, checkpoint = _run_metadata(run_dir)
    recipe = metadata.get("recipe") or {}
    sources = [meta_source]
    evaluate_hint = f"run `python -m training evaluate --run-dir {run_dir}`"
    evaluation = read_metrics(run_dir / "eval", checkpoint)
    not_evaluated = None
    if evaluation is not None:
        sources.append("eval/metrics.json")
    elif (other := read_metrics(run_dir / "eval")) is not None:
        not_evaluated = (
            f"not evaluated: eval/metrics.json scores {other.get('checkpoint')}, not this "
            f"model's {checkpoint}; {evaluate_hint}"
        )
    else:
        not_evaluated = f"not evaluated: {evaluate_hint}"
    epochs = int((recipe.get("train") or {}).get("epochs") or 10**9)
    history = read_history(run_dir, epochs)
    if history:
        sources.append("metrics.jsonl")
    model_path = run_dir / "export" / MODEL_FILE
    latency, latency_note = None, None
    if not model_path.is_file():
        latency_note = (
            f"not measured: no exported model; run `python -m training export --run-dir {run_dir}`"
        )
    elif latency_forwards <= 0:
        latency_note = "not measured (--forwards 0)"
    else:
        # Nothing in a run records a latency (the export checks parity, not speed; the
        # benchmarks write to benchmarks/results/), so the card measures one here.
        latency = measure_latency(model_path, metadata["preprocess"]["input_size"], device,
                                  latency_forwards)  # fmt: skip
    return {
        "run_dir": str(run_dir),
        "sources": sources,
        "metadata": metadata,
        "evaluation": evaluation,
        "not_evaluated": not_evaluated,
        "history": history,
        "splits": _split_counts(run_dir, recipe.get("data") or {}, evaluation),
        "latency": latency,
        "latency_note": latency_note,
        "input_limits": {
            "max_pixels": max_pixels,
            "formats": list(ACCEPTED_FORMATS),
            "max_jpeg_scans": MAX_JPEG_SCANS,
        },
        "low_iou": low_iou,
    }


def write_card(
    run_dir: Path,
    out: Path | None = None,
    low_iou: float = LOW_IOU,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    latency_forwards: int = LATENCY_FORWARDS,
    device: str = "cpu",
) -> Path:
    """Write ``run_dir``'s card to ``out`` (default ``run_dir/MODEL_CARD.md``); returns its path."""
    facts = collect_card_facts(run_dir, low_iou, max_pixels, latency_forwards, device)
    out = Path(out) if out else Path(run_dir) / MODEL_CARD_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_text(render_card(facts), encoding="utf-8")
    os.replace(tmp, out)  # `make archive` must never pack a half-written card
    return out


# --- rendering (pure) ----------------------------------------------------------------------------


def hex_colour(rgb: Sequence[int]) -> str:
    """``#rrggbb`` of a palette entry.

    >>> hex_colour([230, 25, 75])
    '#e6194b'
    """
    return "#" + "".join(f"{int(c):02x}" for c in rgb)


def fmt(value: Any, digits: int = 4) -> str:
    """A score for the card: "—" when undefined (``None``/NaN, a class the split lacks).

    >>> fmt(0.123456), fmt(None), fmt(float("nan"))
    ('0.1235', '—', '—')
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}f}"


def size_text(size: Sequence[int]) -> str:
    """``(H, W)`` as the card writes it: width × height, as an image viewer shows it.

    >>> size_text([96, 128])
    '128×96'
    """
    return f"{int(size[1])}×{int(size[0])}"


def low_iou_classes(
    class_names: Sequence[str], per_class_iou: Sequence[float | None], threshold: float
) -> tuple[list[tuple[str, float]], list[str]]:
    """(classes under ``threshold`` with their IoU, classes with no IoU: absent from the split).

    >>> low_iou_classes(["bg", "pole", "sign"], [0.9, 0.2, None], 0.5)
    ([('pole', 0.2)], ['sign'])
    """
    low, unmeasured = [], []
    for name, iou in zip(class_names, per_class_iou, strict=True):
        if iou is None or (isinstance(iou, float) and math.isnan(iou)):
            unmeasured.append(name)
        elif iou < threshold:
            low.append((name, float(iou)))
    return low, unmeasured


def _is_synthetic(facts: Mapping[str, Any]) -> bool:
    return ((facts["metadata"].get("recipe") or {}).get("data") or {}).get("kind") == "synthetic"


def _uses(facts: Mapping[str, Any]) -> list[str]:
    meta = facts["metadata"]
    names = ", ".join(meta["class_names"])
    if _is_synthetic(facts):
        intended = [
            "Demonstrating and testing the segserve pipeline (recipe → training → evaluation → "
            "export → TorchServe → client) on the embedded synthetic scenes "
            f"(`training/synthetic.py`): it labels each pixel as one of {names}."
        ]
    else:
        data = (meta.get("recipe") or {}).get("data") or {}
        intended = [
            f"Semantic segmentation of images like the `{data.get('kind')}` data it was trained "
            f"on (`{data.get('root')}`): each pixel labelled as one of {len(meta['class_names'])} "
            f"classes ({names})."
        ]
    out_of_scope = [
        "Images unlike the training data (another domain, camera, viewpoint or scale): the "
        "figures below do not transfer; evaluate on your own data first "
        "(`python -m training evaluate --run-dir R --data-root PATH`).",
        "Anything outside the classes above: every pixel gets one of them, there is no "
        '"unknown" answer, so an unseen object is labelled as the nearest known class.',
        "Decisions about people or safety without a validation of your own.",
    ]
    if _is_synthetic(facts):
        out_of_scope.insert(0, "Real photographs: it has never seen one.")
    return ["## Intended use", "", *intended, "", "## Out-of-scope use", "",
            *(f"- {line}" for line in out_of_scope), ""]  # fmt: skip


def _data(facts: Mapping[str, Any]) -> list[str]:
    meta = facts["metadata"]
    data = (meta.get("recipe") or {}).get("data") or {}
    if data.get("kind") == "synthetic":
        synthetic = data.get("synthetic") or {}
        what = (
            f"the embedded synthetic scenes (`data.kind: synthetic`, mode "
            f"`{synthetic.get('mode', 'default')}`, seed {synthetic.get('seed')}, images "
            f"{size_text(synthetic.get('image_size', [0, 0]))}), drawn in memory, no files"
        )
    else:
        what = f"`data.kind: {data.get('kind')}` at `{data.get('root')}`"
    lines = ["## Data", "", f"- Dataset: {what}."]
    roles = {"train": data.get("train_split", "train"), "val": data.get("val_split", "val")}
    counts = facts["splits"]
    parts = []
    for role, name in roles.items():
        n = counts.get(role, counts.get(name))
        label = role if name == role else f"{role} (`{name}`)"
        parts.append(f"{label}: {n} images" if n is not None else f"{label}: count not recorded")
    named = {*roles, *roles.values()}
    parts += [f"{name}: {n} images" for name, n in counts.items() if name not in named]
    lines.append("- Splits: " + " · ".join(parts) + ".")
    if data.get("class_map"):
        lines.append(
            "- Classes remapped from the dataset's own by `data.class_map` (recipe below)."
        )
    lines += [f"- Pixels labelled {meta.get('ignore_index')} are ignored in training and "
              "evaluation.", ""]  # fmt: skip
    lines += ["## Classes", "", "| id | class | colour (RGB) |", "|---:|---|---|"]
    for i, (name, rgb) in enumerate(zip(meta["class_names"], meta["palette"], strict=True)):
        lines.append(f"| {i} | {name} | `{hex_colour(rgb)}` ({', '.join(map(str, rgb))}) |")
    return [*lines, ""]


def _evaluation(facts: Mapping[str, Any]) -> list[str]:
    from training.evaluate import per_class_markdown

    lines = ["## Evaluation", ""]
    evaluation = facts["evaluation"]
    if evaluation is None:
        return [*lines, f"**{facts['not_evaluated']}**", ""]
    inference = evaluation.get("inference") or {}
    how = ", ".join(f"{k} {v}" for k, v in inference.items() if v not in (None, False, [1.0]))
    lines += [
        f"Split `{evaluation.get('split')}` ({evaluation.get('num_images')} images), checkpoint "
        f"`{evaluation.get('checkpoint')}` (epoch {evaluation.get('epoch')}), scored at each "
        "image's own resolution through the serving preprocessing"
        + (f", inference: {how}" if how else "")
        + ".",
        "",
        per_class_markdown(evaluation, facts["metadata"]["class_names"]).rstrip("\n"),
        "",
    ]
    return lines


def _input_policy(facts: Mapping[str, Any]) -> list[str]:
    pre = facts["metadata"]["preprocess"]
    limits = facts["input_limits"]
    size = size_text(pre["input_size"])
    if pre["resize_policy"] == "resize":
        policy = (
            f"`resize`: every image is resized ({pre.get('interpolation', 'bilinear')}) to "
            f"{size}; the logits are upsampled back to the image's own size before the argmax, "
            "so the mask has the input's size."
        )
    else:
        policy = (
            f"`pad`: images keep their native resolution, padded at the bottom/right to "
            f"multiples of {pre['size_divisor']} and cropped back (trained on {size} crops)."
        )
    return [
        "## Input policy",
        "",
        f"- Input size {size}; resize policy {policy}",
        f"- Normalisation: RGB scaled to [0, 1], then mean {list(pre['mean'])}, "
        f"std {list(pre['std'])}.",
        f"- Accepted formats: {', '.join(limits['formats'])} (EXIF orientation applied, alpha "
        "composited onto white, first frame of a multi-frame file).",
        f"- Refused by the handler: more than {limits['max_pixels']:,} pixels (width × height "
        "from the header, before decoding: 413; the archive's `--max-pixels` sets it), "
        f"JPEGs with more than {limits['max_jpeg_scans']} scans, empty bodies and non-images "
        "(415).",
        "",
    ]


def _latency(facts: Mapping[str, Any]) -> list[str]:
    latency = facts["latency"]
    if latency is None:
        return ["## Latency", "", f"{facts['latency_note']}.", ""]
    shape = "×".join(map(str, latency["input"]))
    load = latency.get("load_average")
    busy = f" (1-minute load average {load} when measured)" if load is not None else ""
    return [
        "## Latency",
        "",
        f"Median {latency['median_ms']:.2f} ms per forward of the exported "
        f"{latency['runtime']} model, input {shape}, batch 1, median of "
        f"{latency['forwards']} forwards after warm-up, on {latency['device']} with "
        f"{latency['threads']} torch thread(s){busy}, torch {latency['torch']}, measured by "
        "`python -m training card`. Model forward only: decoding, preprocessing, "
        "post-processing and the network add to it (docs/performance.md, `make bench`).",
        "",
    ]


def _export(facts: Mapping[str, Any]) -> list[str]:
    export = facts["metadata"].get("export")
    if not export:
        return []
    lines = ["## Export", "", f"`{export['format']}` ({export['method']}), torch "
             f"{export['torch_version']}; checked against the eager model:", ""]  # fmt: skip
    for name, rt in export.get("runtimes", {}).items():
        parity = rt.get("parity") or {}
        sizes = ", ".join(size_text(s) for s in parity.get("sizes", []))
        if rt.get("miou_drop") is not None:
            figures = (
                f"argmax agreement {fmt(parity.get('argmax_agreement'))}, val mIoU "
                f"{fmt(rt.get('val_miou'))} vs fp32 {fmt(rt.get('val_miou_fp32'))} (drop "
                f"{fmt(rt['miou_drop'])}, limit {parity.get('max_miou_drop')})"
            )
        else:
            figures = (
                f"max |logit diff| {parity.get('max_abs_logit_diff', float('nan')):.3g}, "
                f"argmax equal: {parity.get('argmax_equal')}"
            )
        lines.append(f"- {name} (`{rt['file']}`): {figures}; sizes {sizes or '—'}.")
    return [*lines, ""]


def limitations(facts: Mapping[str, Any]) -> list[str]:
    """The card's limitations, each derived from a number or a fact of the run."""
    meta = facts["metadata"]
    data = (meta.get("recipe") or {}).get("data") or {}
    out: list[str] = []
    evaluation = facts["evaluation"]
    if evaluation is None:
        out.append(f"Quality unknown: {facts['not_evaluated']}.")
    else:
        split, threshold = evaluation.get("split"), facts["low_iou"]
        low, unmeasured = low_iou_classes(
            meta["class_names"], evaluation["per_class_iou"], threshold
        )
        if low:
            named = ", ".join(f"{name} ({iou:.2f})" for name, iou in low)
            out.append(
                f"IoU below {threshold:.2f} on `{split}`: {named}; expect these classes to be "
                "missed or confused with others."
            )
        if unmeasured:
            out.append(
                f"Not measured: {', '.join(unmeasured)} has no pixels in `{split}`, so its "
                "IoU is undefined and the model's behaviour on it unknown."
            )
        if int(evaluation.get("num_images") or 0) < FEW_EVAL_IMAGES:
            out.append(
                f"The evaluation has {evaluation.get('num_images')} images (under "
                f"{FEW_EVAL_IMAGES}): the per-class figures are noisy."
            )
    out.append(_size_limitation(meta["preprocess"], data))
    if data.get("kind") == "synthetic":
        out.append(
            "Synthetic data: trained and evaluated on the embedded generator's procedural "
            "shapes, so every figure here is about those scenes; it says nothing about real "
            "images. This model demonstrates the pipeline."
        )
    return out


def _size_limitation(pre: Mapping[str, Any], data: Mapping[str, Any]) -> str:
    size = size_text(pre["input_size"])
    scale = (data.get("augment") or {}).get("scale")
    scales = f" with scale augmentation ×{scale[0]}–{scale[1]}" if scale else ""
    if data.get("kind") == "synthetic":
        seen = f"{size_text((data.get('synthetic') or {}).get('image_size', [0, 0]))} images"
    else:
        seen = "the training images (sizes: `python -m training check-data`'s report)"
    if pre["resize_policy"] == "resize":
        h, w = (int(v) for v in pre["input_size"])
        ratio = f"{w // math.gcd(w, h)}:{h // math.gcd(w, h)}"
        return (
            f"Input sizes: trained on {seen}{scales}, each resized to {size}. Any image is "
            f"resized to {size} too: a 1920×1080 photo shrinks {1920 / w:.0f}× in width, so "
            f"structures narrower than about {math.ceil(1920 / w)} px in it vanish, and aspect "
            f"ratios other than {ratio} are stretched."
        )
    return (
        f"Input sizes: trained on {size} crops of {seen}{scales} at native resolution; images "
        "whose objects appear at other scales (a higher-resolution camera, a closer view) are "
        "outside the training distribution."
    )


def _training(facts: Mapping[str, Any]) -> list[str]:
    meta = facts["metadata"]
    lines = ["## Training", ""]
    weights = meta.get("encoder_weights") or "none (random init)"
    lines.append(
        f"{meta.get('architecture')} / {meta.get('encoder')}, encoder weights {weights}, "
        f"{len(meta['class_names'])} classes."
    )
    history = facts["history"]
    if history:
        best = max(history, key=lambda r: r.get("val_miou") or -1.0)
        last = history[-1]
        lines.append(
            f"{len(history)} epoch(s) in metrics.jsonl; best training-loop val mIoU "
            f"{fmt(best.get('val_miou'))} at epoch {best.get('epoch')} (measured at the input "
            f"size, so it may differ from the evaluation); last epoch: train loss "
            f"{fmt(last.get('train_loss'))}, val loss {fmt(last.get('val_loss'))}, "
            f"{fmt(last.get('images_per_s'), 1)} images/s."
        )
    recipe = yaml.safe_dump(meta.get("recipe") or {}, sort_keys=False).rstrip("\n")
    lines += ["", "<details><summary>Training recipe (resolved)</summary>", "", "```yaml",
              recipe, "```", "", "</details>", ""]  # fmt: skip
    return lines


def render_card(facts: Mapping[str, Any]) -> str:
    """The Markdown of the card from :func:`collect_card_facts`' dicts; reads no file."""
    meta = facts["metadata"]
    sources = ", ".join(f"`{s}`" for s in facts["sources"])
    lines = [
        f"# Model card: {meta['model_name']} {meta['model_version']}",
        "",
        f"{meta.get('architecture')} / {meta.get('encoder')} semantic segmentation, "
        f"{len(meta['class_names'])} classes. Written by `python -m training card --run-dir "
        f"{facts['run_dir']}` from {sources}. Image sizes are width×height in pixels.",
        "",
        *_uses(facts),
        *_data(facts),
        *_evaluation(facts),
        *_input_policy(facts),
        *_latency(facts),
        *_export(facts),
        "## Limitations",
        "",
        *(f"- {line}" for line in limitations(facts)),
        "",
        *_training(facts),
    ]
    return "\n".join(lines).rstrip("\n") + "\n"

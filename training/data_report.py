"""What ``python -m training check-data`` shows about a dataset, besides its problems.

While check-data reads every sample, a :class:`DataSurvey` counts each split's label pixels
per class (and the images each class appears in), records every image size, and keeps a few
evenly spaced samples. :meth:`DataSurvey.write` then puts into a folder (the CLI's default:
``<recipe output_dir>/check-data/``, next to the run the recipe will train):

* ``report.md`` — samples per split, image sizes (height and width min/median/max, the number
  of distinct sizes, the commonest ones) and the class pixel distribution table;
* ``class_distribution.csv`` — the same distribution, one row per split and class;
* ``class_distribution.png`` — bar charts of it, one per split, each bar in the class colour;
* ``samples.png`` — a grid of samples (image | mask in the dataset's palette, ignored pixels
  white) with a legend of every class id, name and colour: check the label ids and colours
  before training on them;
* ``summary.json`` — all of the above as numbers.

Example:
    >>> from handler.preprocessing import PreprocessSpec
    >>> from training.config import DataConfig, SyntheticConfig
    >>> from training.datasets import build_dataset
    >>> cfg = DataConfig(synthetic=SyntheticConfig(num_train=2, num_val=1, image_size=(32, 48)))
    >>> survey = DataSurvey(samples_per_split=1)
    >>> dataset = build_dataset(cfg, "val", PreprocessSpec((32, 32)), train=False)
    >>> survey.start_split("val", dataset)
    >>> survey.add("val", 0, *dataset.load_raw(0))
    >>> survey.summary()["splits"]["val"]["sizes"]["distinct"]
    1
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from training import figures
from training.evaluate import IGNORE_COLOUR, colourise, overlay_indices

# Sample pictures are shown at this height (nearest-upscaled when smaller, shrunk when larger).
CELL_HEIGHT = 224
REPORT_FILES = (
    "report.md",
    "class_distribution.csv",
    "class_distribution.png",
    "samples.png",
    "summary.json",
)


@dataclass
class SplitSurvey:
    """One split's counts: label pixels and images per class, sizes, the kept samples."""

    num_samples: int
    pixels: np.ndarray
    images_with: np.ndarray
    ignored: int = 0
    other: int = 0  # values neither a class nor the ignore value (decoders reject these)
    sizes: list[tuple[int, int]] = field(default_factory=list)
    chosen: set[int] = field(default_factory=set)
    kept: list[tuple[str, np.ndarray, np.ndarray]] = field(default_factory=list)


def size_statistics(sizes: Sequence[tuple[int, int]]) -> dict[str, Any]:
    """Height and width min/median/max, distinct sizes and the five commonest ``HxW``.

    Example:
        >>> s = size_statistics([(24, 32), (24, 32), (48, 64)])
        >>> s["height"], s["distinct"], s["most_common"][0]
        ({'min': 24, 'median': 24.0, 'max': 48}, 2, ['24x32', 2])
    """
    if not sizes:
        return {"count": 0, "distinct": 0, "height": None, "width": None, "most_common": []}
    array = np.asarray(sizes, dtype=np.int64)

    def stats(values: np.ndarray) -> dict[str, Any]:
        return {
            "min": int(values.min()),
            "median": float(np.median(values)),
            "max": int(values.max()),
        }

    common = Counter(f"{h}x{w}" for h, w in sizes).most_common(5)
    return {
        "count": len(sizes),
        "distinct": len(set(map(tuple, sizes))),
        "height": stats(array[:, 0]),
        "width": stats(array[:, 1]),
        "most_common": [[size, n] for size, n in common],
    }


class DataSurvey:
    """Per split statistics and kept samples; fed by check-data, written by :meth:`write`."""

    def __init__(self, samples_per_split: int = 4) -> None:
        self.samples_per_split = samples_per_split
        self.splits: dict[str, SplitSurvey] = {}
        self.info: Any = None  # training.datasets.DatasetInfo of the first split started

    def start_split(self, split: str, dataset: Any) -> None:
        """Begin ``split`` of ``dataset`` (anything with ``info`` and ``len``)."""
        if self.info is None:
            self.info = dataset.info
        c = self.info.num_classes
        self.splits[split] = SplitSurvey(
            num_samples=len(dataset),
            pixels=np.zeros(c, np.int64),
            images_with=np.zeros(c, np.int64),
            chosen=set(overlay_indices(len(dataset), self.samples_per_split)),
        )

    def add(self, split: str, index: int, rgb: np.ndarray, mask: np.ndarray, name: str) -> None:
        """Count sample ``index`` of ``split`` (an untransformed ``load_raw`` sample)."""
        s, info = self.splits[split], self.info
        c = info.num_classes
        s.sizes.append((int(rgb.shape[0]), int(rgb.shape[1])))
        ignored = mask == info.ignore_index
        valid = (mask >= 0) & (mask < c) & ~ignored
        counts = np.bincount(mask[valid].ravel().astype(np.int64), minlength=c)[:c]
        s.pixels += counts
        s.images_with += counts > 0
        s.ignored += int(ignored.sum())
        s.other += int((~valid & ~ignored).sum())
        if index in s.chosen:
            shown = np.where(valid | ignored, mask, info.ignore_index)
            colours = colourise(shown, info.palette, info.ignore_index)
            image = figures.resize_to_height(np.ascontiguousarray(rgb), CELL_HEIGHT, nearest=False)
            painted = figures.resize_to_height(colours, CELL_HEIGHT, nearest=True)
            s.kept.append((f"{split} · {name} ({rgb.shape[0]}x{rgb.shape[1]})", image, painted))

    def summary(self) -> dict[str, Any]:
        """Everything as numbers (``summary.json``)."""
        splits = {}
        for split, s in self.splits.items():
            labelled = int(s.pixels.sum())
            splits[split] = {
                "samples": s.num_samples,
                "read": len(s.sizes),
                "sizes": size_statistics(s.sizes),
                "labelled_pixels": labelled,
                "ignored_pixels": s.ignored,
                "other_pixels": s.other,
                "classes": [
                    {
                        "id": i,
                        "name": name,
                        "color": list(self.info.palette[i]),
                        "pixels": int(s.pixels[i]),
                        "fraction": float(s.pixels[i]) / labelled if labelled else 0.0,
                        "images": int(s.images_with[i]),
                    }
                    for i, name in enumerate(self.info.class_names)
                ],
            }
        return {
            "class_names": list(self.info.class_names) if self.info else [],
            "ignore_index": self.info.ignore_index if self.info else None,
            "splits": splits,
        }

    def write(self, out_dir: Path) -> list[Path]:
        """Write the report files (:data:`REPORT_FILES`) into ``out_dir``; their paths."""
        if self.info is None or not any(s.sizes for s in self.splits.values()):
            raise ValueError("no sample could be read: nothing to report")
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        summary = self.summary()
        paths = [out_dir / name for name in REPORT_FILES]
        paths[0].write_text(report_markdown(summary))
        write_distribution_csv(summary, paths[1])
        plot_distribution(summary, paths[2])
        figures.save_png(self.sample_grid(), paths[3])
        paths[4].write_text(json.dumps(summary, indent=2) + "\n")
        return paths

    def sample_grid(self) -> np.ndarray:
        """The kept samples, image | mask with a caption each, two per row, then a legend."""
        size = figures.font_size_for(CELL_HEIGHT * 2)
        cells = []
        for s in self.splits.values():
            for caption, image, painted in s.kept:
                row = figures.grid([image, painted], columns=2)
                text = figures.text_strip([caption], [(0, row.shape[1])], row.shape[1], size)
                cells.append(figures.stack([text, row]))
        picture = figures.grid(cells, columns=2)
        entries = figures.class_legend(self.info.class_names, self.info.palette)
        entries.append(figures.LegendEntry(f"ignored ({self.info.ignore_index})", IGNORE_COLOUR))
        width = max(picture.shape[1], 480)
        return figures.stack([picture, figures.legend(entries, width, size)])


def _hex(colour: Sequence[int]) -> str:
    return "#" + "".join(f"{int(c):02x}" for c in colour)


def report_markdown(summary: dict[str, Any]) -> str:
    """``report.md``: samples, image sizes and the class distribution, split by split."""
    splits = summary["splits"]
    lines = [
        "# Data report",
        "",
        "| split | samples | read | distinct sizes | height min / median / max "
        "| width min / median / max | most common |",
        "|---|---:|---:|---:|---|---|---|",
    ]
    for split, s in splits.items():
        z = s["sizes"]
        if not z["count"]:
            lines.append(f"| {split} | {s['samples']} | 0 | 0 | — | — | — |")
            continue
        h, w = z["height"], z["width"]
        common = ", ".join(f"{size} ({n})" for size, n in z["most_common"][:3])
        lines.append(
            f"| {split} | {s['samples']} | {s['read']} | {z['distinct']} | "
            f"{h['min']} / {h['median']:g} / {h['max']} | {w['min']} / {w['median']:g} / "
            f"{w['max']} | {common} |"
        )
    lines += ["", "## Class pixel distribution", ""]
    head = "| id | class | colour |" + "".join(
        f" {s} pixels | {s} % | {s} images |" for s in splits
    )
    lines += [head, "|---:|---|---|" + "---:|---:|---:|" * len(splits)]
    for i, name in enumerate(summary["class_names"]):
        first = next(iter(splits.values()))["classes"][i]
        cells = "".join(
            f" {s['classes'][i]['pixels']} | {100 * s['classes'][i]['fraction']:.2f} | "
            f"{s['classes'][i]['images']} |"
            for s in splits.values()
        )
        lines.append(f"| {i} | {name} | `{_hex(first['color'])}` |{cells}")
    ignored = "".join(f" {s['ignored_pixels']} | | |" for s in splits.values())
    lines.append(f"| {summary['ignore_index']} | *ignored* | `#ffffff` |{ignored}")
    lines += [
        "",
        "% of the labelled (not ignored) pixels; images: how many images hold the class.",
        "",
        "![class distribution](class_distribution.png)",
        "",
        "![samples](samples.png)",
        "",
    ]
    return "\n".join(lines)


def write_distribution_csv(summary: dict[str, Any], path: Path) -> None:
    """One row per split and class (and one for the ignored pixels)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["split", "class_id", "class_name", "color", "pixels", "fraction", "images"]
        )
        for split, s in summary["splits"].items():
            for c in s["classes"]:
                row = [c["id"], c["name"], _hex(c["color"]), c["pixels"], f"{c['fraction']:.6f}"]
                writer.writerow([split, *row, c["images"]])
            writer.writerow(
                [split, summary["ignore_index"], "ignored", "", s["ignored_pixels"], "", ""]
            )


def plot_distribution(summary: dict[str, Any], path: Path) -> None:
    """Horizontal bars per split: % of labelled pixels per class, in the class colours."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    splits = summary["splits"]
    names = summary["class_names"]
    fig = Figure(figsize=(2.0 + 4.5 * len(splits), 1.6 + 0.32 * len(names)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(splits), sharey=True, squeeze=False)[0]
    labels = [f"{i} {name}" for i, name in enumerate(names)]
    for ax, (split, s) in zip(axes, splits.items(), strict=True):
        percent = [100 * c["fraction"] for c in s["classes"]]
        colours = [tuple(v / 255 for v in c["color"]) for c in s["classes"]]
        bars = ax.barh(range(len(names)), percent, color=colours, edgecolor="0.4")
        ax.bar_label(bars, labels=[f"{p:.1f}%" for p in percent], padding=2, fontsize=7)
        ax.set_yticks(range(len(names)), labels=labels)
        ax.set_xlim(0, max(max(percent, default=0) * 1.25, 1))
        ax.set_xlabel("% of labelled pixels")
        ax.set_title(f"{split}: {s['read']} images")
    axes[0].invert_yaxis()  # class 0 on top; once, as the y axis is shared
    fig.suptitle("class pixel distribution")
    fig.tight_layout()
    fig.savefig(path, dpi=100)

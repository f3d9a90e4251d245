"""Seeded train/val/test splits of a dataset without split folders (``data.split``).

``data.split: {val: 0.15, test: 0.15}`` divides every sample of a flat folder, a LabelMe
folder or a CVAT export: a permutation drawn from ``data.split.seed`` (its own seed, not the
recipe's, so a sweep over ``seed`` keeps one val set) over the samples sorted by path.

Training writes the draw into ``RUN_DIR/splits/{train,val,test}.txt`` (the listing-file
format :func:`training.layouts.read_listing` reads: one ``image mask`` line per sample) and
records that folder as ``data.split.dir`` in the run's recipe, so evaluation, export and
``--resume`` read the same lists, never a new draw, even after images were added. A new run
draws again (the same split while the files are the same); ``data.split.dir: runs/old/splits``
reuses an earlier run's lists exactly.

Example:
    >>> pool = [Sample(Path(f"i{k}.png"), Path(f"m{k}.png")) for k in range(10)]
    >>> drawn = draw_split(pool, val=0.2, test=0.1, seed=0)
    >>> {name: len(s) for name, s in drawn.items()}
    {'train': 7, 'val': 2, 'test': 1}
    >>> drawn == draw_split(list(reversed(pool)), val=0.2, test=0.1, seed=0)
    True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from training.config import DataConfig, Recipe
from training.datasets import DataError, Sample

SPLIT_NAMES = ("train", "val", "test")


def _count(fraction: float, n: int) -> int:
    """How many of ``n`` samples ``fraction`` takes: at least one when it is above 0."""
    return 0 if fraction <= 0 else max(1, round(fraction * n))


def draw_split(
    pool: Sequence[Sample], val: float, test: float, seed: int
) -> dict[str, list[Sample]]:
    """Divide ``pool`` into train/val/test; the same pool and seed always give the same split,
    whatever order the pool comes in. Each split keeps path order."""
    order = sorted(pool, key=lambda s: (s.image.as_posix(), s.mask.as_posix()))
    n = len(order)
    n_val, n_test = _count(val, n), _count(test, n)
    if n - n_val - n_test < 1:
        raise DataError(
            f"data.split: {n} sample(s) cannot give {n_val} val + {n_test} test and leave any "
            "for training; add data or lower data.split.val / data.split.test"
        )
    perm = np.random.default_rng(seed).permutation(n)
    picks = {
        "train": perm[n_val + n_test :],
        "val": perm[:n_val],
        "test": perm[n_val : n_val + n_test],
    }
    return {name: [order[i] for i in sorted(idx.tolist())] for name, idx in picks.items()}


def has_lists(folder: Path) -> bool:
    """Whether ``folder`` holds all three split lists (a complete earlier draw)."""
    return all((folder / f"{name}.txt").is_file() for name in SPLIT_NAMES)


def split_samples(cfg: DataConfig, split: str, pool: Callable[[], list[Sample]]) -> list[Sample]:
    """The samples of ``split``: read from ``data.split.dir`` when it holds the lists, else
    drawn from ``pool()`` in memory (the same draw training writes)."""
    from training.layouts import read_listing

    assert cfg.split is not None and cfg.root
    if split not in SPLIT_NAMES:
        raise DataError(
            f"data.split makes the splits {list(SPLIT_NAMES)}, not {split!r}; set "
            "data.train_split / data.val_split to one of them"
        )
    if split == "test" and cfg.split.test <= 0:
        raise DataError("data.split.test is 0, so there is no test split; set data.split.test")
    root = Path(cfg.root).expanduser()
    if cfg.split.dir is not None and has_lists(Path(cfg.split.dir)):
        return read_listing(Path(cfg.split.dir) / f"{split}.txt", root)
    return draw_split(pool(), cfg.split.val, cfg.split.test, cfg.split.seed)[split]


def with_split_dir(recipe: Recipe, run_dir: Path) -> Recipe:
    """``recipe`` with ``data.split.dir`` set to ``RUN_DIR/splits`` (absolute) when it splits
    and names no folder itself; unchanged otherwise.

    Example:
        >>> from training.config import SplitConfig
        >>> r = Recipe(data=DataConfig(kind="folder", root="d", split=SplitConfig()))
        >>> with_split_dir(r, Path("/runs/a")).data.split.dir
        '/runs/a/splits'
        >>> with_split_dir(Recipe(), Path("/runs/a")) == Recipe()
        True
    """
    split = recipe.data.split
    if split is None or split.dir is not None:
        return recipe
    folder = str((Path(run_dir) / "splits").resolve())
    data = dataclasses.replace(recipe.data, split=dataclasses.replace(split, dir=folder))
    return dataclasses.replace(recipe, data=data)


def write_split_lists(cfg: DataConfig) -> Path | None:
    """Draw the split and write ``data.split.dir/{train,val,test}.txt`` unless the folder
    already holds them (then they are kept as they are); the folder, or None without
    ``data.split``."""
    from training.datasets import _root
    from training.layouts import split_pool, write_listing

    if cfg.split is None or cfg.split.dir is None:
        return None
    folder = Path(cfg.split.dir)
    if has_lists(folder):
        return folder
    drawn = draw_split(split_pool(cfg, _root(cfg)), cfg.split.val, cfg.split.test, cfg.split.seed)
    for name in SPLIT_NAMES:
        write_listing(folder / f"{name}.txt", drawn[name])
    return folder

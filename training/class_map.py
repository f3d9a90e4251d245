"""Class maps: train on a dataset's classes merged, renamed, reduced or partly ignored.

The recipe's ``data.class_map`` names the *new* classes and, for each, the dataset's *source*
classes whose pixels it takes. Its order is the new class ids. Source classes not listed go to
``others``: ``ignore`` (the default; their pixels get ``data.ignore_index`` and count for
nothing) or the name of one new class (e.g. everything else is ``background``). Sources in
``ignore`` are always ignored. Pixels the dataset already ignores stay ignored.

.. code-block:: yaml

    data:
      class_map:
        classes:                       # new class: source class(es); order = new class ids
          road: road                   # keep (a rename: `street: road`)
          person: [person, rider]      # merge
          vehicle: [car, truck, bus]
        others: ignore                 # or a new class's name, e.g. background
        ignore: []                     # sources always ignored, whatever `others` says
        colors: {vehicle: [0, 0, 142]} # optional; default: the first source class's colour

A list keeps those classes under their own names: ``classes: [person, road, car]``.

The map is applied with a lookup table to every decoded mask (after each dataset kind's own
decoder), so training, validation, evaluation, ``check-data`` and export all see the new
labels; the run's class names and palette (checkpoint, metadata, ``.mar``, served classes) are
the new ones.

Example:
    >>> from training.config import ClassMapConfig
    >>> cfg = ClassMapConfig(classes={"thing": ["disc", "box"], "ring": "ring"})
    >>> cmap = resolve_class_map(cfg, ("background", "disc", "box", "ring"),
    ...                          ((0, 0, 0), (1, 1, 1), (2, 2, 2), (3, 3, 3)), ignore_index=255)
    >>> cmap.names, cmap.palette
    (('thing', 'ring'), ((1, 1, 1), (3, 3, 3)))
    >>> cmap.apply(np.array([[0, 1, 2, 3, 255]])).tolist()
    [[255, 0, 0, 1, 255]]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from training.config import ClassMapConfig, ConfigError

IGNORE = "ignore"  # the ``others`` value that sends unlisted source classes to ignore_index
KEY = "data.class_map"


@dataclass(frozen=True)
class ClassMap:
    """A resolved map: the new classes and a source id → new id (or ignore) table."""

    names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    table: np.ndarray  # (num source classes,) int64: new id, or ignore_index
    ignore_index: int

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def apply(self, mask: np.ndarray) -> np.ndarray:
        """Source train ids → new ids; ``ignore_index`` (and anything not a source id) → ignore."""
        mask = np.asarray(mask)
        out = np.full(mask.shape, self.ignore_index, dtype=np.int64)
        known = (mask >= 0) & (mask < len(self.table))
        out[known] = self.table[mask[known]]
        return out

    def wrap(self, decode: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
        """A mask decoder that returns this map's ids instead of the source's."""

        def mapped(*args: Any, **kwargs: Any) -> np.ndarray:
            return self.apply(decode(*args, **kwargs))

        return mapped

    def sources_of(self, source_names: Sequence[str]) -> dict[str, list[str]]:
        """New class → the source classes it takes (for logs and docs)."""
        out: dict[str, list[str]] = {n: [] for n in self.names}
        for source, target in zip(source_names, self.table.tolist(), strict=True):
            if 0 <= target < len(self.names) and target != self.ignore_index:
                out[self.names[target]].append(source)
        return out


def parse_targets(cfg: ClassMapConfig) -> list[tuple[str, tuple[str, ...]]]:
    """The shape of ``data.class_map`` checked without the dataset: (new name, sources) pairs.

    Called when the recipe is loaded, so a malformed map fails before any data is read.

    Example:
        >>> parse_targets(ClassMapConfig(classes=["road", "car"]))
        [('road', ('road',)), ('car', ('car',))]
    """
    raw = cfg.classes
    if isinstance(raw, list):
        pairs = [(name, [name]) for name in raw]
    else:
        pairs = list(raw.items())
    if not pairs:
        raise ConfigError(
            f"{KEY}.classes: empty; list the classes to keep, e.g. classes: [person, car], or "
            "map new names to source classes, e.g. classes: {vehicle: [car, bus]}"
        )
    out: list[tuple[str, tuple[str, ...]]] = []
    for name, sources in pairs:
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"{KEY}.classes: class names must be non-empty strings, got {name!r}")
        if isinstance(sources, str):
            sources = [sources]
        ok = isinstance(sources, list) and sources and all(isinstance(s, str) for s in sources)
        if not ok:
            raise ConfigError(
                f"{KEY}.classes.{name}: expected a source class name or a non-empty list of "
                f"them, got {sources!r}"
            )
        out.append((name, tuple(sources)))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ConfigError(f"{KEY}.classes: {dup!r} is listed twice; each new class once")
    if cfg.others != IGNORE and cfg.others not in names:
        raise ConfigError(
            f"{KEY}.others: {cfg.others!r} is neither 'ignore' nor one of the new classes {names}"
        )
    unknown = sorted(set(cfg.colors) - set(names))
    if unknown:
        raise ConfigError(f"{KEY}.colors: {unknown[0]!r} is not one of the new classes {names}")
    for target, colour in cfg.colors.items():
        _rgb(colour, f"{KEY}.colors.{target}")
    return out


def resolve_class_map(
    cfg: ClassMapConfig,
    source_names: Sequence[str],
    source_palette: Sequence[Sequence[int]],
    ignore_index: int,
) -> ClassMap:
    """Check ``cfg`` against the dataset's own classes and build the lookup table.

    Errors name the key: an unknown source class (listing the valid ones), a source class
    given to two new classes (or to one and to ``ignore``).
    """
    targets = parse_targets(cfg)
    valid = list(source_names)
    owner: dict[str, str] = {}  # source → where it went, to catch a source used twice
    table = np.full(len(valid), -1, dtype=np.int64)
    for new_id, (target, sources) in enumerate(targets):
        for source in sources:
            _claim(source, f"classes.{target}", owner, valid)
            table[valid.index(source)] = new_id
    for source in cfg.ignore:
        _claim(source, "ignore", owner, valid)
        table[valid.index(source)] = ignore_index
    names = tuple(t for t, _ in targets)
    rest = ignore_index if cfg.others == IGNORE else names.index(cfg.others)
    table[table == -1] = rest
    palette = tuple(
        _rgb(cfg.colors[t], f"{KEY}.colors.{t}")
        if t in cfg.colors
        else tuple(int(c) for c in source_palette[valid.index(sources[0])])
        for t, sources in targets
    )
    return ClassMap(names, palette, table, ignore_index)  # type: ignore[arg-type]


def _claim(source: str, where: str, owner: dict[str, str], valid: list[str]) -> None:
    if source not in valid:
        raise ConfigError(
            f"{KEY}.{where}: {source!r} is not a class of this dataset; its classes are {valid}"
        )
    if source in owner:
        raise ConfigError(
            f"{KEY}.{where}: source class {source!r} is already taken by {KEY}.{owner[source]}; "
            "a source class can go to one place only"
        )
    owner[source] = where


def _rgb(value: Any, key: str) -> tuple[int, int, int]:
    ok = isinstance(value, (list, tuple)) and len(value) == 3
    if not ok or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ConfigError(f"{key}: expected [r, g, b] with values 0..255, got {value!r}")
    if not all(0 <= v <= 255 for v in value):
        raise ConfigError(f"{key}: expected [r, g, b] with values 0..255, got {value!r}")
    return int(value[0]), int(value[1]), int(value[2])

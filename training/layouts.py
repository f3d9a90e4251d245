"""Datasets as people have them, read where they lie: listing files, SegNet/CamVid split
folders, CVAT "Segmentation mask 1.1" exports, ADE20K's ADEChallengeData2016 (LabelMe JSON
polygons are in :mod:`training.labelme`, seeded splits in :mod:`training.splits`).

Every reader returns :class:`~training.datasets.Sample` pairs and raises
:class:`~training.datasets.DataError` naming the file (and the line of a listing file) and
the fix. :func:`layout_info` and :func:`layout_samples` are what ``training.datasets``
``dataset_info`` / ``build_dataset`` call for the kinds in :data:`KINDS`.

Kinds and their layouts under ``data.root`` (class names from):

* ``folder``: ``images/<split>/`` + ``masks/<split>/``, or ``<split>/`` + ``<split>annot/``
  (SegNet/CamVid), or a flat ``images/`` + ``masks/`` with ``data.split`` (``classes.yaml``)
* ``lists``: ``<split>.txt``, one ``image mask`` pair of paths per line (``classes.yaml``)
* ``cvat``: ``SegmentationClass/*.png`` (colour), ``JPEGImages/``,
  ``ImageSets/Segmentation/<subset>.txt`` (``labelmap.txt``)
* ``labelme``: ``[<split>/]*.json`` and the images they name (``classes.yaml`` or
  ``labels.txt``)
* ``ade20k``: ``[ADEChallengeData2016/]images|annotations/training|validation``
  (``objectInfo150.csv`` / ``.txt``, else the 150 standard names)

Example:
    >>> parse_labelmap_line("car:250,50,83::", Path("labelmap.txt"), 2)
    ('car', (250, 50, 83))
    >>> ade20k_split("train"), ade20k_split("validation")
    ('training', 'validation')
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from training.config import LAYOUT_KINDS, DataConfig
from training.datasets import (
    IMAGE_SUFFIXES,
    DataError,
    FolderClasses,
    Sample,
    _index_array,
    _non_empty,
    _pack,
    _pair,
    _split_dir,
    _unpack,
    read_classes_yaml,
    voc_palette,
)

KINDS = LAYOUT_KINDS  # lists, cvat, labelme, ade20k
Decoder = Callable[..., np.ndarray]


# --- SegNet / CamVid: <split>/ + <split>annot/ ---------------------------------------------------


def _images_by_stem(folder: Path, suffixes: Iterable[str] = IMAGE_SUFFIXES) -> dict[str, Path]:
    """Image files directly in ``folder`` by stem; two files with one stem is a DataError."""
    found: dict[str, Path] = {}
    allowed = tuple(suffixes)
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in allowed:
            if p.stem in found:
                raise DataError(f"{p}: two files share the stem {p.stem!r} ({found[p.stem]})")
            found[p.stem] = p
    return found


def has_segnet_split(root: Path, split: str) -> bool:
    """Whether ``root`` has the SegNet/CamVid pair ``<split>/`` + ``<split>annot/``."""
    return (root / split).is_dir() and (root / f"{split}annot").is_dir()


def segnet_samples(root: Path, split: str) -> list[Sample]:
    """``<split>/<stem>.<ext>`` ↔ ``<split>annot/<stem>.png`` (the SegNet tutorial's CamVid).

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> for folder in ("train", "trainannot"):
        ...     (root / folder).mkdir()
        ...     Image.new("L", (4, 4)).save(root / folder / "0001TP_006690.png")
        >>> [(s.image.parent.name, s.mask.parent.name) for s in segnet_samples(root, "train")]
        [('train', 'trainannot')]
    """
    image_dir = _split_dir(root / split, "<split>/ (SegNet layout)")
    mask_dir = _split_dir(root / f"{split}annot", "<split>annot/ (SegNet layout)")
    images, masks = _images_by_stem(image_dir), _images_by_stem(mask_dir, (".png",))
    return _non_empty(_pair(images, masks, image_dir, mask_dir, ".png", ".png"), image_dir, split)


def flat_folder_samples(root: Path) -> list[Sample]:
    """Every ``images/<stem>.<ext>`` ↔ ``masks/<stem>.png`` (a folder without split folders)."""
    image_dir = _split_dir(root / "images", "images/")
    mask_dir = _split_dir(root / "masks", "masks/")
    images, masks = _images_by_stem(image_dir), _images_by_stem(mask_dir, (".png",))
    if not images and any(p.is_dir() for p in image_dir.iterdir()):
        raise DataError(
            f"{image_dir}: holds split folders, not images; remove data.split to use them"
        )
    return _non_empty(_pair(images, masks, image_dir, mask_dir, ".png", ".png"), image_dir, "all")


# --- listing files: "images/a.jpg masks/a.png" per line ------------------------------------------


_DRIVE = re.compile(r"^[A-Za-z]:/")


def listing_path(root: Path, split: str) -> Path:
    """``root/<split>.txt``, or ``split`` itself when it names a ``.txt`` file.

    Example:
        >>> listing_path(Path("/data"), "val"), listing_path(Path("/data"), "lists/all.txt")
        (PosixPath('/data/val.txt'), PosixPath('/data/lists/all.txt'))
    """
    return root / split if split.endswith(".txt") else root / f"{split}.txt"


class _Finder:
    """Resolves the paths of a listing file; absolute paths that do not exist here (the list
    was written on another machine) are looked up by file name under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._by_name: dict[str, list[Path]] | None = None

    def _index(self) -> dict[str, list[Path]]:
        if self._by_name is None:
            self._by_name = {}
            for folder, dirs, files in os.walk(self.root):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in files:
                    self._by_name.setdefault(name, []).append(Path(folder) / name)
        return self._by_name

    def locate(self, text: str, listing: Path, lineno: int, what: str) -> Path:
        posix = text.replace("\\", "/")
        if not (posix.startswith("/") or _DRIVE.match(posix)):
            for base in (listing.parent, self.root):
                if (base / posix).is_file():
                    return base / posix
            raise DataError(
                f"{listing}:{lineno}: {what} {text!r} not found, neither relative to the listing "
                f"file ({listing.parent}) nor to data.root ({self.root}); fix the line or "
                "restore the file"
            )
        if Path(text).is_file():
            return Path(text)
        return self._reroot(
            text, PurePosixPath(_DRIVE.sub("/", posix)).parts, listing, lineno, what
        )

    def _reroot(
        self, text: str, parts: tuple[str, ...], listing: Path, lineno: int, what: str
    ) -> Path:
        """The file under ``root`` named like ``parts[-1]`` whose parent folders match most."""
        candidates = self._index().get(parts[-1], [])
        if not candidates:
            raise DataError(
                f"{listing}:{lineno}: {what} {text!r} does not exist here and no file named "
                f"{parts[-1]!r} is under data.root ({self.root}); fix the line or restore the file"
            )

        def shared_tail(path: Path) -> int:
            n = 0
            for a, b in zip(reversed(path.parts), reversed(parts), strict=False):
                if a != b:
                    break
                n += 1
            return n

        scores = [shared_tail(c) for c in candidates]
        best = max(scores)
        winners = [c for c, s in zip(candidates, scores, strict=True) if s == best]
        if len(winners) > 1:
            shown = ", ".join(str(w) for w in winners[:3])
            raise DataError(
                f"{listing}:{lineno}: {what} {text!r} does not exist here and {len(winners)} files "
                f"under data.root match it equally ({shown}); write the path relative to the "
                "listing file"
            )
        return winners[0]


def read_listing(path: Path, root: Path) -> list[Sample]:
    """The (image, mask) pairs of a listing file: one pair of paths per line, separated by
    whitespace (a tab when the paths hold spaces); blank lines and ``#`` comments skipped.

    Relative paths are taken from the listing file's folder, then from ``root``; an absolute
    path that does not exist is re-rooted: the file of that name under ``root`` (when several
    share the name, the one whose parent folders match the path most).

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> for p in ("images/a.jpg", "masks/a.png"):
        ...     (root / p).parent.mkdir(); (root / p).touch()
        >>> _ = (root / "train.txt").write_text("/home/alice/data/images/a.jpg masks/a.png\\n")
        >>> [(s.image.name, s.mask.name) for s in read_listing(root / "train.txt", root)]
        [('a.jpg', 'a.png')]
    """
    if not path.is_file():
        raise DataError(
            f"{path}: listing file not found; write one 'images/a.jpg masks/a.png' pair per "
            "line, or point data.train_split / data.val_split at an existing .txt"
        )
    finder = _Finder(root)
    samples = []
    for lineno, raw in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = [f.strip() for f in line.split("\t")] if "\t" in line else line.split()
        if len(fields) != 2:
            raise DataError(
                f"{path}:{lineno}: expected 'image mask' (two paths, separated by a space, or a "
                f"tab when a path holds spaces), got {raw!r}"
            )
        samples.append(
            Sample(
                finder.locate(fields[0], path, lineno, "image"),
                finder.locate(fields[1], path, lineno, "mask"),
            )
        )
    return _non_empty(samples, path, path.stem)


def write_listing(path: Path, samples: Iterable[Sample]) -> Path:
    """Write ``samples`` as a listing file :func:`read_listing` reads back (absolute paths;
    written to a temporary file first, so a reader never sees half a list)."""
    lines = []
    for s in samples:
        image, mask = str(s.image.resolve()), str(s.mask.resolve())
        lines.append(f"{image}{chr(9) if ' ' in image + mask else ' '}{mask}\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(lines), encoding="utf-8")
    os.replace(tmp, path)
    return path


# --- CVAT "Segmentation mask 1.1" ----------------------------------------------------------------


def parse_labelmap_line(line: str, path: Path, lineno: int) -> tuple[str, tuple[int, int, int]]:
    """``name:r,g,b:parts:actions`` → (name, colour)."""
    fields = line.split(":")
    colour = fields[1].split(",") if len(fields) >= 2 else []
    ok = len(fields) >= 2 and fields[0].strip() and len(colour) == 3
    ok = ok and all(c.strip().isdigit() and int(c) <= 255 for c in colour)
    if not ok:
        raise DataError(
            f"{path}:{lineno}: expected 'name:r,g,b::' (e.g. 'car:250,50,83::'), got {line!r}"
        )
    return fields[0].strip(), (int(colour[0]), int(colour[1]), int(colour[2]))


def read_labelmap(root: Path) -> tuple[tuple[str, ...], tuple[tuple[int, int, int], ...]]:
    """Class names and colours from CVAT's ``labelmap.txt``, in file order (background first,
    as CVAT writes it)."""
    path = root / "labelmap.txt"
    if not path.is_file():
        raise DataError(
            f"{path}: not found; a CVAT 'Segmentation mask 1.1' export has labelmap.txt next to "
            "SegmentationClass/ (point data.root at the unzipped export)"
        )
    names: list[str] = []
    colours: list[tuple[int, int, int]] = []
    for lineno, raw in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, colour = parse_labelmap_line(line, path, lineno)
        for seen, what in ((names, name), (colours, colour)):
            if what in seen:
                other = names[seen.index(what)]
                raise DataError(
                    f"{path}:{lineno}: {what!r} is already used by {other!r}; each label needs "
                    "its own name and colour"
                )
        names.append(name)
        colours.append(colour)
    if not names:
        raise DataError(f"{path}: no labels; expected lines 'name:r,g,b::'")
    return tuple(names), tuple(colours)


def _cvat_sample(root: Path, mask: Path, where: str) -> Sample:
    """The mask ``SegmentationClass/<id>.png`` and its image ``JPEGImages/<id>.<ext>``."""
    key = mask.relative_to(root / "SegmentationClass").with_suffix("")
    for suffix in IMAGE_SUFFIXES:
        for candidate in (suffix, suffix.upper()):
            image = root / "JPEGImages" / f"{key}{candidate}"
            if image.is_file():
                return Sample(image, mask)
    raise DataError(
        f"{root / 'JPEGImages' / key}.jpg: image of {key.as_posix()!r} ({where}) not found; "
        "export from CVAT with 'Save images' on, or copy the images into JPEGImages/"
    )


def cvat_samples(root: Path, split: str) -> list[Sample]:
    """The ids in ``ImageSets/Segmentation/<split>.txt`` (CVAT writes its subsets there:
    ``default`` for a task without subsets)."""
    lists = root / "ImageSets" / "Segmentation"
    listing = lists / f"{split}.txt"
    if not listing.is_file():
        have = sorted(p.stem for p in lists.glob("*.txt")) if lists.is_dir() else []
        raise DataError(
            f"{listing}: not found; this export's subsets are {have}: set data.train_split / "
            "data.val_split to them, or add data.split: {val: 0.15} to split it"
        )
    samples = []
    for line in listing.read_text(encoding="utf-8-sig").splitlines():
        key = line.strip()
        if not key:
            continue
        mask = root / "SegmentationClass" / f"{key}.png"
        if not mask.is_file():
            raise DataError(
                f"{mask}: mask of {key!r} (listed in {listing}) is missing; re-export or remove "
                "the id from the list"
            )
        samples.append(_cvat_sample(root, mask, f"listed in {listing}"))
    return _non_empty(samples, listing, split)


def cvat_pool(root: Path) -> list[Sample]:
    """Every mask in ``SegmentationClass/`` with its image (what ``data.split`` splits)."""
    mask_dir = _split_dir(root / "SegmentationClass", "CVAT SegmentationClass/")
    samples = [
        _cvat_sample(root, m, "in SegmentationClass/") for m in sorted(mask_dir.rglob("*.png"))
    ]
    return _non_empty(samples, mask_dir, "all")


def cvat_decoder(
    colours: tuple[tuple[int, int, int], ...], labelmap: Path, ignore_index: int
) -> Decoder:
    """Colour mask (RGB, RGBA or palette PNG) → class ids by ``labelmap.txt``'s colours."""
    del ignore_index  # every labelmap colour is a class; CVAT has no "not labelled" colour
    keys = {_pack(c): k for k, c in enumerate(colours)}

    def decode(img: Image.Image, path: Path) -> np.ndarray:
        if img.mode not in ("RGB", "RGBA", "P"):
            raise DataError(
                f"{path}: mask has mode {img.mode}; CVAT SegmentationClass masks are colour "
                "PNGs (use the export's SegmentationClass/, not SegmentationObject/)"
            )
        rgb = np.asarray(img.convert("RGB"), dtype=np.int64)
        packed = _pack((rgb[..., 0], rgb[..., 1], rgb[..., 2]))
        uniq, inverse = np.unique(packed, return_inverse=True)
        unknown = [list(_unpack(u)) for u in uniq.tolist() if u not in keys]
        if unknown:
            raise DataError(
                f"{path}: colours {unknown[:5]} are not in {labelmap}; add a line "
                f"'name:{','.join(map(str, unknown[0]))}::' for each, or repaint those pixels"
            )
        ids = np.array([keys[u] for u in uniq.tolist()], dtype=np.int64)
        return ids[inverse].reshape(packed.shape)

    return decode


# --- ADE20K (ADEChallengeData2016) -------------------------------------------------------------

# The first name of each row of objectInfo150.txt (CSAILVision/sceneparsing), Idx 1..150; mask
# value 0 is "other" (not one of the 150) and is ignored.
ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug",
    "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub",
    "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter",
    "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs",
    "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier", "awning",
    "streetlight", "booth", "television", "airplane", "dirt track", "apparel", "pole", "land",
    "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship",
    "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food",
    "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher",
    "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower",
    "radiator", "glass", "clock", "flag",
)  # fmt: skip
ADE20K_SPLITS = {"train": "training", "val": "validation"}


def ade20k_split(split: str) -> str:
    """The recipe's ``train``/``val`` are ADE20K's ``training``/``validation``."""
    return ADE20K_SPLITS.get(split, split)


def ade20k_root(root: Path) -> Path:
    """Accept ``ADEChallengeData2016`` itself or the folder holding it."""
    for candidate in (root, root / "ADEChallengeData2016"):
        if (candidate / "images").is_dir() and (candidate / "annotations").is_dir():
            return candidate
    raise DataError(
        f"{root}: no images/ + annotations/ here or in ADEChallengeData2016/; point data.root "
        "at the unzipped ADEChallengeData2016 (or its parent)"
    )


def ade20k_samples(root: Path, split: str) -> list[Sample]:
    """``images/<split>/*.jpg`` ↔ ``annotations/<split>/*.png``."""
    base = ade20k_root(root)
    name = ade20k_split(split)
    image_dir = _split_dir(base / "images" / name, "ADE20K images/<training|validation>")
    mask_dir = _split_dir(base / "annotations" / name, "ADE20K annotations/<training|validation>")
    images, masks = _images_by_stem(image_dir), _images_by_stem(mask_dir, (".png",))
    return _non_empty(_pair(images, masks, image_dir, mask_dir, ".jpg", ".png"), image_dir, split)


def _ade20k_name(raw: str, index: int) -> str:
    """The first synonym of a Name cell. objectInfo150.txt separates synonyms with ', '; the
    .csv (semantic-segmentation-pytorch) writes every space and comma as ';' ('chest;of;drawers;
    chest;bureau'), so a cell whose words begin with the standard name gets that name."""
    if ";" not in raw:
        return raw.split(",")[0].strip()
    words = [w.strip() for w in raw.split(";")]
    standard = ADE20K_CLASSES[index].split() if index < len(ADE20K_CLASSES) else []
    if standard and words[: len(standard)] == standard:
        return ADE20K_CLASSES[index]
    return words[0]


def ade20k_classes(root: Path) -> tuple[tuple[str, ...], str]:
    """(the 150 class names, where they came from): ``objectInfo150.csv`` or ``.txt`` in the
    dataset folder when present (column ``Name``, rows in ``Idx`` order), else the standard
    names."""
    base = ade20k_root(root)
    for path in (
        base / "objectInfo150.csv",
        base / "objectInfo150.txt",
        root / "objectInfo150.csv",
    ):
        if path.is_file():
            return _read_object_info(path), str(path)
    return ADE20K_CLASSES, "the standard ADE20K names"


def _read_object_info(path: Path) -> tuple[str, ...]:
    text = path.read_text(encoding="utf-8-sig")
    header = text.splitlines()[0] if text.strip() else ""
    rows = list(csv.DictReader(text.splitlines(), delimiter="\t" if "\t" in header else ","))
    fields = [f.strip() for f in (rows[0].keys() if rows else header.split(","))]
    if "Name" not in fields or "Idx" not in fields:
        raise DataError(f"{path}: expected the columns Idx and Name (objectInfo150), got {fields}")
    names = []
    for i, row in enumerate(rows):
        row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
        if row["Idx"] != str(i + 1) or not row["Name"]:
            raise DataError(
                f"{path}: row {i + 2} has Idx {row['Idx']!r} and Name {row['Name']!r}; expected "
                f"Idx {i + 1} and a name (rows in class order, one per class)"
            )
        names.append(_ade20k_name(row["Name"], i))
    if len(names) != len(ADE20K_CLASSES):
        raise DataError(f"{path}: {len(names)} classes; ADEChallengeData2016 masks have 150")
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise DataError(f"{path}: the class name {dup!r} appears twice; make the names unique")
    return tuple(names)


def ade20k_decoder(ignore_index: int) -> Decoder:
    """Mask value 0 ("other") → ``ignore_index``; 1..150 → class ids 0..149."""
    table = np.full(256, -1, dtype=np.int64)
    table[0] = ignore_index
    table[1 : len(ADE20K_CLASSES) + 1] = np.arange(len(ADE20K_CLASSES))
    hint = "Use the ADEChallengeData2016 annotations/ PNGs (values 0..150)."

    def decode(img: Image.Image, path: Path) -> np.ndarray:
        values = _index_array(img, path, hint)
        bad = np.unique(values[(values > len(ADE20K_CLASSES)) | (values < 0)])
        if bad.size:
            raise DataError(f"{path}: label values {bad[:10].tolist()} are above 150. {hint}")
        return table[values]

    return decode


# --- the entry points training.datasets calls ----------------------------------------------------


def layout_info(
    cfg: DataConfig, root: Path
) -> tuple[tuple[str, ...], tuple[tuple[int, int, int], ...]]:
    """Class names and palette of a :data:`KINDS` dataset, from its own class file."""
    if cfg.kind == "lists":
        classes = read_classes_yaml(root)
        return classes.names, classes.colours or voc_palette(len(classes.names))
    if cfg.kind == "cvat":
        return read_labelmap(root)
    if cfg.kind == "labelme":
        from training.labelme import labelme_classes

        names, colours, _ = labelme_classes(root)
        return names, colours or voc_palette(len(names))
    if cfg.kind == "ade20k":
        names, _ = ade20k_classes(root)
        return names, voc_palette(len(names))
    raise DataError(f"data.kind: {cfg.kind!r} is not one of {list(KINDS)}")


def folder_decoder(classes: FolderClasses, ignore_index: int) -> Decoder:
    """Index masks, or RGB masks mapped by ``classes.yaml``'s colours."""
    from training.datasets import colour_or_index_decoder, index_decoder

    if classes.colours is None:
        hint = "For RGB colour masks, list the class colours in classes.yaml 'colors'."
        return index_decoder(len(classes.names), classes.ignore_index, ignore_index, hint)
    return colour_or_index_decoder(
        classes.colours, classes.ignore_index, ignore_index, classes.ignore_colour
    )


def split_pool(cfg: DataConfig, root: Path) -> list[Sample]:
    """Every sample of a dataset without split folders, for ``data.split`` to divide."""
    if cfg.kind == "folder":
        return flat_folder_samples(root)
    if cfg.kind == "cvat":
        return cvat_pool(root)
    if cfg.kind == "labelme":
        from training.labelme import labelme_samples

        return labelme_samples(root, None)
    raise DataError(f"data.split: data.kind={cfg.kind!r} has its own splits; remove data.split")


def layout_samples(
    cfg: DataConfig, root: Path, split: str, ignore_index: int
) -> tuple[list[Sample], Decoder]:
    """The samples of ``split`` and the mask decoder of a :data:`KINDS` dataset."""
    from training.splits import split_samples

    if cfg.kind == "lists":
        samples = read_listing(listing_path(root, split), root)
        return samples, folder_decoder(read_classes_yaml(root), ignore_index)
    if cfg.kind == "ade20k":
        return ade20k_samples(root, split), ade20k_decoder(ignore_index)
    if cfg.kind == "cvat":
        _, colours = read_labelmap(root)
        if cfg.split is not None:
            samples = split_samples(cfg, split, lambda: cvat_pool(root))
        else:
            samples = cvat_samples(root, split)
        return samples, cvat_decoder(colours, root / "labelmap.txt", ignore_index)
    if cfg.kind == "labelme":
        from training.labelme import labelme_painter, labelme_samples

        if cfg.split is not None:
            samples = split_samples(cfg, split, lambda: labelme_samples(root, None))
        else:
            samples = labelme_samples(root, split)
        return samples, labelme_painter(root, ignore_index)
    raise DataError(f"data.kind: {cfg.kind!r} is not one of {list(KINDS)}")


def folder_kind_samples(cfg: DataConfig, root: Path, split: str) -> list[Sample] | None:
    """The folder kind's other layouts (SegNet pairs; a flat folder under ``data.split``), or
    None for the classic ``images/<split>`` + ``masks/<split>``."""
    from training.splits import split_samples

    if cfg.split is not None:
        return split_samples(cfg, split, lambda: flat_folder_samples(root))
    if not (root / "images" / split).is_dir() and has_segnet_split(root, split):
        return segnet_samples(root, split)
    return None


def optional_test_split(cfg: DataConfig) -> str | None:
    """``"test"`` when the dataset has a test split besides train and val (``check-data``
    reads it too): one drawn by ``data.split``, or one on disk in the layout's own form."""
    if cfg.split is not None:
        return "test" if cfg.split.test > 0 else None
    if not cfg.root or cfg.kind in ("synthetic", "cityscapes", "voc", "ade20k"):
        return None
    root = Path(cfg.root).expanduser()
    on_disk = {
        "folder": (root / "images" / "test").is_dir() or has_segnet_split(root, "test"),
        "lists": (root / "test.txt").is_file(),
        "cvat": (root / "ImageSets" / "Segmentation" / "test.txt").is_file(),
        "labelme": (root / "test").is_dir(),
    }
    return "test" if on_disk.get(cfg.kind) else None

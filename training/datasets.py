"""Segmentation datasets: the embedded synthetic scenes, Cityscapes, Pascal VOC 2012, a folder
(listing files, CVAT, LabelMe, ADE20K and SegNet split folders: :mod:`training.layouts`).

Every dataset yields ``(image float32 (3,H,W), mask int64 (H,W))`` after its transform, and
exposes :meth:`SegmentationDataset.load_raw` (the untransformed RGB + mask in train ids) for
evaluation overlays. Ignored pixels always carry ``cfg.ignore_index``, whatever value the
source files use for them.

Bad data raises :class:`DataError` naming the file and the fix: pairing problems (an image
without a mask, a mask without an image, an empty split, a missing list/classes file) when
the dataset is built; unreadable files, size mismatches and unknown label values when a
sample is loaded.

Example:
    >>> from handler.preprocessing import PreprocessSpec
    >>> from training.config import DataConfig, SyntheticConfig
    >>> cfg = DataConfig(synthetic=SyntheticConfig(num_train=4, num_val=2, image_size=(64, 64)))
    >>> ds = build_dataset(cfg, "val", PreprocessSpec((64, 64)), train=False)
    >>> len(ds), ds.info.class_names[0]
    (2, 'background')
    >>> image, mask = ds[0]
    >>> tuple(image.shape), tuple(mask.shape), mask.dtype
    ((3, 64, 64), (64, 64), torch.int64)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image, UnidentifiedImageError

from handler.preprocessing import SIZE_DIVISOR, PreprocessSpec, padded_size
from training import synthetic
from training.class_map import ClassMap, resolve_class_map
from training.config import DATA_KINDS, LAYOUT_KINDS, DataConfig
from training.transforms import build_train_transform, build_val_transform

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
Transform = Callable[[np.ndarray, np.ndarray], tuple[torch.Tensor, torch.Tensor]]


class DataError(ValueError):
    """Unusable data; the message names the offending file and the fix."""


@dataclass(frozen=True)
class DatasetInfo:
    """What the labels mean: names and colours per train id, and the ignored value."""

    class_names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    ignore_index: int

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# --- official label tables --------------------------------------------------------------------

CITYSCAPES_CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)  # fmt: skip
CITYSCAPES_PALETTE: tuple[tuple[int, int, int], ...] = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32),
)  # fmt: skip
# labelId -> trainId for the 19 evaluated classes (cityscapesScripts labels.py); all else ignored.
CITYSCAPES_LABEL_TO_TRAIN: dict[int, int] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
    25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
VOC_IGNORE = 255  # the VOC "void" border value in SegmentationClass PNGs


def voc_palette(n: int) -> tuple[tuple[int, int, int], ...]:
    """The Pascal VOC colour map (bit-interleaved), also used for folders without colours.

    Example:
        >>> voc_palette(3)
        ((0, 0, 0), (128, 0, 0), (0, 128, 0))
    """
    colours = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        colours.append((r, g, b))
    return tuple(colours)


# --- the dataset -------------------------------------------------------------------------------


class SegmentationDataset(torch.utils.data.Dataset):
    """Base: subclasses implement ``__len__`` and :meth:`load_raw`; the transform does the rest."""

    def __init__(self, info: DatasetInfo, transform: Transform) -> None:
        self.info = info
        self.transform = transform
        self._worker_seed: int | None = None

    def __len__(self) -> int:
        raise NotImplementedError

    def load_raw(self, i: int) -> tuple[np.ndarray, np.ndarray, str]:
        """Untransformed sample ``i``: (rgb uint8 (H,W,3), mask int64 (H,W), source name)."""
        raise NotImplementedError

    def load_mask(self, i: int) -> np.ndarray:
        """Sample ``i``'s mask alone (train ids), for pixel statistics; file datasets skip the
        image decode."""
        return self.load_raw(i)[1]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for a dataset of {len(self)}")
        self._seed_worker()
        rgb, mask, _ = self.load_raw(i)
        return self.transform(rgb, mask)

    def _seed_worker(self) -> None:
        """Give each DataLoader worker its own augmentation stream.

        Forked workers inherit identical copies of the transform's RNG, so without this every
        worker would draw the same augmentations. ``worker_info.seed`` differs per worker and
        per epoch and derives from torch's seed, so runs stay reproducible.
        """
        worker = torch.utils.data.get_worker_info()
        reseed = getattr(self.transform, "reseed", None)
        if worker is not None and reseed is not None and self._worker_seed != worker.seed:
            self._worker_seed = worker.seed
            reseed(worker.seed)


class SyntheticDataset(SegmentationDataset):
    """Scenes from :mod:`training.synthetic`, generated on first use and cached in memory."""

    def __init__(
        self,
        info: DatasetInfo,
        transform: Transform,
        split: str,
        cfg: DataConfig,
        class_map: ClassMap | None = None,
    ):
        super().__init__(info, transform)
        self.split = split
        self.seed = cfg.synthetic.seed
        self.size = tuple(cfg.synthetic.image_size)
        self.mode = cfg.synthetic.mode
        self.count = cfg.synthetic.num_train if split == "train" else cfg.synthetic.num_val
        self.class_map = class_map
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return self.count

    def load_raw(self, i: int) -> tuple[np.ndarray, np.ndarray, str]:
        if i not in self._cache:
            self._cache[i] = synthetic.generate_scene(
                self.seed, synthetic.scene_index(self.split, i), self.size, self.mode
            )
        rgb, mask = self._cache[i]
        mask = mask.astype(np.int64) if self.class_map is None else self.class_map.apply(mask)
        return rgb.copy(), mask, f"synthetic/{self.split}/{i:06d}"


@dataclass(frozen=True)
class Sample:
    image: Path
    mask: Path


class FileDataset(SegmentationDataset):
    """Image/mask file pairs; ``decode_mask`` turns a mask file into train ids."""

    def __init__(
        self,
        info: DatasetInfo,
        transform: Transform,
        samples: Sequence[Sample],
        decode_mask: Callable[[Image.Image, Path], np.ndarray],
    ) -> None:
        super().__init__(info, transform)
        self.samples = list(samples)
        self.decode_mask = decode_mask

    def __len__(self) -> int:
        return len(self.samples)

    def load_raw(self, i: int) -> tuple[np.ndarray, np.ndarray, str]:
        sample = self.samples[i]
        with _open_image(sample.image) as img:
            rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
        with _open_image(sample.mask) as img:
            mask = self.decode_mask(img, sample.mask)
        if mask.shape != rgb.shape[:2]:
            raise DataError(
                f"{sample.mask}: mask is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image "
                f"{sample.image} is {rgb.shape[1]}x{rgb.shape[0]}; masks must match their image's "
                "size pixel for pixel (re-export the mask at the image's resolution)"
            )
        return rgb, mask, str(sample.image)

    def load_mask(self, i: int) -> np.ndarray:
        sample = self.samples[i]
        with _open_image(sample.mask) as img:
            return self.decode_mask(img, sample.mask)


def _open_image(path: Path) -> Image.Image:
    """Open and fully decode ``path``, turning every decoder failure into a DataError."""
    try:
        img = Image.open(path)
        img.load()  # decode now: truncated files fail here, not later inside a transform
    except FileNotFoundError:
        raise DataError(f"{path}: file not found (was it moved or deleted?)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: unreadable or corrupt image ({exc}); replace the file") from None
    return img


# --- mask decoding ------------------------------------------------------------------------------


def _index_array(img: Image.Image, path: Path, hint: str) -> np.ndarray:
    """Pixel values of a single-channel mask (for P images: the palette index, not the RGB)."""
    if img.mode not in ("L", "P", "I", "I;16"):
        raise DataError(f"{path}: mask has mode {img.mode}; expected an index PNG (L or P). {hint}")
    return np.asarray(img, dtype=np.int64)


def _check_labels(values: np.ndarray, num_classes: int, ignore: int, path: Path) -> None:
    bad = np.unique(values[(values >= num_classes) & (values != ignore) | (values < 0)])
    if bad.size:
        raise DataError(
            f"{path}: label values {bad[:10].tolist()} are outside the {num_classes} classes "
            f"(0..{num_classes - 1}) and are not the ignore value {ignore}; fix the mask or the "
            "class list"
        )


def _lookup(num_classes: int, native_ignore: int, ignore_index: int) -> np.ndarray:
    """Table value → train id: identity for classes, the native ignore → ``ignore_index``."""
    size = max(num_classes, native_ignore + 1, 256)
    table = np.full(size, -1, dtype=np.int64)
    table[:num_classes] = np.arange(num_classes)
    if native_ignore >= 0:
        table[native_ignore] = ignore_index
    return table


def cityscapes_decoder(ignore_index: int) -> Callable[[Image.Image, Path], np.ndarray]:
    """labelIds PNG → the 19 train ids; every other labelId → ``ignore_index``."""
    table = np.full(256, ignore_index, dtype=np.int64)
    for label_id, train_id in CITYSCAPES_LABEL_TO_TRAIN.items():
        table[label_id] = train_id

    def decode(img: Image.Image, path: Path) -> np.ndarray:
        hint = "Use gtFine/*_gtFine_labelIds.png (not _color or _instanceIds)."
        values = _index_array(img, path, hint)
        if values.max(initial=0) > 255:
            raise DataError(f"{path}: labelIds above 255; {hint}")
        return table[values]

    return decode


def index_decoder(
    num_classes: int, native_ignore: int, ignore_index: int, hint: str
) -> Callable[[Image.Image, Path], np.ndarray]:
    """Index (L/P) mask → train ids, after checking every value is a class or the ignore."""
    table = _lookup(num_classes, native_ignore, ignore_index)

    def decode(img: Image.Image, path: Path) -> np.ndarray:
        values = _index_array(img, path, hint)
        _check_labels(values, num_classes, native_ignore, path)
        return table[values]

    return decode


def colour_or_index_decoder(
    colours: Sequence[tuple[int, int, int]],
    native_ignore: int,
    ignore_index: int,
    ignore_colour: tuple[int, int, int] | None,
) -> Callable[[Image.Image, Path], np.ndarray]:
    """Index masks as :func:`index_decoder`; RGB masks mapped colour → class id."""
    by_index = index_decoder(len(colours), native_ignore, ignore_index, "")
    keys = {_pack(c): k for k, c in enumerate(colours)}
    if ignore_colour is not None:
        keys[_pack(ignore_colour)] = ignore_index

    def decode(img: Image.Image, path: Path) -> np.ndarray:
        if img.mode not in ("RGB", "RGBA"):
            return by_index(img, path)
        rgb = np.asarray(img.convert("RGB"), dtype=np.int64)
        packed = _pack((rgb[..., 0], rgb[..., 1], rgb[..., 2]))
        uniq, inverse = np.unique(packed, return_inverse=True)
        unknown = [u for u in uniq.tolist() if u not in keys]
        if unknown:
            shown = [list(_unpack(u)) for u in unknown[:5]]
            raise DataError(
                f"{path}: colours {shown} are not in classes.yaml 'colors'"
                + (" or 'ignore_color'" if ignore_colour is not None else "")
                + "; add them there or repaint those pixels"
            )
        ids = np.array([keys[u] for u in uniq.tolist()], dtype=np.int64)
        return ids[inverse].reshape(packed.shape)

    return decode


def _pack(rgb):  # works on ints and on arrays alike
    return (rgb[0] << 16) | (rgb[1] << 8) | rgb[2]


def _unpack(v: int) -> tuple[int, int, int]:
    return (v >> 16) & 255, (v >> 8) & 255, v & 255


# --- layouts: find the (image, mask) pairs of a split -------------------------------------------


def _split_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataError(f"{path}: {what} folder not found; check data.root and the split name")
    return path


def _unpaired(kind: str, path: Path, expected: Path) -> DataError:
    return DataError(
        f"{path}: {kind} has no counterpart (expected {expected}); add it or remove {path}"
    )


def _non_empty(samples: list[Sample], where: Path, split: str) -> list[Sample]:
    if not samples:
        raise DataError(f"{where}: split {split!r} has no samples; check data.root and the split")
    return samples


def cityscapes_samples(root: Path, split: str) -> list[Sample]:
    """``leftImg8bit/<split>/<city>/*_leftImg8bit.png`` ↔ ``gtFine/.../*_gtFine_labelIds.png``."""
    image_dir = _split_dir(root / "leftImg8bit" / split, "Cityscapes leftImg8bit/<split>")
    mask_dir = _split_dir(root / "gtFine" / split, "Cityscapes gtFine/<split>")
    images = {
        p.relative_to(image_dir).as_posix()[: -len("_leftImg8bit.png")]: p
        for p in image_dir.glob("*/*_leftImg8bit.png")
    }
    masks = {
        p.relative_to(mask_dir).as_posix()[: -len("_gtFine_labelIds.png")]: p
        for p in mask_dir.glob("*/*_gtFine_labelIds.png")
    }
    pairs = _pair(images, masks, image_dir, mask_dir, "_leftImg8bit.png", "_gtFine_labelIds.png")
    return _non_empty(pairs, image_dir, split)


def _pair(
    images: dict[str, Path],
    masks: dict[str, Path],
    image_dir: Path,
    mask_dir: Path,
    image_suffix: str,
    mask_suffix: str,
) -> list[Sample]:
    """Match images and masks by key; any leftover on either side is a DataError."""
    for key in sorted(images.keys() - masks.keys()):
        raise _unpaired("image", images[key], mask_dir / f"{key}{mask_suffix}")
    for key in sorted(masks.keys() - images.keys()):
        raise _unpaired("mask", masks[key], image_dir / f"{key}{image_suffix}")
    return [Sample(images[k], masks[k]) for k in sorted(images)]


def voc_root(root: Path) -> Path:
    """Accept ``VOCdevkit/VOC2012``, ``VOCdevkit`` or the folder holding ``VOCdevkit``."""
    for candidate in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (candidate / "JPEGImages").is_dir():
            return candidate
    raise DataError(
        f"{root}: no JPEGImages/ found here, in VOC2012/ or VOCdevkit/VOC2012/; point data.root "
        "at VOCdevkit/VOC2012 (or its parent)"
    )


def voc_samples(root: Path, split: str) -> list[Sample]:
    """Ids in ``ImageSets/Segmentation/<split>.txt`` → ``JPEGImages/<id>.jpg`` + its
    ``SegmentationClass/<id>.png``."""
    base = voc_root(root)
    listing = base / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not listing.is_file():
        raise DataError(f"{listing}: split list not found; splits are train, val, trainval")
    samples = []
    for line in listing.read_text().splitlines():
        name = line.strip()
        if not name:
            continue
        sample = Sample(
            base / "JPEGImages" / f"{name}.jpg", base / "SegmentationClass" / f"{name}.png"
        )
        for kind, path in (("image", sample.image), ("mask", sample.mask)):
            if not path.is_file():
                raise DataError(
                    f"{path}: {kind} of {name!r} (listed in {listing}) is missing; restore it or "
                    "remove the id from the list"
                )
        samples.append(sample)
    return _non_empty(samples, listing, split)


def folder_samples(root: Path, split: str) -> list[Sample]:
    """``images/<split>/<stem>.<ext>`` ↔ ``masks/<split>/<stem>.png``."""
    where = "images/<split> (nor SegNet's <split>/ + <split>annot/; flat images/ needs data.split)"
    image_dir = _split_dir(root / "images" / split, where)
    mask_dir = _split_dir(root / "masks" / split, "masks/<split>")
    images: dict[str, Path] = {}
    for p in sorted(image_dir.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
            if p.stem in images:
                raise DataError(f"{p}: two images share the stem {p.stem!r} ({images[p.stem]})")
            images[p.stem] = p
    masks = {p.stem: p for p in mask_dir.glob("*.png")}
    return _non_empty(_pair(images, masks, image_dir, mask_dir, ".png", ".png"), image_dir, split)


# --- folder classes.yaml -------------------------------------------------------------------------


@dataclass(frozen=True)
class FolderClasses:
    names: tuple[str, ...]
    colours: tuple[tuple[int, int, int], ...] | None
    ignore_index: int
    ignore_colour: tuple[int, int, int] | None


def read_classes_yaml(root: Path) -> FolderClasses:
    """Parse ``root/classes.yaml``: ``names`` + optional ``colors``, ``ignore_index``,
    ``ignore_color`` (the mask value / RGB colour that means "not labelled").

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp()); _ = (d / "classes.yaml").write_text("names: [bg, cat]")
        >>> read_classes_yaml(d).names, read_classes_yaml(d).ignore_index
        (('bg', 'cat'), 255)
    """
    path = root / "classes.yaml"
    if not path.is_file():
        raise DataError(
            f"{path}: not found; a folder dataset needs classes.yaml with 'names: [...]' "
            "(optional 'colors: [[r, g, b], ...]', 'ignore_index', 'ignore_color')"
        )
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise DataError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise DataError(
            f"{path}: expected a mapping with 'names: [...]', got {type(data).__name__}"
        )
    unknown = sorted(set(data) - {"names", "colors", "ignore_index", "ignore_color"})
    if unknown:
        raise DataError(
            f"{path}: unknown key(s) {unknown}; allowed: names, colors, ignore_index, ignore_color"
        )
    names = data.get("names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise DataError(f"{path}: 'names' must be a non-empty list of strings, got {names!r}")
    if len(set(names)) != len(names):
        raise DataError(f"{path}: 'names' has duplicates")
    colours = data.get("colors")
    if colours is not None:
        colours = tuple(_rgb(c, path, f"colors[{i}]") for i, c in enumerate(colours))
        if len(colours) != len(names):
            raise DataError(f"{path}: {len(colours)} colors for {len(names)} names; give one each")
        if len(set(colours)) != len(colours):
            raise DataError(f"{path}: 'colors' has duplicates; each class needs its own colour")
    ignore = data.get("ignore_index", 255)
    if not isinstance(ignore, int) or isinstance(ignore, bool) or 0 <= ignore < len(names):
        raise DataError(
            f"{path}: ignore_index must be an int outside 0..{len(names) - 1}, got {ignore!r}"
        )
    ignore_colour = data.get("ignore_color")
    if ignore_colour is not None:
        ignore_colour = _rgb(ignore_colour, path, "ignore_color")
    return FolderClasses(tuple(names), colours, ignore, ignore_colour)


def _rgb(value: object, path: Path, key: str) -> tuple[int, int, int]:
    ok = isinstance(value, (list, tuple)) and len(value) == 3
    if not ok or not all(isinstance(v, int) and 0 <= v <= 255 for v in value):
        raise DataError(f"{path}: {key} must be [r, g, b] with values 0..255, got {value!r}")
    return (int(value[0]), int(value[1]), int(value[2]))


# --- public entry points -------------------------------------------------------------------------


def _check_ignore(info: DatasetInfo, where: str) -> DatasetInfo:
    if 0 <= info.ignore_index < info.num_classes:
        raise DataError(
            f"data.ignore_index={info.ignore_index} is a class id of {where} "
            f"(0..{info.num_classes - 1}); use a value outside, e.g. 255"
        )
    return info


def _root(cfg: DataConfig) -> Path:
    if not cfg.root:
        raise DataError(f"data.root: required for data.kind={cfg.kind!r}")
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: data.root is not a folder; fix data.root in the recipe")
    return root


def dataset_info(cfg: DataConfig) -> DatasetInfo:
    """Class names, palette and ignore index the run trains on: the dataset's own classes
    (:func:`source_info`), after ``data.class_map`` when the recipe has one.

    Example:
        >>> dataset_info(DataConfig()).class_names[:3]
        ('background', 'disc', 'box')
        >>> from training.config import ClassMapConfig
        >>> cfg = DataConfig(class_map=ClassMapConfig(classes=["ring", "disc"]))
        >>> dataset_info(cfg).class_names, dataset_info(cfg).palette[0]
        (('ring', 'disc'), (0, 130, 200))
    """
    source = source_info(cfg)
    cmap = class_map_for(cfg, source)
    if cmap is None:
        return source
    info = DatasetInfo(cmap.names, cmap.palette, source.ignore_index)
    return _check_ignore(info, "data.class_map")


def class_map_for(cfg: DataConfig, source: DatasetInfo | None = None) -> ClassMap | None:
    """``data.class_map`` resolved against the dataset's own classes; None without one."""
    if cfg.class_map is None:
        return None
    source = source or source_info(cfg)
    return resolve_class_map(cfg.class_map, source.class_names, source.palette, cfg.ignore_index)


def source_info(cfg: DataConfig) -> DatasetInfo:
    """Class names, palette and ignore index of ``cfg``'s dataset itself (before any
    ``data.class_map``), without scanning its files.

    Example:
        >>> source_info(DataConfig()).class_names[:3]
        ('background', 'disc', 'box')
    """
    if cfg.kind == "synthetic":
        mode = cfg.synthetic.mode
        info = DatasetInfo(synthetic.class_names(mode), synthetic.palette(mode), cfg.ignore_index)
    elif cfg.kind == "cityscapes":
        info = DatasetInfo(CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, cfg.ignore_index)
    elif cfg.kind == "voc":
        info = DatasetInfo(VOC_CLASSES, voc_palette(len(VOC_CLASSES)), cfg.ignore_index)
    elif cfg.kind == "folder":
        classes = read_classes_yaml(_root(cfg))
        palette = classes.colours or voc_palette(len(classes.names))
        info = DatasetInfo(classes.names, palette, cfg.ignore_index)
    elif cfg.kind in LAYOUT_KINDS:  # lists, cvat, labelme, ade20k: training/layouts.py
        from training.layouts import layout_info

        info = DatasetInfo(*layout_info(cfg, _root(cfg)), cfg.ignore_index)
    else:
        raise DataError(f"data.kind: {cfg.kind!r} is not one of {list(DATA_KINDS)}")
    return _check_ignore(info, f"the {cfg.kind} dataset")


def _resolve_split(cfg: DataConfig, split: str) -> str:
    """ "train"/"val" name the recipe's splits; any other name is used as-is (e.g. "test")."""
    return {"train": cfg.train_split, "val": cfg.val_split}.get(split, split)


def build_dataset(
    cfg: DataConfig, split: str, spec: PreprocessSpec, train: bool
) -> SegmentationDataset:
    """The dataset of ``split`` with the augmented (``train=True``) or serving transform.

    Example:
        >>> from training.config import SyntheticConfig
        >>> cfg = DataConfig(synthetic=SyntheticConfig(num_train=3, num_val=1, image_size=(32, 32)))
        >>> len(build_dataset(cfg, "train", PreprocessSpec((32, 32)), train=True))
        3
    """
    source = source_info(cfg)
    info = dataset_info(cfg)
    remap = class_map_for(cfg, source)  # applied after each kind's own decoder
    if train:
        transform: Transform = build_train_transform(cfg.augment, spec, info.ignore_index)
    else:
        transform = build_val_transform(spec)
    name = _resolve_split(cfg, split)
    if cfg.kind == "synthetic":
        aliases = {"train": "train", "val": "val", "test": "test"}
        aliases |= {cfg.train_split: "train", cfg.val_split: "val"}
        if name not in aliases:
            raise DataError(
                f"synthetic data has splits train, val and test (num_val scenes), got {split!r}"
            )
        return SyntheticDataset(info, transform, aliases[name], cfg, remap)
    root = _root(cfg)
    dataset_cls = FileDataset
    if cfg.kind in LAYOUT_KINDS:  # lists, cvat, labelme, ade20k: training/layouts.py
        from training.labelme import LabelMeDataset
        from training.layouts import layout_samples

        samples, decode = layout_samples(cfg, root, name, info.ignore_index)
        dataset_cls = LabelMeDataset if cfg.kind == "labelme" else FileDataset
    elif cfg.kind == "cityscapes":
        samples = cityscapes_samples(root, name)
        decode = cityscapes_decoder(info.ignore_index)
    elif cfg.kind == "voc":
        samples = voc_samples(root, name)
        hint = "VOC SegmentationClass masks are palette PNGs: use the original files."
        decode = index_decoder(len(VOC_CLASSES), VOC_IGNORE, info.ignore_index, hint)
    else:
        from training.layouts import folder_decoder, folder_kind_samples  # SegNet, data.split

        samples = folder_kind_samples(cfg, root, name) or folder_samples(root, name)
        decode = folder_decoder(read_classes_yaml(root), info.ignore_index)
    return dataset_cls(info, transform, samples, decode if remap is None else remap.wrap(decode))


def unwrap_subsets(dataset: Any) -> tuple[Any, list[int]]:
    """The dataset under any ``Subset`` wrappers (``data.rare_repeat``, a drawn split) and the
    indices into it that ``dataset``'s items are, in order.

    Example:
        >>> base = list("abc")
        >>> unwrap_subsets(torch.utils.data.Subset(torch.utils.data.Subset(base, [2, 0]), [1, 1]))
        (['a', 'b', 'c'], [0, 0])
    """
    base, indices = dataset, list(range(len(dataset)))
    while isinstance(base, torch.utils.data.Subset):
        indices = [base.indices[i] for i in indices]
        base = base.dataset
    return base, indices


def segmentation_collate(
    batch: Sequence[tuple[torch.Tensor, torch.Tensor]],
    size_divisor: int = SIZE_DIVISOR,
    ignore_index: int = 255,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack samples, padding bottom/right to a common multiple of ``size_divisor``.

    Images are padded with 0 (the mean colour after normalisation, as serving's ``collate``
    does) and masks with ``ignore_index``, so padding never counts in the loss or metrics.

    Example:
        >>> sample = (torch.ones(3, 30, 40), torch.zeros(30, 40, dtype=torch.long))
        >>> x, y = segmentation_collate([sample])
        >>> tuple(x.shape), int(y[0, 31, 0]), int(y[0, 0, 0])
        ((1, 3, 32, 64), 255, 0)
    """
    if not batch:
        raise ValueError("cannot collate an empty batch")
    sizes = [(int(x.shape[-2]), int(x.shape[-1])) for x, _ in batch]
    h, w = padded_size(sizes, size_divisor)
    first_image, first_mask = batch[0]
    images = first_image.new_zeros((len(batch), first_image.shape[0], h, w))
    masks = first_mask.new_full((len(batch), h, w), ignore_index)
    for i, (x, y) in enumerate(batch):
        if tuple(y.shape) != tuple(x.shape[-2:]):
            raise ValueError(f"sample {i}: mask {tuple(y.shape)} vs image {tuple(x.shape)}")
        images[i, :, : x.shape[-2], : x.shape[-1]] = x
        masks[i, : y.shape[0], : y.shape[1]] = y
    return images, masks

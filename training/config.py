"""The training recipe: typed dataclasses loaded from YAML, validated once, overridable by CLI.

Every section is a dataclass; an unknown key, a wrong type or a value outside a fixed set of
choices raises :class:`ConfigError` naming the dotted key and what is allowed.

Example:
    >>> recipe = recipe_from_dict({"model": {"arch": "FPN"}, "train": {"epochs": 2}})
    >>> recipe.model.arch, recipe.train.epochs, recipe.data.kind
    ('FPN', 2, 'synthetic')
    >>> apply_overrides(recipe, ["optim.lr=0.01"]).optim.lr
    0.01
    >>> apply_overrides(recipe, ["optim.lr=3e-4"]).optim.lr  # YAML 1.1 reads a string here
    0.0003
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from serving.properties import DEFAULT_MODEL_NAME


class ConfigError(ValueError):
    """A recipe that cannot be used; the message names the key and the fix."""


# The kinds read by training/layouts.py (listing files, CVAT, LabelMe, ADE20K).
LAYOUT_KINDS = ("lists", "cvat", "labelme", "ade20k")
DATA_KINDS = ("synthetic", "cityscapes", "voc", "folder", *LAYOUT_KINDS)
# The kinds whose data may come without split folders, for data.split to divide.
SPLITTABLE_KINDS = ("folder", "labelme", "cvat")
RESIZE_POLICIES = ("resize", "pad")
OPTIMIZERS = ("adamw", "sgd")
LR_POLICIES = ("poly", "cosine", "constant")
AMP_MODES = ("auto", "bf16", "fp16", "off")
DEVICES = ("auto", "cpu", "cuda")
EXPORT_METHODS = ("trace", "script")
SYNTHETIC_MODES = ("default", "imbalanced")
# loss.class_weights may name a method instead of listing weights (training/class_weights.py).
CLASS_WEIGHT_METHODS = ("inverse", "median_frequency")
# A float in exponent notation that YAML 1.1 leaves a string: `lr: 1e-3`, `--set optim.lr=3e-4`.
_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
# model.arch for training/bisenet.py, the one architecture that is not smp's.
BISENET_ARCH = "BiSeNetV2"

# Fields restricted to a fixed set of values: (section, field) -> allowed values.
CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("data", "kind"): DATA_KINDS,
    ("data", "resize_policy"): RESIZE_POLICIES,
    ("optim", "name"): OPTIMIZERS,
    ("schedule", "policy"): LR_POLICIES,
    ("train", "amp"): AMP_MODES,
    ("train", "device"): DEVICES,
    ("export", "method"): EXPORT_METHODS,
    ("data.synthetic", "mode"): SYNTHETIC_MODES,
}


@dataclass
class SyntheticConfig:
    """The embedded default dataset: procedurally drawn scenes, deterministic from ``seed``."""

    num_train: int = 800
    num_val: int = 160
    image_size: tuple[int, int] = (128, 128)
    seed: int = 0
    # "imbalanced": adds thin classes (poles, cables) and a rare one (a beacon in ~5 % of the
    # scenes), to reproduce rare/thin classes stuck at IoU 0 (training/synthetic.py).
    mode: str = "default"


@dataclass
class AugmentConfig:
    """Training-time augmentation (albumentations); probabilities and ranges."""

    hflip: float = 0.5
    vflip: float = 0.0
    scale: tuple[float, float] = (0.75, 1.25)
    rotate: float = 0.0
    color_jitter: float = 0.2
    noise: float = 0.1


@dataclass
class ClassMapConfig:
    """Merge, rename, keep a subset of or ignore the dataset's classes (training/class_map.py).

    ``classes``: new class → source class name(s), in new-id order; or a list of source classes
    to keep as they are. ``others``: where unlisted source classes go, ``ignore`` or a new
    class's name. ``ignore``: source classes always ignored. ``colors``: new class → [r, g, b]
    (default: its first source class's colour).
    """

    classes: dict[str, Any] | list[str] = field(default_factory=dict)
    others: str = "ignore"
    ignore: list[str] = field(default_factory=list)
    colors: dict[str, Any] = field(default_factory=dict)


@dataclass
class SplitConfig:
    """A seeded train/val/test split of data without split folders (training/splits.py).

    ``seed`` is the split's own, not the recipe's: a sweep over ``seed`` keeps one val set.
    ``dir`` holds the drawn lists ({train,val,test}.txt); null: RUN_DIR/splits, which
    training fills in, so evaluation, export and --resume reuse the lists, never a new draw.
    """

    val: float = 0.15
    test: float = 0.0
    seed: int = 0
    dir: str | None = None


@dataclass
class DataConfig:
    kind: str = "synthetic"
    root: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    input_size: tuple[int, int] = (128, 128)
    resize_policy: str = "resize"
    # None: the encoder's own normalisation (smp's preprocessing params).
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    ignore_index: int = 255
    batch_size: int = 16
    num_workers: int = 0
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # null: the dataset's own classes; see ClassMapConfig.
    class_map: ClassMapConfig | None = None
    # null: the dataset's own splits; {val: 0.15, test: 0.15}: draw them (SplitConfig).
    split: SplitConfig | None = None
    # Repeat-factor sampling (training/repeat_factor.py): an image holding a class found in
    # fewer than this fraction of the training images is shown sqrt(fraction / f) times per
    # epoch, e.g. 0.3; null: each image once.
    rare_repeat: float | None = None


@dataclass
class ModelConfig:
    arch: str = "Unet"
    encoder: str = "resnet18"
    # None trains from scratch; "imagenet" etc. downloads weights (needs internet).
    encoder_weights: str | None = None
    # Passed through to smp.create_model (e.g. decoder_channels, encoder_depth).
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class OhemConfig:
    """Online hard example mining for the CE term: only each batch's hard pixels count.

    A pixel is hard when the predicted probability of its true class is below ``threshold``
    (0.7 when neither is given: an unweighted CE above 0.357), or, with ``keep_fraction``,
    when it is among that fraction of the valid pixels with the lowest true-class probability.
    Either way at least ``min_kept`` pixels (the hardest; all of them in a smaller batch) are
    kept. Give one of ``threshold`` and ``keep_fraction``.
    """

    threshold: float | None = None
    keep_fraction: float | None = None
    min_kept: int = 10_000


@dataclass
class LossConfig:
    """``L = ce * CrossEntropy + dice * Dice + focal * Focal``; every term honours ignore_index."""

    ce: float = 1.0
    dice: float = 0.0
    focal: float = 0.0
    # One weight per class, or a method computed from the training split's pixel counts at the
    # start of a run (inverse, median_frequency; training/class_weights.py), capped at
    # class_weight_cap (null: no cap).
    class_weights: list[float] | str | None = None
    class_weight_cap: float | None = 10.0
    label_smoothing: float = 0.0
    # null: plain CE over every valid pixel; {}: OHEM with the defaults of OhemConfig.
    ohem: OhemConfig | None = None
    # The weight of each auxiliary (booster) head's label loss; only BiSeNetV2 has them.
    # null: the paper's 1.0 for BiSeNetV2.
    aux_weight: float | None = None


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9


@dataclass
class ScheduleConfig:
    """Linear warmup for ``warmup_epochs``, then ``policy`` decay to ``min_lr_ratio * lr``."""

    policy: str = "poly"
    warmup_epochs: float = 1.0
    power: float = 0.9
    min_lr_ratio: float = 0.0


@dataclass
class DistillConfig:
    """Knowledge distillation from a trained teacher run (training/losses.py).

    The student's loss adds ``weight * T^2 * KL(softmax(teacher / T) || softmax(student / T))``
    per valid pixel, T = ``temperature``. ``teacher``: the teacher's run dir; its
    ``checkpoints/best.pt`` is rebuilt, frozen and run beside the student on every batch.
    """

    teacher: str | None = None
    weight: float = 1.0
    temperature: float = 1.0


@dataclass
class TrainConfig:
    epochs: int = 20
    amp: str = "auto"
    device: str = "auto"
    grad_clip: float | None = 1.0
    early_stopping_patience: int | None = None
    early_stopping_min_delta: float = 0.0
    deterministic: bool = True
    threads: int | None = None
    progress: bool = True
    # null: no teacher; {teacher: RUN_DIR, weight: 1.0, temperature: 1.0}: see DistillConfig.
    distill: DistillConfig | None = None


@dataclass
class EvalConfig:
    boundary_tolerance: int = 2
    num_overlays: int = 4


@dataclass
class ExportConfig:
    method: str = "trace"
    # The runtimes to export (handler.artifact.RUNTIMES: torchscript, onnx, onnx_int8);
    # null: torchscript, plus onnx when export.onnx is true. torchscript is always included.
    runtimes: list[str] | None = None
    onnx: bool = False
    parity_atol: float = 1e-4
    # onnx_int8: calibrate on this many training images (evenly spaced over the split) and
    # fail the export when the val mIoU falls by more than int8_max_miou_drop from TorchScript's.
    int8_calibration_images: int = 32
    int8_max_miou_drop: float = 0.05
    # The drift baseline (metadata "drift_reference"): the served model's per-class pixel
    # fractions and confidences on this many val images, evenly spaced; 0: none.
    drift_reference_images: int = 200
    # Extra (H, W) sizes, multiples of 32, on which parity is also checked.
    parity_sizes: list[tuple[int, int]] = field(default_factory=list)
    model_name: str = DEFAULT_MODEL_NAME
    model_version: str = "1.0"


@dataclass
class TrackConfig:
    """Experiment tracking (training/tracking.py): each training run is an MLflow run, and
    evaluate/export of its run dir append to it. A tracking failure warns once, never stops
    a run.

    ``uri`` null: ``$MLFLOW_TRACKING_URI``, else the local store ``runs/mlruns`` (SQLite;
    ``make mlflow-ui`` shows it). ``experiment`` null: the recipe's ``name``. Exported model
    files are logged only while together at most ``log_model_max_mb``; above it, their list
    and sizes.
    """

    enabled: bool = True
    uri: str | None = None
    experiment: str | None = None
    log_model_max_mb: float = 200.0


@dataclass
class Recipe:
    name: str = "default"
    seed: int = 0
    output_dir: str = "runs/default"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    track: TrackConfig = field(default_factory=TrackConfig)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))


def resolve_runtimes(runtimes: typing.Sequence[str] | None, onnx: bool = False) -> tuple[str, ...]:
    """The runtimes an export writes, in ``handler.artifact.RUNTIMES`` order.

    Example:
        >>> resolve_runtimes(None), resolve_runtimes(None, onnx=True)
        (('torchscript',), ('torchscript', 'onnx'))
        >>> resolve_runtimes(["onnx_int8", "torchscript"])
        ('torchscript', 'onnx_int8')
    """
    from handler.artifact import ONNX, RUNTIMES, TORCHSCRIPT  # the runtime names' owner (torch)

    names = [TORCHSCRIPT] + ([ONNX] if onnx else []) if runtimes is None else list(runtimes)
    unknown = [n for n in names if n not in RUNTIMES]
    if unknown:
        raise ConfigError(
            f"export.runtimes: {unknown[0]!r} is not one of {list(RUNTIMES)}; "
            "e.g. export.runtimes=[torchscript, onnx, onnx_int8]"
        )
    if TORCHSCRIPT not in names:
        raise ConfigError(
            f"export.runtimes: {names} lacks torchscript, which every export carries (it embeds "
            "the metadata and is the fp32 reference); add it"
        )
    if onnx and ONNX not in names:
        names.append(ONNX)  # export.onnx: true (the older switch) still adds it
    return tuple(n for n in RUNTIMES if n in names)


def _to_plain(value: Any) -> Any:
    """Tuples → lists so the dict round-trips through YAML/JSON unchanged."""
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted (lists → tuples...)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        options = [a for a in args if a is not type(None)]
        for arg in options:
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        if len(options) == 1 and dataclasses.is_dataclass(options[0]):
            raise ConfigError(errors[0])  # an optional section: the inner key says more
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(
            _coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))
        )
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
        return float(value)  # PyYAML (YAML 1.1) reads 1e-3, no dot, as a string
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp in (int, str) and isinstance(value, tp) and not isinstance(value, bool):
        return value
    if tp is Any:
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = f"'{prefix}'" if prefix else "the recipe"
        raise ConfigError(
            f"unknown key {prefix + '.' if prefix else ''}{unknown[0]} in {where}; "
            f"allowed keys: {', '.join(names)}"
        )
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key)
        allowed = CHOICES.get((prefix, name))
        if allowed is not None and kwargs[name] not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {list(allowed)}")
    return cls(**kwargs)


def _check(recipe: Recipe) -> Recipe:
    """Cross-field rules that a single type cannot express."""
    h, w = recipe.data.input_size
    if h % 32 or w % 32 or h <= 0 or w <= 0:
        raise ConfigError(
            f"data.input_size: {[h, w]} must be positive multiples of 32 (smp encoders "
            "downsample 5 times); e.g. [128, 128] or [512, 1024]"
        )
    if recipe.loss.ce < 0 or recipe.loss.dice < 0 or recipe.loss.focal < 0:
        raise ConfigError("loss: ce, dice and focal weights must be >= 0")
    if recipe.loss.ce + recipe.loss.dice + recipe.loss.focal == 0:
        raise ConfigError("loss: at least one of ce, dice, focal must be > 0")
    _check_loss(recipe.loss)
    _check_bisenet_and_distill(recipe)
    if recipe.data.class_map is not None:
        from training.class_map import parse_targets  # its shape; the names need the dataset

        parse_targets(recipe.data.class_map)
    if recipe.train.epochs < 1:
        raise ConfigError(f"train.epochs: must be >= 1, got {recipe.train.epochs}")
    if recipe.data.batch_size < 1:
        raise ConfigError(f"data.batch_size: must be >= 1, got {recipe.data.batch_size}")
    if recipe.data.kind != "synthetic" and not recipe.data.root:
        raise ConfigError(f"data.root: required for data.kind={recipe.data.kind!r}")
    _check_split(recipe.data)
    if recipe.data.rare_repeat is not None and not 0 < recipe.data.rare_repeat <= 1:
        raise ConfigError(
            "data.rare_repeat: a fraction of the training images in (0, 1], e.g. 0.3 "
            f"(or null: no repeats), got {recipe.data.rare_repeat}"
        )
    if (recipe.data.mean is None) != (recipe.data.std is None):
        raise ConfigError("data.mean and data.std: give both or neither")
    resolve_runtimes(recipe.export.runtimes, recipe.export.onnx)
    if recipe.export.int8_calibration_images < 1:
        raise ConfigError(
            "export.int8_calibration_images: must be >= 1, got "
            f"{recipe.export.int8_calibration_images}"
        )
    if recipe.export.drift_reference_images < 0:
        raise ConfigError(
            "export.drift_reference_images: must be >= 0 (0: no drift baseline), got "
            f"{recipe.export.drift_reference_images}"
        )
    if not 0 <= recipe.export.int8_max_miou_drop <= 1:
        raise ConfigError(
            f"export.int8_max_miou_drop: must be in [0, 1] (an mIoU difference), got "
            f"{recipe.export.int8_max_miou_drop}"
        )
    for size in recipe.export.parity_sizes:
        if size[0] % 32 or size[1] % 32:
            raise ConfigError(f"export.parity_sizes: {list(size)} is not a multiple of 32")
    return recipe


def _check_split(data: DataConfig) -> None:
    """data.split: only for kinds that may lack split folders; fractions that leave training."""
    split = data.split
    if split is None:
        return
    if data.kind not in SPLITTABLE_KINDS:
        raise ConfigError(
            f"data.split: data.kind={data.kind!r} comes with its own splits; remove data.split "
            f"(it divides {', '.join(SPLITTABLE_KINDS)} data without split folders)"
        )
    if not 0 < split.val < 1:
        raise ConfigError(f"data.split.val: must be in (0, 1), e.g. 0.15, got {split.val}")
    if not 0 <= split.test < 1:
        raise ConfigError(f"data.split.test: must be in [0, 1), e.g. 0.15, got {split.test}")
    if split.val + split.test >= 1:
        raise ConfigError(
            f"data.split: val {split.val} + test {split.test} leave nothing to train on; "
            "keep their sum below 1"
        )
    for key in ("train_split", "val_split"):
        if getattr(data, key) not in ("train", "val", "test"):
            raise ConfigError(
                f"data.{key}: {getattr(data, key)!r} is not a split data.split makes; use "
                "train, val or test"
            )


def _check_bisenet_and_distill(recipe: Recipe) -> None:
    """loss.aux_weight only where there are auxiliary heads; train.distill's numbers (its
    teacher run is read when training starts: training.model.load_teacher)."""
    bisenet = recipe.model.arch.lower() == BISENET_ARCH.lower()
    aux = recipe.loss.aux_weight
    if aux is not None and not bisenet:
        raise ConfigError(
            f"loss.aux_weight: only {BISENET_ARCH} has auxiliary heads, model.arch is "
            f"{recipe.model.arch!r}; remove loss.aux_weight"
        )
    if aux is not None and aux < 0:
        raise ConfigError(f"loss.aux_weight: must be >= 0 (0: heads unused), got {aux}")
    if bisenet and recipe.data.batch_size < 2:
        raise ConfigError(
            f"data.batch_size: {BISENET_ARCH}'s context embedding batch-normalises one pooled "
            f"value per image, so training needs >= 2 images per batch, got "
            f"{recipe.data.batch_size}"
        )
    distill = recipe.train.distill
    if distill is None:
        return
    if not distill.teacher:
        raise ConfigError(
            "train.distill.teacher: required: the run dir of a trained teacher, e.g. "
            "train.distill={teacher: runs/teacher, weight: 1.0, temperature: 2.0}"
        )
    if distill.weight < 0:
        raise ConfigError(f"train.distill.weight: must be >= 0, got {distill.weight}")
    if not distill.temperature > 0:
        raise ConfigError(
            f"train.distill.temperature: must be > 0 (1: plain softmax), got {distill.temperature}"
        )


def _check_loss(loss: LossConfig) -> None:
    """Class-weight methods and OHEM settings (weights' length is checked in build_loss)."""
    if isinstance(loss.class_weights, str) and loss.class_weights not in CLASS_WEIGHT_METHODS:
        raise ConfigError(
            f"loss.class_weights: {loss.class_weights!r} is not one of "
            f"{list(CLASS_WEIGHT_METHODS)} (or a list of one weight per class, or null)"
        )
    if loss.class_weight_cap is not None and loss.class_weight_cap <= 0:
        raise ConfigError(
            f"loss.class_weight_cap: must be > 0 (or null: no cap), got {loss.class_weight_cap}"
        )
    ohem = loss.ohem
    if ohem is None:
        return
    if loss.ce <= 0:
        raise ConfigError("loss.ohem: mines the CE term, but loss.ce is 0; set loss.ce > 0")
    if ohem.threshold is not None and ohem.keep_fraction is not None:
        raise ConfigError(
            "loss.ohem: give one of threshold (a true-class probability, e.g. 0.7) and "
            "keep_fraction (e.g. 0.25), not both; set the other to null"
        )
    if ohem.threshold is not None and not 0 < ohem.threshold <= 1:
        raise ConfigError(f"loss.ohem.threshold: must be in (0, 1], got {ohem.threshold}")
    if ohem.keep_fraction is not None and not 0 < ohem.keep_fraction <= 1:
        raise ConfigError(f"loss.ohem.keep_fraction: must be in (0, 1], got {ohem.keep_fraction}")
    if ohem.min_kept < 0:
        raise ConfigError(f"loss.ohem.min_kept: must be >= 0, got {ohem.min_kept}")


def recipe_from_dict(data: dict[str, Any] | None) -> Recipe:
    """Validate a plain mapping (e.g. parsed YAML) into a :class:`Recipe`."""
    return _check(_build(Recipe, data or {}, ""))


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe, apply ``key.sub=value`` overrides, validate."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: recipe not found; see configs/ for examples") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe is a YAML mapping, got {type(data).__name__}")
    try:
        return apply_overrides(recipe_from_dict(data), overrides or [])
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def apply_overrides(recipe: Recipe, overrides: list[str]) -> Recipe:
    """Return a new recipe with ``section.key=value`` items applied (values parsed as YAML)."""
    data = recipe.to_dict()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.sub=value, e.g. train.epochs=5")
        dotted, raw = item.split("=", 1)
        node = data
        parts = dotted.strip().split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = node[part]
        node[parts[-1]] = yaml.safe_load(raw)
    return recipe_from_dict(data)


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    """Write the resolved recipe next to a run's outputs."""
    Path(path).write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))

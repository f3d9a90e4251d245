"""Export a trained checkpoint for serving: TorchScript (+ optional ONNX and INT8 ONNX) with an
enforced parity check per runtime on real validation images. Every format-specific line lives
in this module, so moving from TorchScript (deprecated upstream) to ``torch.export`` touches
nothing else.

What is written to ``run_dir/export/``:

* ``model.pt`` — traced (``export.method: trace``, the default) or scripted, in eval mode,
  ``torch.jit.freeze``-d, with the metadata embedded as ``_extra_files["metadata.json"]``.
* ``metadata.json`` — the same metadata (docs/architecture.md), including the ``export``
  section with the parity figures.
* ``model.onnx`` — with ``onnx`` in ``export.runtimes`` (or ``export.onnx: true``); dynamic
  batch, H and W; parity enforced like TorchScript's.
* ``model.int8.onnx`` — with ``onnx_int8`` in ``export.runtimes``: ``model.onnx`` statically
  quantised by ONNX Runtime (QDQ, per-channel weights, MinMax calibration on
  ``export.int8_calibration_images`` training images through the serving preprocessing). Its
  parity is the argmax agreement fraction (no hard equality); its val mIoU and TorchScript's are
  measured with ``training.evaluate.evaluate_model`` and the export fails when the drop exceeds
  ``export.int8_max_miou_drop``.

Each runtime's file and figures are in ``metadata.json`` ``export.runtimes``
(``handler.artifact.RuntimeExport``); the files are staged, checked and only then moved in by
:func:`write_export`, which also removes a runtime file an earlier export left behind.

Input-size rule: the exported model takes any ``(N, 3, H, W)`` float batch with H and W
multiples of 32 (``preprocess.size_divisor``); ``handler.preprocessing.collate`` pads to that.
A traced smp model fed other sizes silently returns a wrong-sized map.

Parity: eager and exported logits are compared on validation images passed through the
serving preprocessing, at the traced size and at ``export.parity_sizes`` plus a non-square
size, each with batch 1 and batch 2. The export fails (:class:`ParityError`) when the max
absolute logit difference exceeds ``export.parity_atol`` or any argmax pixel differs.

Example:
    >>> report = export_run(Path("runs/default"))  # doctest: +SKIP
    >>> report["parity"]["argmax_equal"]  # doctest: +SKIP
    True
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from handler.artifact import (
    INT8_FILE,
    METADATA_FILE,
    MODEL_FILE,
    ONNX,
    ONNX_FILE,
    ONNX_INT8,
    RUNTIME_FILES,
    TORCHSCRIPT,
    DriftReference,
    ExportInfo,
    MetadataError,
    ModelMetadata,
    RuntimeExport,
    parse_metadata,
)
from handler.drift import drift_reference, image_statistics
from handler.preprocessing import (
    SIZE_DIVISOR,
    PreprocessSpec,
    collate,
    logits_to_prediction,
    prepare_image,
    rgb_array_to_tensor,
)
from handler.runtime import load_model, load_scripted_model, quiet_torchscript
from training.config import ConfigError, resolve_runtimes
from training.metrics import jsonable

PARITY_BATCH_SIZES = (1, 2)

Model = Callable[[torch.Tensor], torch.Tensor]


class ExportError(RuntimeError):
    """The model cannot be exported or the export is unusable; the message says why."""


class ParityError(ExportError):
    """The exported model's outputs differ from the eager model's."""


# --- TorchScript --------------------------------------------------------------------------------


def to_torchscript(
    model: torch.nn.Module, example: torch.Tensor, method: str = "trace"
) -> tuple[torch.jit.ScriptModule, list[str]]:
    """Trace or script ``model`` in eval mode and freeze it; returns (module, tracer warnings).

    Tracer warnings (Python values frozen into the graph) are returned, not printed: the
    parity check at several sizes is what decides whether the trace generalises.

    Example:
        >>> net = torch.nn.Conv2d(3, 2, 1)
        >>> module, _ = to_torchscript(net, torch.zeros(1, 3, 32, 32))
        >>> module(torch.zeros(1, 3, 64, 32)).shape
        torch.Size([1, 2, 64, 32])
    """
    if method not in ("trace", "script"):
        raise ExportError(f"export.method: {method!r} is not one of ['trace', 'script']")
    model = model.eval()
    with quiet_torchscript(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", torch.jit.TracerWarning)
        try:
            with torch.no_grad():
                if method == "trace":
                    module = torch.jit.trace(model, example, check_trace=False)
                else:
                    module = torch.jit.script(model)
                frozen = torch.jit.freeze(module.eval())
        except Exception as exc:  # TorchScript raises many types; all mean "cannot export"
            hint = "try export.method=script" if method == "trace" else "try export.method=trace"
            raise ExportError(
                f"torch.jit.{method} failed for {type(model).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; {hint}"
            ) from exc
    is_tracer = [issubclass(w.category, torch.jit.TracerWarning) for w in caught]
    for w, tracer_warning in zip(caught, is_tracer, strict=True):
        if not tracer_warning:  # anything else was not ours to swallow
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    tracer = sorted({str(w.message) for w, t in zip(caught, is_tracer, strict=True) if t})
    return frozen, tracer


def save_torchscript(module: torch.jit.ScriptModule, path: Path, metadata_json: str) -> None:
    """Write atomically (temp file + rename), with the metadata embedded."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with quiet_torchscript():
            torch.jit.save(module, str(tmp), _extra_files={METADATA_FILE: metadata_json})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_torchscript(path: Path, device: str = "cpu") -> tuple[torch.jit.ScriptModule, dict]:
    """Load ``model.pt`` → (module in eval mode, embedded metadata dict; {} if none)."""
    extra = {METADATA_FILE: ""}
    try:
        module = load_scripted_model(path, device, extra_files=extra)
    except (RuntimeError, ValueError, OSError) as exc:
        raise ExportError(
            f"{path}: not a loadable TorchScript model ({str(exc).splitlines()[0]}); "
            "re-run the export (`make export`)"
        ) from None
    raw = extra[METADATA_FILE]
    try:
        embedded = json.loads(raw) if raw else {}
    except json.JSONDecodeError as exc:
        raise ExportError(f"{path}: embedded metadata.json is not JSON ({exc})") from None
    return module.eval(), embedded


def load_exported(export_dir: Path, device: str = "cpu") -> tuple[Model, ModelMetadata]:
    """The exported model and its metadata; ``metadata.json`` must match the embedded copy."""
    model_path, meta_path = export_dir / MODEL_FILE, export_dir / METADATA_FILE
    if not model_path.is_file():
        raise ExportError(f"{model_path} not found: export the model first (`make export`)")
    module, embedded = load_torchscript(model_path, device)
    if meta_path.is_file():
        try:
            beside = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ExportError(f"{meta_path}: not readable JSON ({exc})") from None
        if embedded and beside != embedded:
            raise ExportError(
                f"{meta_path} differs from the metadata embedded in {model_path}: the files "
                "come from different exports; re-run the export"
            )
    elif not embedded:
        raise ExportError(f"{meta_path} not found and {model_path} embeds no metadata")
    else:
        beside = embedded
    try:
        return module, parse_metadata(beside)
    except MetadataError as exc:
        raise ExportError(f"{meta_path}: {exc}") from None


def write_export(
    module: torch.jit.ScriptModule,
    metadata: ModelMetadata,
    export_dir: Path,
    runtime_files: Mapping[str, Path] | None = None,
) -> tuple[Path, Path]:
    """The one writer of an export: ``model.pt`` (metadata embedded) + ``metadata.json``, and
    the other runtimes' model files.

    ``runtime_files`` maps a runtime the metadata lists (``export.runtimes``) to a staged file
    in ``export_dir``'s file system, moved in under the listed name; every other runtime file
    (``handler.artifact.RUNTIME_FILES``) is removed, since one left by an earlier export would
    not be this model. ``metadata.json`` is written last.

    Example:
        >>> import tempfile
        >>> meta = ModelMetadata("m", "1", ("bg", "fg"), ((0, 0, 0), (9, 9, 9)),
        ...                      PreprocessSpec(input_size=(32, 32)))
        >>> with quiet_torchscript():
        ...     module = torch.jit.script(torch.nn.Conv2d(3, 2, 1))
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     model_path, meta_path = write_export(module, meta, Path(tmp))
        ...     load_exported(Path(tmp))[1] == meta
        True
    """
    text = metadata.to_json()
    export_dir.mkdir(parents=True, exist_ok=True)
    listed = dict(metadata.export.runtimes) if metadata.export is not None else {}
    staged = dict(runtime_files or {})
    for name in staged:
        if name == TORCHSCRIPT or name not in listed:
            raise ExportError(
                f"write_export: a {name} file was given but the metadata's export.runtimes "
                f"does not list {name} (or it is model.pt, written from the module)"
            )
    for name, file in RUNTIME_FILES.items():
        if name != TORCHSCRIPT and name not in staged:
            (export_dir / file).unlink(missing_ok=True)
    for name, path in staged.items():
        os.replace(path, export_dir / listed[name].file)
    model_path, meta_path = export_dir / MODEL_FILE, export_dir / METADATA_FILE
    save_torchscript(module, model_path, text)
    meta_path.write_text(text + "\n", encoding="utf-8")
    return model_path, meta_path


# --- ONNX ---------------------------------------------------------------------------------------


def to_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    """``torch.onnx.export`` (the torch.export-based exporter) with dynamic batch, H and W."""
    try:
        import onnxscript  # noqa: F401  (the exporter needs it; fail with the fix, not deep inside)
    except ImportError:
        raise ExportError("ONNX export needs onnxscript: pip install onnxscript") from None
    batch = torch.export.Dim("batch", min=1)
    h, w = torch.export.Dim("h32", min=1), torch.export.Dim("w32", min=1)
    divisor = SIZE_DIVISOR
    try:
        torch.onnx.export(
            model.eval(),
            (example,),
            str(path),
            dynamo=True,
            input_names=["input"],
            output_names=["logits"],
            dynamic_shapes=({0: batch, 2: divisor * h, 3: divisor * w},),
            external_data=False,
            verbose=False,
        )
    except Exception as exc:  # the exporter raises many types; all mean "cannot export"
        raise ExportError(
            f"ONNX export failed for {type(model).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from exc


def onnx_runner(path: Path, runtime: str = ONNX) -> Model:
    """``path`` through :func:`handler.runtime.load_model` (the loader the handler uses), on
    CPU with torch's thread count; an onnxruntime failure becomes a :class:`ParityError`."""
    try:
        model = load_model(path, runtime, "cpu", threads=torch.get_num_threads())
    except (RuntimeError, FileNotFoundError) as exc:
        raise ExportError(str(exc)) from None

    def run(x: torch.Tensor) -> torch.Tensor:
        try:
            return model(x)
        except Exception as exc:  # onnxruntime's own error types
            raise ParityError(
                f"{runtime} model fails on input {tuple(x.shape)}: {str(exc).splitlines()[0]}"
            ) from None

    return run


# --- INT8 ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Int8Calibration:
    """What an ``onnx_int8`` export needs besides the model.

    ``images``: RGB uint8 training images to calibrate on; ``val_dataset``: the labelled
    validation split (``len`` and ``load_raw(i) -> (rgb, labels, name)``, as
    ``training.evaluate.evaluate_model`` takes) on which both mIoUs are measured.
    """

    images: Sequence[np.ndarray]
    val_dataset: Any
    max_miou_drop: float = 0.05
    batch_size: int = 8
    boundary_tolerance: int = 2


def calibration_batches(images: Sequence[np.ndarray], spec: PreprocessSpec) -> list[np.ndarray]:
    """Each image as the handler feeds it (``prepare_image`` + ``collate``), batch 1, numpy."""
    if not images:
        raise ExportError("onnx_int8 needs calibration images; the train split is empty")
    batches = []
    for rgb in images:
        rgb = rgb if rgb.flags.writeable else rgb.copy()
        x, _ = prepare_image(rgb_array_to_tensor(rgb), spec)
        batches.append(collate([x], spec).numpy())
    return batches


def quantize_int8(fp32_path: Path, out_path: Path, batches: Sequence[np.ndarray]) -> None:
    """ONNX Runtime static quantisation: pre-processing (shape inference + graph optimisation),
    then QDQ with per-channel INT8 weights and UINT8 activations, MinMax-calibrated on
    ``batches``."""
    try:
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quant_pre_process,
            quantize_static,
        )
    except ImportError:
        raise ExportError("INT8 export needs onnxruntime: pip install onnxruntime") from None

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches: Iterator[np.ndarray] = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._batches, None)
            return None if batch is None else {"input": batch}

    pre = out_path.with_name(f".{out_path.stem}.pre.onnx")
    try:
        quant_pre_process(str(fp32_path), str(pre))
        quantize_static(
            str(pre),
            str(out_path),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
    except Exception as exc:  # onnx/onnxruntime raise many types; all mean "cannot quantise"
        raise ExportError(
            f"INT8 quantisation of {fp32_path.name} failed: "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from exc
    finally:
        pre.unlink(missing_ok=True)


def val_miou(model: Model, metadata: ModelMetadata, int8: Int8Calibration) -> float:
    """The val-split mIoU of the masks ``model`` serves (``training.evaluate.evaluate_model``)."""
    from training.evaluate import EvalTarget, evaluate_model  # evaluate imports this module

    target = EvalTarget(metadata.class_names, metadata.palette, metadata.ignore_index)
    metrics = evaluate_model(
        model,
        int8.val_dataset,
        metadata.preprocess,
        target,
        out_dir=None,
        boundary_tolerance=int8.boundary_tolerance,
        batch_size=int8.batch_size,
    )
    return float(metrics["miou"])


def check_miou_drop(fp32: float, int8: float, max_drop: float) -> float:
    """``fp32 - int8``, or a :class:`ParityError` when above ``max_drop`` (or not finite).

    Example:
        >>> round(check_miou_drop(0.80, 0.79, 0.05), 4)
        0.01
        >>> try:
        ...     check_miou_drop(0.80, 0.70, 0.05)
        ... except ParityError as exc:
        ...     print(str(exc)[:53])
        onnx_int8: val mIoU drop 0.1000 (fp32 0.8000, int8 0.
    """
    drop = fp32 - int8
    if not np.isfinite(drop):
        raise ParityError(
            f"onnx_int8: val mIoU is not finite (fp32 {fp32}, int8 {int8}): the val split has "
            "no labelled pixels to measure the INT8 model on"
        )
    if drop > max_drop:
        raise ParityError(
            f"onnx_int8: val mIoU drop {drop:.4f} (fp32 {fp32:.4f}, int8 {int8:.4f}) > "
            f"export.int8_max_miou_drop {max_drop:g}; calibrate on more images "
            "(export.int8_calibration_images) or leave onnx_int8 out of export.runtimes"
        )
    return drop


# --- parity -------------------------------------------------------------------------------------


def parity_sizes(input_size: tuple[int, int], extra: Sequence[Sequence[int]]) -> list[list[int]]:
    """The traced size, the recipe's extra sizes, and a non-square size if none is given.

    Example:
        >>> parity_sizes((128, 128), [])
        [[128, 128], [64, 128]]
    """
    sizes = [list(input_size)] + [list(s) for s in extra]
    if all(h == w for h, w in sizes):
        h, w = input_size
        sizes.append([max(32, h // 2 // 32 * 32), w] if h >= 64 else [h, w + 32])
    unique: list[list[int]] = []
    for size in sizes:
        if size[0] % 32 or size[1] % 32:
            raise ExportError(f"parity size {size} is not a multiple of 32 (the input-size rule)")
        if size not in unique:
            unique.append(size)
    return unique


def parity_batches(
    images: Sequence[np.ndarray], spec: PreprocessSpec, sizes: Sequence[Sequence[int]]
) -> list[torch.Tensor]:
    """Real images through the serving preprocessing, resized to each size, batch 1 and 2."""
    if not images:
        raise ExportError("parity needs at least one validation image; the val split is empty")
    batches = []
    for size in sizes:
        at_size = PreprocessSpec(
            input_size=(int(size[0]), int(size[1])),
            resize_policy="resize",
            size_divisor=spec.size_divisor,
            mean=spec.mean,
            std=spec.std,
        )
        prepared = [prepare_image(rgb_array_to_tensor(rgb), at_size)[0] for rgb in images]
        for n in PARITY_BATCH_SIZES:
            batches.append(torch.stack([prepared[i % len(prepared)] for i in range(n)]))
    return batches


def _paired_outputs(
    reference: Model, candidate: Model, x: torch.Tensor, what: str
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """Both models' logits for ``x`` (and its shape); a different output shape fails."""
    expected, got = reference(x), candidate(x)
    shape = tuple(x.shape)
    if got.shape != expected.shape:
        raise ParityError(
            f"{what}: output shape {tuple(got.shape)} != eager {tuple(expected.shape)} "
            f"for input {shape}"
        )
    return expected, got, shape


@torch.no_grad()
def check_parity(
    reference: Model, candidate: Model, batches: Sequence[torch.Tensor], atol: float, what: str
) -> dict[str, Any]:
    """Compare logits batch by batch; raise :class:`ParityError` on the first failure.

    Example:
        >>> net = torch.nn.Conv2d(3, 2, 1).eval()
        >>> check_parity(net, net, [torch.ones(1, 3, 32, 32)], 1e-6, "same")["argmax_equal"]
        parity same input (1, 3, 32, 32): max |logit diff| 0, argmax diff 0
        True
    """
    worst = 0.0
    for x in batches:
        expected, got, shape = _paired_outputs(reference, candidate, x, what)
        diff = float((got.float() - expected.float()).abs().max())
        differing = int((got.argmax(1) != expected.argmax(1)).sum())
        print(f"parity {what} input {shape}: max |logit diff| {diff:.3g}, argmax diff {differing}")
        if not diff <= atol:  # also catches NaN
            raise ParityError(
                f"{what}: max |logit diff| {diff:.3g} > export.parity_atol {atol:g} for input "
                f"{shape}; the export does not reproduce the model at this size "
                "(try export.method=script, or check the model for size-dependent Python code)"
            )
        if differing:
            raise ParityError(
                f"{what}: argmax differs on {differing} pixels for input {shape} although "
                f"max |logit diff| is {diff:.3g}; the served masks would differ"
            )
        worst = max(worst, diff)
    sizes = sorted({(int(x.shape[2]), int(x.shape[3])) for x in batches})
    return {
        "max_abs_logit_diff": worst,
        "argmax_equal": True,
        "atol": atol,
        "sizes": [list(s) for s in sizes],
        "batch_sizes": sorted({int(x.shape[0]) for x in batches}),
    }


@torch.no_grad()
def check_agreement(
    reference: Model, candidate: Model, batches: Sequence[torch.Tensor], what: str
) -> dict[str, Any]:
    """Argmax agreement (fraction of pixels whose class is the same) of a candidate that is
    not expected to match exactly (INT8); only a wrong output shape fails.

    Example:
        >>> net = torch.nn.Conv2d(3, 2, 1).eval()
        >>> check_agreement(net, net, [torch.ones(1, 3, 32, 32)], "same")["argmax_agreement"]
        parity same input (1, 3, 32, 32): max |logit diff| 0, argmax agreement 1
        1.0
    """
    worst_diff, agreed, total, worst_agreement = 0.0, 0, 0, 1.0
    for x in batches:
        expected, got, shape = _paired_outputs(reference, candidate, x, what)
        diff = float((got.float() - expected.float()).abs().max())
        same = int((got.argmax(1) == expected.argmax(1)).sum())
        pixels = expected.shape[0] * expected.shape[2] * expected.shape[3]
        print(f"parity {what} input {shape}: max |logit diff| {diff:.3g}, "
              f"argmax agreement {same / pixels:.4g}")  # fmt: skip
        worst_diff = max(worst_diff, diff) if np.isfinite(diff) else float("inf")
        agreed, total = agreed + same, total + pixels
        worst_agreement = min(worst_agreement, same / pixels)
    sizes = sorted({(int(x.shape[2]), int(x.shape[3])) for x in batches})
    return {
        "argmax_agreement": agreed / total,
        "argmax_agreement_min": worst_agreement,
        "max_abs_logit_diff": worst_diff,
        "sizes": [list(s) for s in sizes],
        "batch_sizes": sorted({int(x.shape[0]) for x in batches}),
    }


# --- the drift baseline ------------------------------------------------------------------------


def evenly_spaced(size: int, n: int) -> list[int]:
    """Up to ``n`` indices spread evenly over ``range(size)``, first and last included.

    >>> evenly_spaced(10, 4), evenly_spaced(3, 8), evenly_spaced(5, 0)
    ([0, 3, 6, 9], [0, 1, 2], [])
    """
    n = min(n, size)
    if n <= 0:
        return []
    return sorted({round(i * (size - 1) / max(n - 1, 1)) for i in range(n)})


@torch.inference_mode()
def measure_drift_reference(
    model: Callable[[torch.Tensor], torch.Tensor],
    images: Sequence[np.ndarray],
    metadata: ModelMetadata,
) -> DriftReference:
    """The served model's per-class statistics on validation images (handler.drift), each
    image through the serving preprocessing on its own, as the handler measures live traffic."""
    spec, stats = metadata.preprocess, []
    for rgb in images:
        x, geometry = prepare_image(rgb_array_to_tensor(np.ascontiguousarray(rgb)), spec)
        logits = model(collate([x], spec))[0]
        mask, _ = logits_to_prediction(logits, geometry, with_confidence=False)
        stats.append(image_statistics(mask.cpu().numpy(), logits, geometry, metadata.num_classes))
    return drift_reference(metadata.class_names, stats)


# --- the whole export ---------------------------------------------------------------------------


def export_model(
    model: torch.nn.Module,
    metadata: ModelMetadata,
    images: Sequence[np.ndarray],
    export_dir: Path,
    method: str = "trace",
    parity_atol: float = 1e-4,
    extra_sizes: Sequence[Sequence[int]] = (),
    onnx: bool = False,
    runtimes: Sequence[str] | None = None,
    int8: Int8Calibration | None = None,
    drift_images: Sequence[np.ndarray] = (),
) -> dict[str, Any]:
    """Export an eager model with its metadata (its ``export`` section is set here) into
    ``export_dir``, one model file per runtime.

    ``drift_images``: validation images on which the TorchScript model's drift baseline is
    measured (metadata ``drift_reference``); none: no baseline, no drift rules for this model.

    ``images`` are real RGB uint8 validation images for the parity check. ``runtimes``
    (default: torchscript, plus onnx when ``onnx``) see :func:`training.config.resolve_runtimes`;
    ``onnx_int8`` needs ``int8`` (calibration images and the labelled val split). Returns the
    report (paths, parity figures, tracer warnings, the written metadata as a dict); nothing is
    written if any runtime fails its check.
    """
    try:
        runtimes = resolve_runtimes(runtimes, onnx)
    except ConfigError as exc:
        raise ExportError(str(exc)) from None
    if ONNX_INT8 in runtimes and int8 is None:
        raise ExportError(
            "onnx_int8 needs calibration images and a labelled val split (export_model(..., "
            "int8=Int8Calibration(...)); export_run builds them from the recipe)"
        )
    model = model.cpu().eval()
    spec = metadata.preprocess
    batches = parity_batches(images, spec, parity_sizes(spec.input_size, extra_sizes))
    module, tracer_warnings = to_torchscript(model, batches[0], method)
    parity = check_parity(model, module, batches, parity_atol, f"torchscript ({method})")
    sections = {TORCHSCRIPT: RuntimeExport(MODEL_FILE, jsonable(parity))}
    export_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=export_dir))
    staged: dict[str, Path] = {}
    try:
        if ONNX in runtimes or ONNX_INT8 in runtimes:  # INT8 is quantised from model.onnx
            fp32_path = staging / ONNX_FILE
            to_onnx(model, batches[1], fp32_path)  # batch 2: a batch of 1 would be specialised
            onnx_parity = check_parity(model, onnx_runner(fp32_path), batches, parity_atol, ONNX)
            if ONNX in runtimes:
                sections[ONNX] = RuntimeExport(ONNX_FILE, jsonable(onnx_parity))
                staged[ONNX] = fp32_path
        if int8 is not None and ONNX_INT8 in runtimes:
            int8_path = staging / INT8_FILE
            quantize_int8(fp32_path, int8_path, calibration_batches(int8.images, spec))
            sections[ONNX_INT8] = int8_export(model, module, int8_path, batches, metadata, int8)
            staged[ONNX_INT8] = int8_path
        info = ExportInfo(
            format="torchscript",
            method=method,
            torch_version=torch.__version__.split("+")[0],
            runtimes=sections,
        )
        # numpy scalars from the metrics become plain JSON numbers
        full = replace(
            metadata,
            metrics=jsonable(dict(metadata.metrics)),
            recipe=jsonable(dict(metadata.recipe)),
            export=info,
            drift_reference=(
                measure_drift_reference(module, drift_images, metadata)
                if drift_images
                else metadata.drift_reference
            ),
        )
        model_path, meta_path = write_export(module, full, export_dir, staged)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    files = {name: str(export_dir / rt.file) for name, rt in sections.items()}
    return {
        "tracer_warnings": tracer_warnings,
        "model_path": str(model_path),
        "metadata_path": str(meta_path),
        "parity": parity,
        "onnx_path": files.get(ONNX),
        "onnx_parity": sections[ONNX].to_dict()["parity"] if ONNX in sections else None,
        "runtime_files": files,
        "int8": sections[ONNX_INT8].to_dict() if ONNX_INT8 in sections else None,
        "metadata": full.to_dict(),
    }


def int8_export(
    model: torch.nn.Module,
    module: torch.jit.ScriptModule,
    int8_path: Path,
    batches: Sequence[torch.Tensor],
    metadata: ModelMetadata,
    int8: Int8Calibration,
) -> RuntimeExport:
    """The INT8 model's section: argmax agreement with the eager model on the parity batches,
    val mIoU of TorchScript and INT8, the drop (checked against ``int8.max_miou_drop``)."""
    runner = onnx_runner(int8_path, ONNX_INT8)
    agreement = check_agreement(model, runner, batches, ONNX_INT8)
    fp32_miou = val_miou(module, metadata, int8)
    int8_miou = val_miou(runner, metadata, int8)
    drop = check_miou_drop(fp32_miou, int8_miou, int8.max_miou_drop)
    print(f"{ONNX_INT8}: val mIoU {int8_miou:.4f} (torchscript {fp32_miou:.4f}, drop {drop:.4f})")
    return RuntimeExport(
        INT8_FILE,
        jsonable(agreement | {"max_miou_drop": int8.max_miou_drop}),
        val_miou=int8_miou,
        val_miou_fp32=fp32_miou,
        miou_drop=drop,
    )


def _eval_metrics(run_dir: Path, checkpoint: Path) -> dict | None:
    """``eval/metrics.json`` when it was computed from this very checkpoint (adds boundary F1)."""
    from training.evaluate import read_metrics

    return read_metrics(run_dir / "eval", checkpoint)


def export_run(
    run_dir: Path,
    checkpoint: Path | None = None,
    onnx: bool | None = None,
    runtimes: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Export ``run_dir``'s checkpoint (default ``checkpoints/best.pt``) to ``run_dir/export``.

    ``runtimes`` (default: the recipe's ``export.runtimes``) and ``onnx`` (default: the recipe's
    ``export.onnx``) choose the runtimes; for ``onnx_int8`` the calibration images are
    ``export.int8_calibration_images`` training images, evenly spaced over the split.

    Example:
        >>> export_run(Path("runs/default"), onnx=False)["model_path"]  # doctest: +SKIP
        'runs/default/export/model.pt'
    """
    from training.checkpoint import load_checkpoint
    from training.config import recipe_from_dict
    from training.datasets import build_dataset
    from training.model import model_from_checkpoint
    from training.resolve import metrics_summary

    run_dir = Path(run_dir)
    checkpoint = Path(checkpoint) if checkpoint else run_dir / "checkpoints" / "best.pt"
    ckpt = load_checkpoint(checkpoint)
    recipe = recipe_from_dict(ckpt["recipe"])
    model = model_from_checkpoint(ckpt)
    try:
        metadata = parse_metadata(ckpt["metadata"])
    except MetadataError as exc:
        raise ExportError(f"{checkpoint}: its metadata is not servable: {exc}") from None
    metadata = replace(
        metadata,
        model_name=recipe.export.model_name,
        model_version=recipe.export.model_version,
        source_checkpoint=str(checkpoint),
    )
    evaluated = _eval_metrics(run_dir, checkpoint)
    if evaluated:
        metadata = replace(metadata, metrics=metrics_summary(evaluated, metadata.class_names))
    try:
        chosen = resolve_runtimes(
            recipe.export.runtimes if runtimes is None else runtimes,
            recipe.export.onnx if onnx is None else onnx,
        )
    except ConfigError as exc:
        raise ExportError(str(exc)) from None
    dataset = build_dataset(recipe.data, "val", metadata.preprocess, train=False)
    images = [dataset.load_raw(i)[0] for i in range(min(2, len(dataset)))]
    drift = evenly_spaced(len(dataset), recipe.export.drift_reference_images)
    int8 = None
    if ONNX_INT8 in chosen:
        train_set = build_dataset(recipe.data, "train", metadata.preprocess, train=False)
        picks = evenly_spaced(len(train_set), recipe.export.int8_calibration_images)
        int8 = Int8Calibration(
            images=[train_set.load_raw(i)[0] for i in picks],
            val_dataset=dataset,
            max_miou_drop=recipe.export.int8_max_miou_drop,
            batch_size=recipe.data.batch_size,
            boundary_tolerance=recipe.eval.boundary_tolerance,
        )
    report = export_model(
        model,
        metadata,
        images,
        run_dir / "export",
        method=recipe.export.method,
        parity_atol=recipe.export.parity_atol,
        extra_sizes=recipe.export.parity_sizes,
        runtimes=chosen,
        int8=int8,
        drift_images=[dataset.load_raw(i)[0] for i in drift],
    )
    from training.tracking import for_run_dir  # the run's MLflow run, if it has one

    for_run_dir(run_dir).log_export(run_dir / "export", report, recipe.track.log_model_max_mb)
    return report

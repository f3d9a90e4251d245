"""Load an exported model the same way wherever it runs: the one model loader.

:func:`load_model` turns a runtime's model file (``handler.artifact.RUNTIME_FILES``) into a
callable ``(N, 3, H, W) float tensor -> (N, C, H, W) float tensor``: TorchScript through
:func:`load_scripted_model`, ONNX and INT8 ONNX through an ONNX Runtime session (CPU execution
provider; CUDA's when the device is CUDA and onnxruntime has it). The handler, the offline
predictor (``training.predict.Predictor``), the export's parity check and the archiver's
``--runtime auto`` timing all load through it, so a served mask and an offline mask come from
the same executor. ``onnxruntime`` is imported only for the ONNX runtimes.

Why the profiling executor is switched off: TorchScript's default (profiling) executor
re-profiles and re-optimises a graph for the first calls of every new input shape. A server
sees a new shape for each batch size (and, with resize policy ``pad``, each image size), and on
this project's 2-core CPU those calls measured 1-3 s against ~60 ms once settled. The legacy
executor runs the same frozen graph without that per-shape warm-up; on CPU, where TorchScript
fuses nothing by default, the numbers it produces are the same.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from handler.artifact import ONNX, ONNX_INT8, RUNTIMES, TORCHSCRIPT

logger = logging.getLogger(__name__)

Model = Callable[[torch.Tensor], torch.Tensor]

# torch 2.15 marks every torch.jit entry point deprecated with this warning; we know, and it is
# still the format TorchServe's default path loads.
TORCHSCRIPT_DEPRECATION = r"`torch\.jit\.\w+` is deprecated"


@contextlib.contextmanager
def quiet_torchscript() -> Iterator[None]:
    """Silence only torch's "torch.jit.* is deprecated" warnings, nothing else: the one filter
    the loader, the export, the benchmarks and the tests use.

    >>> with quiet_torchscript():
    ...     warnings.warn("`torch.jit.trace` is deprecated", FutureWarning)
    """
    with warnings.catch_warnings():
        for category in (FutureWarning, DeprecationWarning):
            warnings.filterwarnings("ignore", message=TORCHSCRIPT_DEPRECATION, category=category)
        yield


def load_scripted_model(
    path: str | Path,
    device: str | torch.device = "cpu",
    extra_files: dict[str, str] | None = None,
) -> torch.jit.ScriptModule:
    """``torch.jit.load`` in eval mode, with the profiling executor off (process-wide).

    ``extra_files`` is filled in place like ``torch.jit.load``'s ``_extra_files``.

    Example:
        >>> model = load_scripted_model("model.pt")  # doctest: +SKIP
    """
    torch._C._jit_set_profiling_executor(False)
    with quiet_torchscript():
        kwargs = {"_extra_files": extra_files} if extra_files is not None else {}
        return torch.jit.load(str(path), map_location=device, **kwargs).eval()


class CudaSwitched:
    """A TorchScript model as a CUDA worker runs it under the archive's ``cuda_half`` and
    ``cuda_channels_last`` switches: weights cast to fp16 once, each input re-laid out
    channels-last and/or cast to fp16 on its way in. The handler and ``make bench`` both wrap
    with it, so the bench's in-process fp16 rows run what the served ones run.

    >>> model = CudaSwitched(torch.nn.Conv2d(3, 2, 1), half=False, channels_last=True)
    >>> model(torch.zeros(1, 3, 4, 4)).is_contiguous(memory_format=torch.channels_last)
    True
    """

    def __init__(self, model: Any, half: bool, channels_last: bool) -> None:
        self.model = model.half() if half else model
        self.half = half
        self.channels_last = channels_last

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.half:
            x = x.half()
        return self.model(x)


class OrtModel:
    """An ONNX Runtime session as ``Tensor -> Tensor``: the input's numpy view in (copied to
    host memory first when it lives on a GPU), the logits back as a tensor on ``device``.

    Inputs are made contiguous float32, so a caller's ``half``/``channels_last`` switches
    (TorchScript ones) cannot feed the session a layout or dtype it was not exported for.
    """

    def __init__(self, session: Any, device: torch.device, runtime: str) -> None:
        self.session = session
        self.device = device
        self.runtime = runtime
        self.input_name = session.get_inputs()[0].name
        self.output_name = session.get_outputs()[0].name
        self.providers = tuple(session.get_providers())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        (out,) = self.session.run([self.output_name], {self.input_name: array})
        logits = torch.from_numpy(out)
        return logits if self.device.type == "cpu" else logits.to(self.device)

    def __repr__(self) -> str:
        return f"OrtModel({self.runtime}, providers={list(self.providers)})"


def ort_session(path: Path, device: torch.device, threads: int | None) -> Any:
    """An ``onnxruntime.InferenceSession``: CUDA provider first on a CUDA device (when this
    onnxruntime build has it), CPU otherwise; ``threads`` intra-op threads, one inter-op."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise RuntimeError(
            f"{path}: the ONNX runtimes need onnxruntime (pip install onnxruntime, or "
            "onnxruntime-gpu for CUDA); or serve the TorchScript archive (--runtime torchscript)"
        ) from None
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda":
        if "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
        else:
            logger.warning("%s: onnxruntime has no CUDA provider here; running on CPU", path)
    return ort.InferenceSession(str(path), options, providers=providers)


def load_model(
    path: str | Path,
    runtime: str = TORCHSCRIPT,
    device: str | torch.device = "cpu",
    threads: int | None = None,
) -> Model:
    """The model in ``path`` for ``runtime`` (one of ``handler.artifact.RUNTIMES``) as a
    callable ``(N, 3, H, W) float -> (N, C, H, W) float`` on ``device``.

    ``threads``: ONNX Runtime's intra-op thread count (``None``: its default, one per core);
    TorchScript uses torch's process-wide setting (``torch.set_num_threads``), which this does
    not change.

    Example:
        >>> model = load_model("model.int8.onnx", "onnx_int8", "cpu", threads=2)  # doctest: +SKIP
        >>> load_model("model.trt", "tensorrt")
        Traceback (most recent call last):
        ...
        ValueError: runtime 'tensorrt' is not one of ['torchscript', 'onnx', 'onnx_int8']
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime {runtime!r} is not one of {list(RUNTIMES)}")
    path, device = Path(path), torch.device(device)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no {runtime} model file there (re-export, re-archive)")
    if runtime == TORCHSCRIPT:
        return load_scripted_model(path, device)
    assert runtime in (ONNX, ONNX_INT8)
    return OrtModel(ort_session(path, device, threads), device, runtime)


def time_runtimes(
    paths: Mapping[str, Path], input_size: tuple[int, int], device: str, forwards: int
) -> dict[str, float]:
    """Median milliseconds of ``forwards`` batch-1 forwards per runtime, in-process, through
    the handler's loader (``handler.runtime.load_model``), timed by :func:`time_forwards`. The
    archiver's ``--runtime auto`` and the model card (``training/card.py``) time with it."""
    threads = torch.get_num_threads()
    models = {name: load_model(path, name, device, threads=threads) for name, path in paths.items()}
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, *input_size, generator=generator).to(device)
    medians = time_forwards([(model, x) for model in models.values()], device, forwards)
    return dict(zip(models, medians, strict=True))


def time_forwards(
    calls: Sequence[tuple[Callable[[torch.Tensor], Any], torch.Tensor]],
    device: str,
    forwards: int,
    warmup: int = 2,
) -> list[float]:
    """Median milliseconds of each ``(model, input)`` over ``forwards`` timed calls, after
    ``warmup`` untimed ones (the first pay for graph optimisation and allocation).

    The models take turns, one forward each per round: load from elsewhere on the machine then
    slows them all alike instead of whichever was being timed (measured: one model 118 and 402
    ms when timed one after the other on a busy 2-core host). The sweep (``training/sweep.py``)
    times its trials' models, each at its own input size, with it.

    Example:
        >>> x = torch.zeros(1, 3, 8, 8)
        >>> [ms >= 0 for ms in time_forwards([(torch.nn.Identity(), x)] * 2, "cpu", 3)]
        [True, True]
    """
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times: list[list[float]] = [[] for _ in calls]
    with torch.inference_mode():
        for i in range(warmup + forwards):
            for (model, x), spent in zip(calls, times, strict=True):
                sync()
                started = time.perf_counter()
                model(x)
                sync()
                if i >= warmup:
                    spent.append((time.perf_counter() - started) * 1000.0)
    return [sorted(t)[len(t) // 2] for t in times]

"""Load an exported TorchScript model the same way wherever it runs.

The handler, the offline predictor and the benchmarks all call :func:`load_scripted_model`, so a
served mask and an offline mask come from the same executor.

Why the profiling executor is switched off: TorchScript's default (profiling) executor
re-profiles and re-optimises a graph for the first calls of every new input shape. A server
sees a new shape for each batch size (and, with resize policy ``pad``, each image size), and on
this project's 2-core CPU those calls measured 1-3 s against ~60 ms once settled. The legacy
executor runs the same frozen graph without that per-shape warm-up; on CPU, where TorchScript
fuses nothing by default, the numbers it produces are the same.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

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

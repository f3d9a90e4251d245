"""Checkpoints: written atomically, loaded safely, carrying everything a run needs to resume.

A checkpoint is a plain dict (keys below) saved with ``torch.save``. Its contents stay within
what ``torch.load(weights_only=True)`` accepts (tensors, numbers, strings, lists, dicts), so
loading one never runs pickled code; the numpy RNG state is stored as a tensor for that reason.

Keys: ``model`` (state_dict), ``optimizer``, ``scheduler``, ``scaler``, ``epoch`` (epochs
completed), ``global_step``, ``best_metric``, ``epochs_without_improvement``, ``rng``,
``recipe`` (dict), ``metadata`` (dict, docs/architecture.md schema without ``export``),
``metrics`` (last validation metrics).

Example:
    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "ckpt.pt"
    >>> state = {"epoch": 3, "model": {"w": torch.ones(2)}, "recipe": {}, "metadata": {}}
    >>> save_checkpoint(path, state)
    >>> load_checkpoint(path)["epoch"]
    3
"""

from __future__ import annotations

import os
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

REQUIRED_KEYS = ("model", "epoch", "recipe", "metadata")


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated or not written by segserve."""


def save_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` to ``path`` via a temporary file and a rename.

    A crash or a full disk mid-write leaves the previous checkpoint intact, never a
    half-written file that a later ``--resume`` would choke on.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: Path, map_location: Any = "cpu") -> dict:
    """Load a checkpoint dict (tensors only, no pickled code), with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint; train first or pass --checkpoint")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError) as exc:
        raise CheckpointError(
            f"{path}: not a readable segserve checkpoint ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a checkpoint dict, got {type(state).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {missing}; not written by segserve")
    return state


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) generator states, in weights_only-safe types."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "python": {
            "version": version,
            "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"].tolist()), py["gauss_next"]))
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["kind"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])

"""The machine's in-process limit for a model: the best images/s any processes x threads x batch
layout reaches on the same input, with nothing but the forward running.

Each layout starts ``processes`` fresh Python processes (spawned, so no state is shared); each
loads the model with ``threads`` intra-op threads, warms up, waits at a barrier, then runs
forwards of ``batch`` images for ``seconds``. The layout's throughput is all images finished by
all processes over the wall time. :func:`sweep` returns every layout, best first.

Example:
    >>> layouts(cores=2)
    [(1, 2), (2, 1)]
"""

from __future__ import annotations

import multiprocessing as mp
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    """One measured layout and its throughput."""

    processes: int
    threads: int
    batch: int
    images_per_s: float


def layouts(cores: int) -> list[tuple[int, int]]:
    """(processes, threads) pairs with ``processes x threads <= cores`` that use more than half
    of the cores (fewer only leave cores idle)."""
    pairs = []
    for processes in range(1, cores + 1):
        for threads in range(1, cores // processes + 1):
            if processes * threads * 2 > cores:
                pairs.append((processes, threads))
    return pairs


def _worker(
    load: Callable[[int], Callable],
    threads: int,
    batch: int,
    size: tuple[int, int],
    seconds: float,
    barrier: mp.synchronize.Barrier,
    counts: mp.Queue,
) -> None:
    import torch

    torch.set_num_threads(threads)
    model = load(threads)
    x = torch.randn(batch, 3, *size)
    with torch.inference_mode():
        for _ in range(2):
            model(x)
        barrier.wait()
        done, deadline = 0, time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            model(x)
            done += batch
    counts.put((done, time.perf_counter()))


def measure_layout(
    load: Callable[[int], Callable],
    processes: int,
    threads: int,
    batch: int,
    size: tuple[int, int],
    seconds: float = 4.0,
) -> Layout:
    """Images/s of ``processes`` processes running ``load(threads)``'s model at ``batch``.

    ``load`` must be picklable (a module-level function or ``functools.partial``)."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(processes + 1)
    counts = ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(load, threads, batch, size, seconds, barrier, counts))
        for _ in range(processes)
    ]
    for p in procs:
        p.start()
    barrier.wait(timeout=300)
    start = time.perf_counter()
    results = [counts.get(timeout=seconds + 300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    wall = max(end for _, end in results) - start
    return Layout(processes, threads, batch, sum(n for n, _ in results) / wall)


def sweep(
    load: Callable[[int], Callable],
    size: tuple[int, int],
    cores: int,
    batches: Sequence[int] = (1, 4),
    seconds: float = 4.0,
) -> list[Layout]:
    """Every (processes, threads) layout of :func:`layouts` at each batch size, best first."""
    found = [
        measure_layout(load, processes, threads, batch, size, seconds)
        for processes, threads in layouts(cores)
        for batch in batches
    ]
    return sorted(found, key=lambda r: r.images_per_s, reverse=True)


def load_torchscript(path: Path, threads: int) -> Callable:
    """A picklable ``load`` for :func:`sweep` (use ``functools.partial(load_torchscript, p)``)."""
    from handler.runtime import load_scripted_model

    return load_scripted_model(path)

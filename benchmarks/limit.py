"""The machine's in-process limit for a model: the best images/s any processes x threads x batch
layout reaches, with no server in the way.

Two kinds of work are swept, each by a picklable *maker* ``make(threads, batch) -> run`` whose
``run()`` processes one batch and returns how many images it finished:

* :func:`forward_work`: forwards alone on a random batch, what the model's arithmetic allows;
* the served pipeline on the same JPEGs the served rows get (decode → resize → forward →
  upsample/argmax → PNG; ``benchmarks.bench.pipeline_work``): what a server doing the
  same work per image could reach if serving itself cost nothing. This is *the* limit the
  served rows are held to.

Each layout starts ``processes`` fresh Python processes (spawned, so no state is shared); each
builds its work with ``threads`` intra-op threads, warms up, waits at a barrier, then runs
batches for ``seconds``. The layout's throughput is all images finished by all processes over
the wall time. :func:`sweep` returns every layout, best first. On CPU the layouts split the
cores (:func:`layouts`); on a GPU they are 1, 2 or 4 processes sharing it, as TorchServe's
workers per GPU would (:func:`gpu_layouts`).

Example:
    >>> layouts(cores=2)
    [(1, 2), (2, 1)]
"""

from __future__ import annotations

import multiprocessing as mp
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# make(threads, batch) -> run; run() -> images finished.
WorkMaker = Callable[[int, int], Callable[[], int]]


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


def gpu_layouts(cores: int) -> list[tuple[int, int]]:
    """(processes, threads) for one GPU: 1, 2 or 4 processes sharing it (never more than the
    cores), each with an equal share of the cores for decoding and encoding.

    >>> gpu_layouts(16), gpu_layouts(2)
    ([(1, 16), (2, 8), (4, 4)], [(1, 2), (2, 1)])
    """
    return [(p, max(1, cores // p)) for p in (1, 2, 4) if p == 1 or p <= cores]


def forward_work(
    load: Callable[[int], Callable],
    size: tuple[int, int],
    device: str,
    threads: int,
    batch: int,
) -> Callable[[], int]:
    """Forwards only: ``load(threads)``'s model on a random ``(batch, 3, *size)`` input on
    ``device`` (each forward waits for the GPU to finish). Use
    ``functools.partial(forward_work, load, size, device)`` as a maker."""
    import torch

    model = load(threads)
    x = torch.randn(batch, 3, *size, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def run() -> int:
        model(x)
        sync()
        return batch

    return run


def _worker(
    make: WorkMaker,
    threads: int,
    batch: int,
    seconds: float,
    barrier: mp.synchronize.Barrier,
    counts: mp.Queue,
) -> None:
    import torch

    torch.set_num_threads(threads)
    run = make(threads, batch)
    with torch.inference_mode():
        for _ in range(2):
            run()
        barrier.wait()
        done, deadline = 0, time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            done += run()
    counts.put((done, time.perf_counter()))


def measure_layout(
    make: WorkMaker, processes: int, threads: int, batch: int, seconds: float = 4.0
) -> Layout:
    """Images/s of ``processes`` processes running ``make(threads, batch)``'s work.

    ``make`` must be picklable (a module-level function or ``functools.partial``)."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(processes + 1)
    counts = ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(make, threads, batch, seconds, barrier, counts))
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
    make: WorkMaker,
    pairs: Sequence[tuple[int, int]],
    batches: Sequence[int] = (1, 4),
    seconds: float = 4.0,
) -> list[Layout]:
    """Every (processes, threads) layout of ``pairs`` (:func:`layouts` or
    :func:`gpu_layouts`) at each batch size, best first."""
    found = [
        measure_layout(make, processes, threads, batch, seconds)
        for processes, threads in pairs
        for batch in batches
    ]
    return sorted(found, key=lambda r: r.images_per_s, reverse=True)

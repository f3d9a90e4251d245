"""How many TorchServe workers, and how many torch threads each: derived from the machine.

The rule (measured on this project's 2-core CPU, docs/performance.md): on CPU, one worker per
core with one intra-op thread each keeps every core busy with the least contention (2 workers x
1 thread served 30.4 img/s of the demo model against 23.3 for 1 worker x 2 threads); the
number of workers is capped by the memory each may need at its peak. On GPU, one worker per
GPU, whose torch threads share the CPU cores for decode and post-processing.

``workers x threads == cores`` (rounded down): never more threads than cores, which is what
oversubscribed pods lose most of their throughput to.

The cores are the container's CPU limit where one is set (cgroup v2 ``cpu.max``, or v1
``cpu.cfs_quota_us``), else the CPUs this process may run on. The JVM counts cores the same
way, so TorchServe's own default worker count (cores, or GPUs) agrees with :func:`plan`.

Example:
    >>> plan(cpus=2, gpus=0)
    WorkerPlan(workers=2, threads=1)
    >>> plan(cpus=16, gpus=2)
    WorkerPlan(workers=2, threads=8)
    >>> plan(cpus=8, gpus=0, memory_bytes=8 << 30, worker_peak_bytes=3 << 30)
    WorkerPlan(workers=2, threads=4)
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
# Env vars a deployment may set (k8s/base/deployment.yaml: the container's limits.cpu).
CPU_LIMIT_ENV = "SEGSERVE_CPU_LIMIT"
THREADS_ENV = "SEGSERVE_TORCH_THREADS"
# TorchServe's own override of its default worker count (enable_envvars_config=true).
WORKERS_ENV = "TS_DEFAULT_WORKERS_PER_MODEL"


@dataclass(frozen=True)
class WorkerPlan:
    """Workers per model and torch intra-op threads per worker."""

    workers: int
    threads: int


def _cgroup_cpus(root: Path) -> float | None:
    """The CPU quota in cores, or None when unlimited or not readable."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]  # cgroup v2: "max 100000"
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())  # cgroup v1
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def available_cpus(root: Path = CGROUP_ROOT) -> int:
    """Whole cores this process may use: ``$SEGSERVE_CPU_LIMIT``, else the cgroup quota
    (rounded up, as the JVM does), else the CPU affinity, never below 1."""
    from_env = os.environ.get(CPU_LIMIT_ENV, "").strip()
    if from_env:
        try:
            return max(1, math.ceil(float(from_env)))
        except ValueError:
            pass
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    cores = affinity or os.cpu_count() or 1
    quota = _cgroup_cpus(root)
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(1, cores)


def plan(
    cpus: int,
    gpus: int = 0,
    memory_bytes: int | None = None,
    worker_peak_bytes: int | None = None,
    workers: int | None = None,
) -> WorkerPlan:
    """Workers and threads per worker for ``cpus`` cores and ``gpus`` GPUs.

    ``workers`` (an explicit choice: ``make archive WORKERS=``, ``default_workers_per_model``)
    wins; else one per GPU, or one per core capped by ``memory_bytes // worker_peak_bytes``.
    """
    cpus = max(1, int(cpus))
    if workers is None:
        if gpus > 0:
            workers = gpus
        else:
            workers = cpus
            if memory_bytes and worker_peak_bytes:
                workers = min(workers, max(1, memory_bytes // worker_peak_bytes))
    workers = max(1, int(workers))
    return WorkerPlan(workers=workers, threads=max(1, cpus // workers))


def worker_threads(gpus: int, workers: int | None = None, threads: int | None = None) -> int:
    """The intra-op threads one worker should use: ``threads`` or ``$SEGSERVE_TORCH_THREADS``
    if given, else :func:`plan` for this container's cores and the worker count TorchServe
    runs (``workers``, else ``$TS_DEFAULT_WORKERS_PER_MODEL``, else TorchServe's default).

    >>> worker_threads(gpus=0, threads=3)
    3
    """
    explicit = threads or os.environ.get(THREADS_ENV, "").strip()
    if explicit:
        return max(1, int(explicit))
    if workers is None and os.environ.get(WORKERS_ENV, "").strip().isdigit():
        workers = int(os.environ[WORKERS_ENV])
    return plan(available_cpus(), gpus=gpus, workers=workers).threads

"""Workers and torch threads derived from the machine (handler.sizing), and what TorchServe does
with an archive that pins neither."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from handler.sizing import WorkerPlan, available_cpus, plan


def cgroup(tmp_path: Path, v2: str | None = None, v1: tuple[int, int] | None = None) -> Path:
    """A cgroup folder as the kernel lays it out (v2 ``cpu.max`` or v1 ``cpu/cfs_*``)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    if v2 is not None:
        (tmp_path / "cpu.max").write_text(v2 + "\n")
    if v1 is not None:
        (tmp_path / "cpu").mkdir()
        (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text(f"{v1[0]}\n")
        (tmp_path / "cpu" / "cpu.cfs_period_us").write_text(f"{v1[1]}\n")
    return tmp_path


def test_the_container_cpu_limit_bounds_the_cores(tmp_path, monkeypatch):
    monkeypatch.delenv("SEGSERVE_CPU_LIMIT", raising=False)
    cores = available_cpus(tmp_path)  # no cgroup files: the affinity
    assert cores >= 1
    assert available_cpus(cgroup(tmp_path / "a", v2="max 100000")) == cores
    assert available_cpus(cgroup(tmp_path / "b", v2="50000 100000")) == 1  # 0.5 CPU rounds up
    assert available_cpus(cgroup(tmp_path / "c", v1=(-1, 100000))) == cores
    assert available_cpus(cgroup(tmp_path / "d", v1=(100000, 100000))) == 1
    monkeypatch.setenv("SEGSERVE_CPU_LIMIT", "3")  # k8s: limits.cpu through the downward API
    assert available_cpus(cgroup(tmp_path / "e", v2="50000 100000")) == 3


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"cpus": 2}, WorkerPlan(2, 1)),
        ({"cpus": 4, "gpus": 1}, WorkerPlan(1, 4)),
        ({"cpus": 16, "gpus": 4}, WorkerPlan(4, 4)),
        ({"cpus": 4, "memory_bytes": 7 << 30, "worker_peak_bytes": 3 << 30}, WorkerPlan(2, 2)),
        ({"cpus": 4, "memory_bytes": 1 << 30, "worker_peak_bytes": 3 << 30}, WorkerPlan(1, 4)),
        ({"cpus": 8, "workers": 3}, WorkerPlan(3, 2)),
        ({"cpus": 1, "workers": 2}, WorkerPlan(2, 1)),
    ],
)
def test_workers_times_threads_never_exceed_the_cores(kwargs, expected):
    got = plan(**kwargs)
    assert got == expected
    assert got.workers * got.threads <= max(kwargs["cpus"], got.workers)


@pytest.mark.serving
@pytest.mark.slow
def test_an_unpinned_archive_runs_one_single_threaded_worker_per_core(
    tiny_export, tmp_path, monkeypatch
):
    """The repo's config.properties + an archive without minWorkers: TorchServe starts one
    worker per core (the JVM's count) and each runs cores // workers torch threads."""
    from serving.archive import ArchiveOptions, build_archive
    from serving.server import Ports, describe_workers, start, stop

    monkeypatch.delenv("SEGSERVE_CPU_LIMIT", raising=False)
    store = tmp_path / "store"
    build_archive(tiny_export, store, ArchiveOptions())
    repo = Path(__file__).resolve().parents[2]
    info = start(repo / "config.properties", store, tmp_path / "server", Ports.free(), 240)
    try:
        expected = plan(available_cpus())
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            workers = describe_workers(info.management_url, info.management_key, "segmenter")
            if len(workers) >= expected.workers and all(w["status"] == "READY" for w in workers):
                break
            time.sleep(0.5)
        assert len(workers) == expected.workers, workers
        log = (Path(info.log_dir) / "model_log.log").read_text()
        threads = [int(n) for n in re.findall(r"torch threads (\d+)", log)]
        assert threads == [expected.threads] * expected.workers, threads
    finally:
        stop(tmp_path / "server")


@pytest.mark.serving
@pytest.mark.slow
def test_workers_pinned_in_config_properties_get_the_cores_between_them(
    tiny_export, tmp_path, monkeypatch
):
    """``default_workers_per_model=1`` in config.properties (an archive without minWorkers):
    the one worker runs every core's torch thread. The handler cannot see config.properties;
    ``serving.server`` passes the count on as TorchServe's own variable. (Before: 1 thread of
    2 cores, half the machine idle.)"""
    from loadtest.fault_server import ONE_WORKER, write_server_config
    from serving.archive import ArchiveOptions, build_archive
    from serving.server import Ports, describe_workers, start, stop

    monkeypatch.delenv("SEGSERVE_CPU_LIMIT", raising=False)
    monkeypatch.delenv("TS_DEFAULT_WORKERS_PER_MODEL", raising=False)
    store = tmp_path / "store"
    build_archive(tiny_export, store, ArchiveOptions())
    config = write_server_config(tmp_path / "config.properties", ONE_WORKER)
    info = start(config, store, tmp_path / "server", Ports.free(), 240)
    try:
        deadline = time.monotonic() + 120
        log_file = Path(info.log_dir) / "model_log.log"
        while time.monotonic() < deadline:
            workers = describe_workers(info.management_url, info.management_key, "segmenter")
            if workers and all(w["status"] == "READY" for w in workers):
                break
            time.sleep(0.5)
        assert len(workers) == 1, workers
        threads = [int(n) for n in re.findall(r"torch threads (\d+)", log_file.read_text())]
        assert threads == [plan(available_cpus(), workers=1).threads], threads
    finally:
        stop(tmp_path / "server")

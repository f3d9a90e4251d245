"""The pod's preStop script drain.py (fetch_model.py, the init container: test_fetch_model.py)."""

from __future__ import annotations

import importlib.util

from .conftest import REPO

SCRIPTS = REPO / "k8s/base/scripts"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"segserve_k8s_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


drain = _load("drain")


def test_pending_requests_sums_versions():
    assert (
        drain.pending_requests(
            [{"jobQueueStatus": {"pendingRequests": 2}}, {"jobQueueStatus": {"pendingRequests": 5}}]
        )
        == 7
    )
    assert drain.pending_requests([{"modelName": "m"}]) == 0


def test_wait_until_drained_needs_consecutive_quiet_polls():
    values = iter([0, 3, 0, 0])
    slept = []
    assert drain.wait_until_drained(values.__next__, 100, quiet_polls=2, sleep=slept.append)
    assert len(slept) == 3  # 0 (quiet 1), 3 (reset), 0 (quiet 1), 0 (quiet 2: done)


def test_wait_until_drained_times_out():
    now = [0.0]

    def sleep(s: float) -> None:
        now[0] += s

    assert not drain.wait_until_drained(lambda: 1, 5, clock=lambda: now[0], sleep=sleep)
    assert now[0] >= 5


def test_wait_until_drained_treats_a_gone_server_as_drained():
    def gone() -> int:
        raise ConnectionRefusedError

    assert drain.wait_until_drained(gone, 5, sleep=lambda s: None)

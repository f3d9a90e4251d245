"""Worker faults, overload and timeouts on real TorchServe processes (loadtest.chaos scenarios).

* a SIGKILLed worker: failures bounded by the requests in flight on it, TorchServe restarts it,
  throughput recovers (seconds measured and printed);
* the same through the segserve clients (REST and gRPC): their retries leave 0 failures, while
  the killed batch's raw 507 / RESOURCE_EXHAUSTED "Worker died." answers were really seen;
* a model that raises on forward: a 500 with the model's message, at once, not a hang, not a 503;
* overload beyond ``job_queue_size``: immediate 503s, accepted requests complete, retries win;
* a request slower than ``responseTimeout``: a 5xx in bounded time, a restarted worker.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import requests

from client.retry import RetryPolicy
from handler.artifact import METADATA_FILE, load_metadata
from handler.runtime import quiet_torchscript
from loadtest import chaos
from loadtest.fault_server import build_fault_archive
from loadtest.stats import client_figures
from loadtest.traffic import ClientSender, TrafficLoop
from loadtest.workers import wait_workers_ready, worker_pids
from serving.archive import ArchiveOptions, build_archive
from serving.server import stop
from training.export import write_export

pytestmark = [pytest.mark.serving, pytest.mark.slow]
QUEUE_SIZE = 2
RESPONSE_TIMEOUT_S = 3


def write_broken_export(tiny_export, out_dir):
    """A TorchScript model that raises on forward, with the tiny export's valid metadata."""
    import torch

    class Broken(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[0] > 0:
                raise RuntimeError("simulated model bug: a layer lost its weights")
            return x

    with quiet_torchscript():
        module = torch.jit.script(Broken())
    write_export(module, load_metadata(tiny_export / METADATA_FILE), out_dir)
    return out_dir


@pytest.fixture(scope="module")
def fault_server(tiny_export, tmp_path_factory, special_server):
    """Fault-handler archive (batch 1, responseTimeout 3 s) + a broken model; queue of 2."""
    store = tmp_path_factory.mktemp("fault_store")
    build_fault_archive(
        tiny_export,
        store,
        batch_size=1,
        max_batch_delay_ms=1,
        response_timeout_s=RESPONSE_TIMEOUT_S,
    )
    broken = write_broken_export(tiny_export, tmp_path_factory.mktemp("broken_export"))
    build_archive(broken, store, ArchiveOptions(model_name="broken", batch_size=1))
    info = special_server(
        store,
        {
            "job_queue_size": str(QUEUE_SIZE),
            "load_models": "segmenter=segmenter.mar,broken=broken.mar",
        },
    )
    yield info
    stop(info.workdir)


def test_worker_kill_fails_at_most_the_in_flight_requests(
    tiny_archive, torchserve_factory, scene_images
):
    info = torchserve_factory(tiny_archive)  # batch 4, one worker
    try:
        result = chaos.worker_kill(info, scene_images, batch_size=4, warmup_s=4, after_s=10)
    finally:
        stop(info.workdir)
    print("\n" + chaos.report_markdown([result]))
    figures = result.figures
    assert result.checks and all(result.checks.values()), result.checks
    assert figures["requests"] > 20 and figures["concurrency"] == 8
    # 8 requests outstanding, the worker holds at most one batch of 4: the rest must survive.
    assert figures["failed"] <= figures["failure_bound"] == 4
    # Whatever failed says so: TorchServe's "Worker died." (507), not a hang or a closed socket.
    assert all("Worker died" in m for m in figures["failure_messages"]), figures
    # The client loops that ran beside it: whatever the kill cost them, retries absorbed it.
    assert figures["failures_after_client_retries"] == 0, figures
    assert figures["raw_failures"] >= figures["failed"]


def _replaced(info, killed: list[int], timeout_s: float = 60) -> list[int]:
    """The new worker pids once none of ``killed`` is listed READY any more."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pids = wait_workers_ready(info)
        if not set(pids) & set(killed):
            return pids
        time.sleep(0.25)
    raise AssertionError(f"workers {killed} not replaced after {timeout_s} s")


def test_a_killed_worker_costs_the_client_nothing(tiny_archive, torchserve_factory, scene_images):
    """SIGKILL the worker under REST + gRPC client loops: every prediction still succeeds.

    Kills again (at most 3 times) until both protocols had a request in a killed batch, so the
    test proves the retries absorbed real failures rather than that none happened.
    """
    info = torchserve_factory(tiny_archive)  # batch 4, one worker
    policy = RetryPolicy(attempts=4, base_delay=0.2, max_delay=2.0)
    senders = [ClientSender(info, protocol, policy) for protocol in ("rest", "grpc")]
    loops = [TrafficLoop(info, scene_images, 3, request=s).start() for s in senders]
    kills, started = 0, time.monotonic()
    try:
        pids = wait_workers_ready(info)
        while kills < 3 and not all(s.retried for s in senders):
            time.sleep(1.5)  # traffic flowing on the (new) worker
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            kills += 1
            pids = _replaced(info, pids)
        time.sleep(1.0)
        outcomes = {s.protocol: loop.stop() for s, loop in zip(senders, loops, strict=True)}
    finally:
        for loop in loops:
            loop.stop()
        for sender in senders:
            sender.close()
        stop(info.workdir)
    figures = {s.protocol: client_figures(s, outcomes[s.protocol]) for s in senders}
    print(f"\n{kills} kill(s) in {time.monotonic() - started:.1f} s: {json.dumps(figures)}")
    for protocol, f in figures.items():
        assert f["requests"] > 10 and f["failed"] == 0, (protocol, f)
        # Raw failures were there: the killed batch's requests, each retried once.
        assert f["retried"] > 0, (protocol, kills, f)
        assert all(e.startswith("WorkerDied") and "507" in e for e in f["retried_errors"]), f


def test_model_bug_is_a_500_with_the_message_not_a_hang(fault_server, scene_images):
    auth = {"Authorization": f"Bearer {fault_server.inference_key}"}
    pids = worker_pids(fault_server, "broken")
    for _ in range(2):
        resp = requests.post(
            f"{fault_server.inference_url}/predictions/broken",
            data=scene_images[0],
            headers=auth,
            timeout=30,  # a hang fails the test here
        )
        assert resp.status_code == 500, (resp.status_code, resp.text)
        error = resp.json()
        assert "model forward failed" in error["message"], error
        assert "simulated model bug" in error["message"], error
    assert worker_pids(fault_server, "broken") == pids  # the worker survived


def test_overload_gets_fast_503s_and_retries_succeed(fault_server, scene_images):
    result = chaos.overload(fault_server, scene_images, queue_size=QUEUE_SIZE, burst=10, hold_s=1.0)
    print("\n" + chaos.report_markdown([result]))
    assert result.checks and all(result.checks.values()), result.checks
    figures = result.figures
    # One request in the worker + QUEUE_SIZE waiting (+1 racing a freed slot) are accepted.
    assert QUEUE_SIZE <= figures["ok"] <= QUEUE_SIZE + 2, figures
    assert figures["refused_503"] == figures["burst"] - figures["ok"]


def test_response_timeout_fails_fast_and_the_worker_comes_back(fault_server, scene_images):
    result = chaos.response_timeout(
        fault_server, scene_images, timeout_s=RESPONSE_TIMEOUT_S, sleep_s=20.0
    )
    print("\n" + chaos.report_markdown([result]))
    assert result.checks and all(result.checks.values()), result.checks
    # TorchServe 0.12 kills the worker that passed responseTimeout: 500 "Worker died.".
    assert result.figures["slow_status"] == 500
    assert json.loads(result.figures["slow_message"] or "{}").get("message") == "Worker died."

"""A full queue of maximum-size requests fits the pod: the sums behind config.properties' sizes.

The frontend (JVM) holds each queued request body on its heap: ``job_queue_size`` bodies of up
to ``max_request_size``, plus the batch in flight and its answers, must fit in ``-Xmx``. The pod
holds the JVM (heap, direct buffers, the JVM itself) and the workers at their peak for a batch
of maximum-size images. The worker figures are the bounds that
``tests/resilience/test_stages_and_cost.py`` asserts on a real worker (measured: +965 MB for one
40 MP request, +1353 MB for four at once, on an idle worker of ~700 MB).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from handler.sizing import plan
from k8s.tools.render import find, render_overlay

REPO = Path(__file__).resolve().parents[2]

MiB = 1 << 20
WORKER_IDLE_MB = 1000  # the tiny test model idles at ~700 MB; the demo resnet18 Unet near it
WORKER_SINGLE_PEAK_MB = 1400  # test_stages_and_cost.PEAK_BUDGET_MB
WORKER_BATCH_MATE_MB = 250  # test_stages_and_cost.BATCH_MATE_MB
JVM_OVERHEAD_MB = 512  # metaspace, thread stacks, code cache: outside -Xmx and direct memory
_SIZE = re.compile(r"^(\d+)([kmgKMG]?)$")
_K8S = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "": 1}


def jvm_bytes(text: str) -> int:
    """``2g`` / ``768m`` / ``1024k`` → bytes."""
    number, unit = _SIZE.match(text).groups()
    return int(number) << {"": 0, "k": 10, "m": 20, "g": 30}[unit.lower()]


def k8s_bytes(text: str) -> int:
    number, unit = re.match(r"^(\d+)(Ki|Mi|Gi|)$", str(text)).groups()
    return int(number) * _K8S[unit]


def vm_option(vmargs: str, prefix: str) -> int:
    for arg in vmargs.split():
        if arg.startswith(prefix):
            return jvm_bytes(arg[len(prefix) :])
    raise AssertionError(f"config.properties vmargs has no {prefix}...: {vmargs!r}")


def test_jvm_and_helpers_parse():
    assert jvm_bytes("2g") == 2 << 30 and jvm_bytes("768m") == 768 * MiB
    assert k8s_bytes("8Gi") == 8 << 30 and k8s_bytes("512Mi") == 512 * MiB


@pytest.fixture(scope="module")
def sizes():
    from serving.archive import ArchiveOptions
    from serving.properties import read_properties

    props = read_properties(REPO / "config.properties")
    vmargs = props["vmargs"]
    options = ArchiveOptions()
    return {
        "queue": int(props["job_queue_size"]),
        "request": int(props["max_request_size"]),
        "response": int(props["max_response_size"]),
        "heap": vm_option(vmargs, "-Xmx"),
        "direct": vm_option(vmargs, "-XX:MaxDirectMemorySize="),
        "batch": options.batch_size,
        "exit_on_oom": "-XX:+ExitOnOutOfMemoryError" in vmargs.split(),
    }


def test_a_full_queue_fits_the_frontend_heap(sizes):
    held = sizes["queue"] * sizes["request"] + sizes["batch"] * (
        sizes["request"] + sizes["response"]
    )
    assert held <= 0.9 * sizes["heap"], (
        f"queued + in-flight bodies can take {held / MiB:.0f} MiB, the heap is "
        f"{sizes['heap'] / MiB:.0f} MiB: lower job_queue_size or max_request_size, or raise -Xmx"
    )
    assert sizes["exit_on_oom"], "vmargs should end the JVM on OutOfMemoryError"


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_the_pod_memory_limit_holds_frontend_and_workers(sizes, overlay, kubectl):
    objects = render_overlay(REPO / "k8s" / "overlays" / overlay, kubectl)
    deployment = find(objects, "Deployment", "segserve")
    (container,) = [
        c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "torchserve"
    ]
    limits = container["resources"]["limits"]
    limit = k8s_bytes(limits["memory"])
    worker_peak = WORKER_SINGLE_PEAK_MB + (sizes["batch"] - 1) * WORKER_BATCH_MATE_MB
    frontend = sizes["heap"] + sizes["direct"] + JVM_OVERHEAD_MB * MiB
    # The workers TorchServe will run: the pod's pin, else its default (GPUs, else cores).
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    gpus = int(limits.get("nvidia.com/gpu", 0))
    cpus = int(limits["cpu"])
    workers = int(env.get("TS_DEFAULT_WORKERS_PER_MODEL") or gpus or cpus)
    per_worker = (WORKER_IDLE_MB + worker_peak) * MiB
    rule = plan(cpus, gpus, memory_bytes=limit - frontend, worker_peak_bytes=per_worker)
    assert workers == rule.workers, (
        f"{overlay}: the pod runs {workers} worker(s), handler.sizing.plan says {rule.workers} "
        f"for {cpus} CPU(s), {gpus} GPU(s) and {limit / MiB:.0f} MiB"
    )
    need = frontend + workers * per_worker
    assert need <= limit, (
        f"{overlay}: frontend + {workers} worker(s) at a full batch of maximum-size "
        f"images need {need / MiB:.0f} MiB, the pod limit is {limit / MiB:.0f} MiB"
    )

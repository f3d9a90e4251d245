"""The image tests' builds, started in the background while CPU-bound tests run.

A fresh serving image takes minutes to build (pip downloads torch's CUDA libraries, the layer
is committed), mostly waiting on the network and the disk. ``tests/k8s/conftest.py`` moves the
image tests to the end of the session and plans their targets here; the training tests' conftest
starts the build when the first training test sets up: those tests are CPU-bound with no timing
windows, unlike the live serving and monitoring tests (a Locust run beside a build missed its
alert window here). The fixtures' own ``image.build()`` waits on the store's build lock, then
reuses that image; if the background build failed, the fixture builds again and shows why.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from k8s.tools import image

LOG = image.STORE / "background-build.log"
_planned: list[str] = []
_process: subprocess.Popen | None = None


def plan(targets: list[str]) -> None:
    """The targets :func:`start` builds."""
    _planned[:] = targets


def start() -> None:
    """Start building the planned targets (once per session; nothing planned: nothing)."""
    global _process
    if not _planned or _process is not None:
        return
    # nice: the tests running meanwhile come first
    cmd = ["nice", "-n", "10", sys.executable, str(image.REPO / "k8s/tools/image.py"), "build"]
    LOG.parent.mkdir(parents=True, exist_ok=True)
    with open(LOG, "wb") as log:
        _process = subprocess.Popen(
            cmd + [arg for target in _planned for arg in ("--target", target)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: stopped with buildah below it
        )


def stop() -> None:
    """A session that ends before the image tests (-x, Ctrl-C) leaves no build behind."""
    if _process is not None and _process.poll() is None:
        os.killpg(_process.pid, signal.SIGTERM)
        try:
            _process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(_process.pid, signal.SIGKILL)

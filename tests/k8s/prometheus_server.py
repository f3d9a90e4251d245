"""A real Prometheus server on loopback, for the monitoring tests.

:func:`running_prometheus` writes ``prometheus.yml`` and the rule files into ``workdir``,
starts ``.tools/bin/prometheus`` (``make k8s-tools``: Debian's package, extracted) on a free
port with its TSDB there, waits until it is ready, and stops it. :class:`Prometheus` queries
its HTTP API: instant and range queries (an error from Prometheus is an exception, never an
empty result) and the state of alerts.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
import yaml

from k8s.tools.toolchain import require


class PrometheusError(RuntimeError):
    """Prometheus refused a query or did not start; the message carries its words."""


@dataclass
class Prometheus:
    url: str
    process: subprocess.Popen
    log: Path

    def _get(self, path: str, **params: Any) -> Any:
        resp = requests.get(f"{self.url}{path}", params=params, timeout=30)
        body = resp.json()
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('error') or resp.text[:500]}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """The instant vector (or scalar as one sample) ``expr`` evaluates to."""
        data = self._get("/api/v1/query", query=expr, **({"time": at} if at else {}))
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def value(self, expr: str) -> float | None:
        """The single number ``expr`` gives (summed over series), None when it is empty."""
        samples = self.query(expr)
        return sum(float(s["value"][1]) for s in samples) if samples else None

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict]:
        data = self._get("/api/v1/query_range", query=expr, start=start, end=end, step=step)
        return data["result"]

    def alerts(self) -> list[dict[str, Any]]:
        """Every pending or firing alert (``labels``, ``state``, ``activeAt``)."""
        return self._get("/api/v1/alerts")["alerts"]

    def active(self, alertname: str, namespace: str | None = None) -> list[dict[str, Any]]:
        """The pending or firing instances of ``alertname`` (in ``namespace``, if given)."""
        return [
            a
            for a in self.alerts()
            if a["labels"].get("alertname") == alertname
            and (namespace is None or a["labels"].get("namespace") == namespace)
        ]

    def firing(self, alertname: str, namespace: str | None = None) -> list[dict[str, Any]]:
        return [a for a in self.active(alertname, namespace) if a["state"] == "firing"]

    def wait_until(
        self, what: str, check: Callable[[], Any], timeout_s: float, every_s: float = 2.0
    ) -> tuple[Any, float]:
        """Poll ``check`` until it returns something truthy; (that, seconds waited)."""
        start = time.monotonic()
        while True:
            got = check()
            if got:
                return got, time.monotonic() - start
            if time.monotonic() - start > timeout_s:
                raise AssertionError(f"{what}: not within {timeout_s:.0f} s\n{self.tail()}")
            if self.process.poll() is not None:
                raise PrometheusError(f"Prometheus exited ({self.process.returncode})")
            time.sleep(every_s)

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.log.read_text().splitlines()[-lines:])


@contextlib.contextmanager
def running_prometheus(
    config: dict[str, Any],
    rule_files: dict[str, dict[str, Any]],
    workdir: Path,
    port: int,
    timeout_s: float = 60.0,
) -> Iterator[Prometheus]:
    """Prometheus with ``config`` (its ``rule_files`` are names in ``rule_files``)."""
    workdir.mkdir(parents=True, exist_ok=True)
    for name, rules in rule_files.items():
        (workdir / name).write_text(yaml.safe_dump(rules, sort_keys=False))
    conf = workdir / "prometheus.yml"
    conf.write_text(yaml.safe_dump(config, sort_keys=False))
    log = workdir / "prometheus.log"
    cmd = [
        str(require("prometheus")),
        f"--config.file={conf}",
        f"--storage.tsdb.path={workdir / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--storage.tsdb.retention.time=1d",
    ]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=workdir, stdout=out, stderr=subprocess.STDOUT)
    server = Prometheus(f"http://127.0.0.1:{port}", proc, log)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{server.url}/-/ready", timeout=2).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise PrometheusError(f"Prometheus did not start:\n{server.tail()}")
            time.sleep(0.5)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

"""Run the shipped auth proxy (``k8s/base/auth-proxy/``) with the real nginx, for tests.

:func:`running_auth_proxy` changes nothing but the pod-specific values of the shipped
``nginx.conf``: the three listen ports, the three upstream addresses, the njs module, auth.js
and token file paths (one file, or the list auth.js reads in turn), and the ``/tmp`` paths.
Every rewrite must match exactly once and no other absolute path may be left, so a change to
the shipped file either runs here as it is or fails loudly (:class:`ProxyConfigError`).
nginx is started in the foreground as the container starts it (``-c FILE -g 'daemon off;'``),
waited for until all three listeners accept, and stopped with SIGQUIT (the official image's
stop signal: in-flight requests finish).

:func:`write_secret_volume` lays out a Secret volume as kubelet does (a timestamped folder, a
``..data`` symlink swapped atomically, one symlink per key), so a test rotates tokens the way a
cluster does.

Example (``upstream``: host:port of TorchServe's REST inference, gRPC inference and metrics)::

    write_secret_volume(tmp / "secret", {TOKENS_KEY: "token-a\\n"})
    upstream = {"rest": "127.0.0.1:8085", "grpc": "127.0.0.1:7075", "metrics": "127.0.0.1:8086"}
    with running_auth_proxy(upstream, tmp / "secret" / TOKENS_KEY, tmp / "nginx") as proxy:
        requests.get(f"{proxy.rest_url}/ping")       # open; /predictions/... needs the token
        grpc.insecure_channel(proxy.grpc_target)     # h2c, token as `authorization` metadata

nginx comes from ``make k8s-tools`` (``k8s/tools/toolchain.py`` ``fetch_nginx``).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from k8s.tools.toolchain import nginx_paths

REPO = Path(__file__).resolve().parents[2]
SHIPPED_DIR = REPO / "k8s/base/auth-proxy"
# The Secret segserve-api-tokens mounts this key as a file of that name.
TOKENS_KEY = "tokens"
# The web demo's token, projected into the same volume by k8s/components/ui (the second file).
UI_TOKEN_KEY = "ui-token"
UPSTREAM_KEYS = ("rest", "grpc", "metrics")
# (what the shipped nginx.conf says, the pod's value it holds): rewritten for a test run.
_LISTEN = {
    "rest": ("listen 8080;", "listen 127.0.0.1:{port};"),
    "grpc": ("listen 7070 http2;", "listen 127.0.0.1:{port} http2;"),
    "metrics": ("listen 8082;", "listen 127.0.0.1:{port};"),
}
_UPSTREAM = {
    "rest": "server 127.0.0.1:8085;",
    "grpc": "server 127.0.0.1:7075;",
    "metrics": "server 127.0.0.1:8086;",
}
_MODULE = "load_module /usr/lib/nginx/modules/ngx_http_js_module.so;"
_JS = "js_import auth from /etc/nginx/segserve/auth.js;"
_TOKENS = 'js_var $segserve_tokens_files "/etc/segserve/auth/tokens /etc/segserve/auth/ui-token";'
_TMP_DIRECTIVES = (
    "pid",
    "client_body_temp_path",
    "proxy_temp_path",
    "fastcgi_temp_path",
    "uwsgi_temp_path",
    "scgi_temp_path",
)


class ProxyConfigError(RuntimeError):
    """The shipped nginx.conf no longer has a line the test rewrites, or has a new path."""


class ProxyStartError(RuntimeError):
    """nginx exited or did not listen in time; the message has its error log."""


@dataclass(frozen=True)
class ProxyEndpoints:
    """A running proxy: where to reach its three listeners, its master pid and its logs
    (``access_log``: nginx's stdout, JSON lines; ``error_log``: its stderr)."""

    rest_url: str
    grpc_target: str
    metrics_url: str
    pid: int
    access_log: Path
    error_log: Path

    def worker_pids(self) -> set[int]:
        """The worker processes now; a reload or restart would replace them."""
        return _children(self.pid)


def _replace_once(text: str, old: str, new: str) -> str:
    count = text.count(old)
    if count != 1:
        raise ProxyConfigError(
            f"the shipped nginx.conf has {old!r} {count} times, tests/k8s/auth_proxy.py "
            "rewrites it exactly once: update the rewrite together with the config"
        )
    return text.replace(old, new)


def render_config(
    text: str,
    ports: dict[str, int],
    upstream: dict[str, str],
    tokens_file: Path | Sequence[Path],
    workdir: Path,
    module: Path,
    auth_js: Path,
) -> str:
    """The shipped config ``text`` with ports, upstreams and paths replaced (ProxyConfigError
    if a rewrite does not match exactly once or an absolute path is left over); ``tokens_file``:
    the token files in the order auth.js reads them (one path: that file alone)."""
    single = isinstance(tokens_file, (str, os.PathLike))
    files = [str(f) for f in ([tokens_file] if single else tokens_file)]
    for key in UPSTREAM_KEYS:
        old, new = _LISTEN[key]
        text = _replace_once(text, old, new.format(port=ports[key]))
        text = _replace_once(text, _UPSTREAM[key], f"server {upstream[key]};")
    text = _replace_once(text, _MODULE, f"load_module {module};")
    text = _replace_once(text, _JS, f"js_import auth from {auth_js};")
    text = _replace_once(text, _TOKENS, f'js_var $segserve_tokens_files "{" ".join(files)}";')
    for directive in _TMP_DIRECTIVES:
        pattern = re.compile(rf"^(\s*{directive}) /tmp/([\w.-]+);$", re.MULTILINE)
        text, count = pattern.subn(lambda m: f"{m[1]} {workdir / m[2]};", text)
        if count != 1:
            raise ProxyConfigError(f"{directive} /tmp/...; occurs {count} times, expected once")
    code = "\n".join(line.split("#")[0] for line in text.splitlines())
    left = sorted(set(re.findall(r"(?<![\w.])/(?:tmp|etc|var|usr|run)/[^\s;'\"]*", code)))
    left = [p for p in left if not p.startswith((str(workdir), str(module), str(auth_js)))]
    left = [p for p in left if p not in (*files, "/dev/stdout")]
    if left:
        raise ProxyConfigError(f"paths the test does not rewrite: {left}")
    return text


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _children(pid: int) -> set[int]:
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGQUIT)  # graceful: what the pod's stop signal does
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _start(
    nginx: Path, conf: Path, workdir: Path, ports: dict[str, int], timeout_s: float
) -> subprocess.Popen | None:
    """nginx listening on ``ports``, or None when a port was taken meanwhile (retry)."""
    # The pod runs nginx as one non-root user; as root, nginx would drop its workers to
    # "nobody", who cannot read pytest's private temp folders.
    directives = "daemon off;" + (" user root;" if os.geteuid() == 0 else "")
    error_log = workdir / "error.log"
    with (workdir / "access.log").open("ab") as out, error_log.open("ab") as err:
        logged = err.tell()
        proc = subprocess.Popen(
            [str(nginx), "-c", str(conf), "-g", directives], stdout=out, stderr=err
        )
    deadline = time.monotonic() + timeout_s
    while not all(_accepts(p) for p in ports.values()):
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop(proc)
            log = error_log.read_bytes()[logged:].decode(errors="replace")
            if "Address already in use" in log:
                return None
            state = "not listening" if proc.returncode is None else f"exited {proc.returncode}"
            raise ProxyStartError(f"nginx {state} ({conf}):\n{log[-3000:]}")
        time.sleep(0.05)
    return proc


@contextlib.contextmanager
def running_auth_proxy(
    upstream: dict[str, str],
    tokens_file: Path | Sequence[Path],
    workdir: Path,
    config_dir: Path = SHIPPED_DIR,
    timeout_s: float = 20.0,
) -> Iterator[ProxyEndpoints]:
    """Run ``config_dir``'s nginx.conf and auth.js in front of ``upstream`` (``{"rest",
    "grpc", "metrics"}`` -> ``host:port``) on free ports, reading tokens from ``tokens_file``
    (a path, or the list of files in the pod's order: api tokens, then the UI's);
    everything nginx writes goes to ``workdir`` (``nginx.conf`` as run, the pid file, temp
    folders, ``access.log``, ``error.log``). Stopped on exit, even on failure."""
    if sorted(upstream) != sorted(UPSTREAM_KEYS):
        raise ValueError(f"upstream keys are {sorted(upstream)}, expected {list(UPSTREAM_KEYS)}")
    nginx, module = nginx_paths()
    if not (nginx.exists() and module.is_file()):
        raise ProxyStartError(f"no nginx with the njs module in {nginx.parent}: make k8s-tools")
    workdir.mkdir(parents=True, exist_ok=True)
    conf, text = workdir / "nginx.conf", (config_dir / "nginx.conf").read_text()
    for _attempt in range(3):
        ports = dict(zip(UPSTREAM_KEYS, _free_ports(len(UPSTREAM_KEYS)), strict=True))
        conf.write_text(
            render_config(
                text, ports, upstream, tokens_file, workdir, module, config_dir / "auth.js"
            )
        )
        proc = _start(nginx, conf, workdir, ports, timeout_s)
        if proc is not None:
            break
    else:
        raise ProxyStartError("nginx found its free ports taken three times in a row")
    try:
        yield ProxyEndpoints(
            rest_url=f"http://127.0.0.1:{ports['rest']}",
            grpc_target=f"127.0.0.1:{ports['grpc']}",
            metrics_url=f"http://127.0.0.1:{ports['metrics']}",
            pid=proc.pid,
            access_log=workdir / "access.log",
            error_log=workdir / "error.log",
        )
    finally:
        _stop(proc)


def write_secret_volume(mount: Path, data: dict[str, str]) -> None:
    """Write ``data`` (key -> content) into ``mount`` as kubelet updates a Secret volume: the
    files go to a new ``..<timestamp>`` folder, ``..data`` is re-pointed to it by one atomic
    rename, each key is a symlink ``key -> ..data/key``; keys no longer in ``data`` and the
    previous folder are removed. A reader sees the old or the new set, never a mix."""
    mount.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("..%Y_%m_%d_%H_%M_%S.", time.gmtime())
    new = Path(tempfile.mkdtemp(prefix=stamp, dir=mount))
    new.chmod(0o755)
    for key, content in data.items():
        (new / key).write_text(content)
    link = mount / "..data"
    old = (mount / os.readlink(link)) if link.is_symlink() else None
    tmp_link = mount / "..data_tmp"
    tmp_link.unlink(missing_ok=True)
    tmp_link.symlink_to(new.name)
    os.replace(tmp_link, link)
    for key in data:
        if not (mount / key).is_symlink():
            (mount / key).symlink_to(f"..data/{key}")
    for entry in mount.iterdir():
        if entry.is_symlink() and not entry.name.startswith("..") and entry.name not in data:
            entry.unlink()
    if old is not None and old != new:
        shutil.rmtree(old)

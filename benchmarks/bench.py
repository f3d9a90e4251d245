"""``make bench``: where the time goes between a bare TorchScript forward and a served answer.

One run, one machine, one model, one image size:

* ``floor``   the TorchScript forward alone, batch 1 and batch N (no decode, no HTTP);
* ``segserve`` through TorchServe over REST and gRPC, concurrency 1 and N, with an archive
  of batch_size 1 (batching off) and one of batch_size N (batching on);
* ``naive``   a FastAPI ``/predict`` (PIL decode, per-request forward, base64 PNG in JSON)
  serving the same TorchScript under uvicorn (:mod:`benchmarks.naive_peer`);
* ``stock-style`` the naive peer answering like TorchServe's stock image_segmenter: the mask
  as a JSON list of class ids (what a compact PNG answer saves in bytes and time).

Prints a table (p50/p95 latency, throughput, response bytes, ratios to the floor) and writes
``benchmarks/results/<date>.md`` and ``.json`` with the machine's description. Uses
``runs/default/export`` when present, else a random-weight Unet/resnet18 export built here.
The load generator shares the machine with the server: on 2 cores, throughput figures are
a lower bound and concurrency N mostly measures queueing.

Example:
    python -m benchmarks.bench --batch 4 --requests 40
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from handler.artifact import METADATA_FILE, MODEL_FILE, load_metadata

REPO = Path(__file__).resolve().parents[1]
DEFAULT_EXPORT = REPO / "runs" / "default" / "export"
RESULTS = REPO / "benchmarks" / "results"


@dataclass(frozen=True)
class Row:
    """One measured configuration."""

    name: str
    protocol: str
    batch_size: int
    concurrency: int
    requests: int
    p50_ms: float
    p95_ms: float
    throughput: float  # images per second
    response_bytes: float


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile of ``values`` (q in [0, 100])."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def measure(
    call: Callable[[], int], requests: int, concurrency: int, warmup: int = 3
) -> tuple[float, float, float, float]:
    """Run ``call`` (returns response bytes) ``requests`` times, ``concurrency`` at once.

    Returns (p50 ms, p95 ms, requests/s, mean bytes). Errors propagate: a benchmark of
    failing requests would be meaningless.
    """
    for _ in range(warmup):
        call()
    latencies: list[float] = []
    sizes: list[int] = []
    lock = threading.Lock()

    def one(_: int) -> None:
        start = time.perf_counter()
        size = call()
        elapsed = time.perf_counter() - start
        with lock:
            latencies.append(elapsed * 1000.0)
            sizes.append(size)

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(one, range(requests)))
    wall = time.perf_counter() - start
    return (
        percentile(latencies, 50),
        percentile(latencies, 95),
        requests / wall,
        statistics.fmean(sizes),
    )


def machine() -> dict[str, object]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.cuda.is_available(),
        # Other processes' load is not controlled: a busy machine makes every row slower.
        "load average (1/5/15 min)": " ".join(f"{v:.2f}" for v in os.getloadavg()),
    }


def build_random_export(out_dir: Path, size: int, num_classes: int = 6) -> Path:
    """A Unet/resnet18 (random weights) exported at ``size`` by ``training.export``."""
    import segmentation_models_pytorch as smp
    import torch

    from handler.artifact import ModelMetadata
    from handler.preprocessing import PreprocessSpec
    from training.export import export_model
    from training.synthetic import generate_scene

    torch.manual_seed(0)
    model = smp.create_model(
        "Unet", encoder_name="resnet18", encoder_weights=None, classes=num_classes
    ).eval()
    meta = ModelMetadata(
        model_name="segmenter",
        model_version="1.0",
        architecture="Unet",
        encoder="resnet18",
        class_names=("background", *(f"class_{i}" for i in range(1, num_classes))),
        palette=tuple((40 * i % 256, 90 * i % 256, 150 * i % 256) for i in range(num_classes)),
        preprocess=PreprocessSpec(input_size=(size, size)),
        recipe={"note": "benchmarks/bench.py random weights"},
    )
    scenes = [generate_scene(0, i, (size, size))[0] for i in range(2)]
    export_model(model, meta, scenes, out_dir)
    return out_dir


def floor_rows(model_pt: Path, size: int, batch: int, requests: int) -> list[Row]:
    """The bare forward, timed per call; throughput counts images (batch × calls / s)."""
    import torch

    from handler.runtime import load_scripted_model

    model = load_scripted_model(model_pt)
    rows = []
    for n in sorted({1, batch}):
        x = torch.randn(n, 3, size, size)

        def call(x: torch.Tensor = x) -> int:
            with torch.inference_mode():
                model(x)
            return 0

        calls = max(requests // n, 5)
        p50, p95, rps, _ = measure(call, calls, 1)
        rows.append(Row("floor: TorchScript forward", "in-process", n, 1, calls, p50, p95,
                        rps * n, 0))  # fmt: skip
    return rows


def served_rows(
    export: Path, image: bytes, batch: int, concurrency: int, requests: int, workdir: Path
) -> list[Row]:
    """segserve over REST and gRPC, batching off (batch_size 1) then on (batch_size N)."""
    from client.grpc_client import GrpcClient
    from client.rest import RestClient
    from client.retry import NO_RETRY
    from serving.archive import ArchiveOptions, build_archive
    from serving.server import Ports, start, stop

    rows = []
    for batch_size in sorted({1, batch}):
        store = workdir / f"store_b{batch_size}"
        options = ArchiveOptions(batch_size=batch_size, max_batch_delay_ms=5)
        build_archive(export, store, options)
        server_dir = workdir / f"server_b{batch_size}"
        info = start(REPO / "config.properties", store, server_dir, Ports.free(), timeout_s=300)
        try:
            clients = {
                "REST": RestClient(info.inference_url, token=info.inference_key, retry=NO_RETRY),
                "gRPC": GrpcClient(
                    info.grpc_inference_target, token=info.inference_key, retry=NO_RETRY
                ),
            }
            for protocol, client in clients.items():
                for c in sorted({1, concurrency}):
                    p50, p95, rps, size = measure(
                        lambda client=client: len(client.predict(image).content), requests, c
                    )
                    name = f"segserve ({'batching' if batch_size > 1 else 'no batching'})"
                    rows.append(Row(name, protocol, batch_size, c, requests, p50, p95, rps, size))
                client.close()
        finally:
            stop(server_dir)
    return rows


def naive_rows(model_pt: Path, image: bytes, concurrency: int, requests: int) -> list[Row]:
    """The FastAPI peer: base64-PNG-in-JSON answers, and stock-style per-pixel JSON lists."""
    import requests as http

    from serving.server import free_port

    port = free_port()
    cmd = [sys.executable, "-m", "benchmarks.naive_peer", "--model", str(model_pt)]
    proc = subprocess.Popen([*cmd, "--port", str(port)], cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(f"{url}/ping", proc, timeout_s=120)
        session = threading.local()

        def post(path: str) -> int:
            s = getattr(session, "s", None) or http.Session()
            session.s = s
            resp = s.post(f"{url}{path}", files={"file": ("img.png", image)}, timeout=60)
            resp.raise_for_status()
            return len(resp.content)

        rows = []
        for c in sorted({1, concurrency}):
            p50, p95, rps, size = measure(lambda: post("/predict"), requests, c)
            rows.append(Row("naive FastAPI peer", "REST", 1, c, requests, p50, p95, rps, size))
        p50, p95, rps, size = measure(lambda: post("/predict_list"), requests, 1)
        rows.append(Row("stock-style JSON list mask", "REST", 1, 1, requests, p50, p95, rps, size))
        return rows
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _wait_http(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    import requests as http

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the naive peer exited with {proc.returncode} before answering")
        try:
            if http.get(url, timeout=2).ok:
                return
        except http.ConnectionError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the naive peer did not answer {url} within {timeout_s:.0f}s")


def render(rows: list[Row], info: dict[str, object]) -> str:
    """Markdown table; ratios are to the batch-1 floor (latency ×, throughput %)."""
    floor = next(r for r in rows if r.name.startswith("floor") and r.batch_size == 1)
    lines = [
        f"# segserve benchmark {info['date']}",
        "",
        *(f"- {k}: {v}" for k, v in info.items() if k != "date"),
        "",
        "| configuration | protocol | batch | conc. | p50 ms | p95 ms | img/s | bytes "
        "| p50 / floor | img/s / floor |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.name} | {r.protocol} | {r.batch_size} | {r.concurrency} | {r.p50_ms:.1f} | "
            f"{r.p95_ms:.1f} | {r.throughput:.1f} | {r.response_bytes:.0f} | "
            f"{r.p50_ms / floor.p50_ms:.2f}x | {r.throughput / floor.throughput:.0%} |"
        )
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--export-dir", type=Path, default=DEFAULT_EXPORT)
    parser.add_argument("--image-size", type=int, default=128, help="square test image, px")
    parser.add_argument("--batch", type=int, default=4, help="N: batch size and concurrency")
    parser.add_argument("--requests", type=int, default=40, help="requests per configuration")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--skip", nargs="*", default=[], choices=("served", "naive"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from loadtest.images import load_images

    with tempfile.TemporaryDirectory(prefix="segserve-bench-") as tmp_name:
        tmp = Path(tmp_name)
        export = args.export_dir
        source = str(export)
        if not (export / MODEL_FILE).is_file():
            print(f"{export} has no model.pt: building a random-weight Unet/resnet18 export")
            export = build_random_export(tmp / "export", args.image_size)
            source = "random weights, built by benchmarks/bench.py"
        meta = load_metadata(export / METADATA_FILE)
        size = meta.preprocess.input_size[0]
        image = load_images(None, n=1, size=(args.image_size, args.image_size))[0]
        rows = floor_rows(export / MODEL_FILE, size, args.batch, args.requests)
        if "served" not in args.skip:
            rows += served_rows(export, image, args.batch, args.batch, args.requests, tmp)
        if "naive" not in args.skip:
            rows += naive_rows(export / MODEL_FILE, image, args.batch, args.requests)
    now = dt.datetime.now(dt.timezone.utc)
    info = {
        "date": now.strftime("%Y-%m-%d %H:%M UTC"),
        **machine(),
        "model": f"{meta.architecture}/{meta.encoder} ({source}), input {size}px",
        "image": f"{args.image_size}x{args.image_size} PNG ({len(image)} bytes)",
        "requests per row": args.requests,
    }
    table = render(rows, info)
    print(table)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / now.strftime("%Y-%m-%d")
    Path(f"{stem}.md").write_text(table)
    payload = {"machine": info, "rows": [asdict(r) for r in rows]}
    Path(f"{stem}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"written {stem}.md and {stem}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Run the Locust load test headless, then write the SLO report; exit 1 when the SLO is missed.

Example:
    python -m loadtest.run --host http://127.0.0.1:8080 --grpc-host 127.0.0.1:7070 \
        --users 4 --spawn-rate 2 --duration 30s --slo-p95-ms 300 --slo-error-rate 0.01

Distributed load (one Locust process cannot saturate a GPU pod):
    --processes N          N forked worker processes under a local master (Locust >= 2.19)
    --expect-workers N     this process is only the master: it waits on --master-bind-port
                           for N workers started elsewhere (k8s/loadtest/, or
                           `locust --worker --master-host HOST -f loadtest/locustfile.py`)
The report is the master's merged stats (every worker's counts and histograms) and lists the
workers with what each sent.

Writes into --out (default ``loadtest/results/<UTC timestamp>``): ``locust_stats.csv``,
``locust_stats_history.csv``, ``locust_failures.csv``, ``locust.html``, ``locust_merged.json``,
``report.md``, ``report.json`` and ``latency_throughput.png``.
Exit status: 0 SLO met, 1 SLO missed, 2 the run itself failed (bad options, Locust crashed,
or the merged stats miss part of the run: a worker lost or its last report missing).
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from loadtest.slo import ReportError, Slo, write_report
from serving.properties import DEFAULT_MODEL_NAME

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
RESULTS = Path("loadtest/results")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.run",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default="http://127.0.0.1:8080", help="REST inference URL")
    parser.add_argument("--grpc-host", default="127.0.0.1:7070", help="gRPC inference host:port")
    parser.add_argument("--model-name", default=DEFAULT_MODEL_NAME)
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--spawn-rate", type=float, default=2.0, help="users started per second")
    parser.add_argument("--duration", default="30s", help="Locust --run-time: 30s, 2m, 1h")
    parser.add_argument("--rest-weight", type=int, default=1)
    parser.add_argument("--grpc-weight", type=int, default=1)
    parser.add_argument("--output", default="mask", help="answer format requested")
    parser.add_argument("--images", default="", help="folder of images (default: synthetic)")
    parser.add_argument("--key-file", default="", help="TorchServe key_file.json")
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="Locust worker processes under a local master (-1: one per core; 1: no master)",
    )
    parser.add_argument(
        "--expect-workers",
        type=int,
        default=0,
        metavar="N",
        help="be only the master and wait for N workers started elsewhere (0: not a master)",
    )
    parser.add_argument("--master-bind-port", type=int, default=5557, help="with --expect-workers")
    parser.add_argument(
        "--expect-workers-max-wait",
        type=int,
        default=300,
        metavar="S",
        help="with --expect-workers: give up after S seconds without all workers (default 300)",
    )
    parser.add_argument("--slo-p95-ms", type=float, default=300.0, help="default: 300")
    parser.add_argument("--slo-error-rate", type=float, default=0.01, help="default: 0.01")
    parser.add_argument("--out", type=Path, default=None, help="results folder")
    parser.add_argument(
        "--from-csv",
        type=Path,
        default=None,
        metavar="PREFIX",
        help="do not run Locust: judge an earlier run's PREFIX_merged.json (else "
        "PREFIX_stats.csv) against this SLO",
    )
    return parser


def locust_command(args: argparse.Namespace, prefix: Path) -> list[str]:
    """The headless Locust command line for ``args``, writing CSVs under ``prefix``."""
    cmd = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
        "--host", args.host, "--grpc-host", args.grpc_host, "--model-name", args.model_name,
        "--users", str(args.users), "--spawn-rate", str(args.spawn_rate),
        "--run-time", args.duration, "--rest-weight", str(args.rest_weight),
        "--grpc-weight", str(args.grpc_weight), "--output", args.output,
        "--csv", str(prefix), "--csv-full-history", "--html", f"{prefix}.html",
        "--only-summary", "--loglevel", "WARNING", "--stop-timeout", "10",
    ]  # fmt: skip
    if args.images:
        cmd += ["--images", args.images]
    if args.key_file:
        cmd += ["--key-file", args.key_file]
    if args.processes != 1:
        cmd += ["--processes", str(args.processes)]
    if args.expect_workers:
        cmd += [
            "--master", "--expect-workers", str(args.expect_workers),
            "--master-bind-port", str(args.master_bind_port),
            "--expect-workers-max-wait", str(args.expect_workers_max_wait),
        ]  # fmt: skip
    return cmd


def load_generators(args: argparse.Namespace) -> str:
    """How the load is generated, for the report.

    >>> load_generators(argparse.Namespace(processes=2, expect_workers=0))
    'local master + 2 worker processes (--processes 2)'
    """
    if args.expect_workers:
        return f"master + {args.expect_workers} workers started elsewhere (--expect-workers)"
    if args.processes == 1:
        return "1 process"
    n = "one per core" if args.processes == -1 else args.processes
    return f"local master + {n} worker processes (--processes {args.processes})"


def server_locust_command(
    info: Any,
    prefix: Path,
    *,
    model_name: str,
    users: int,
    spawn_rate: float,
    duration: str,
    rest_weight: int = 1,
    grpc_weight: int = 1,
    processes: int = 1,
) -> list[str]:
    """:func:`locust_command` against a TorchServe this process started (``serving.server``
    ServerInfo): its addresses and its ``key_file.json``, mask answers, synthetic images."""
    args = argparse.Namespace(
        host=info.inference_url,
        grpc_host=info.grpc_inference_target,
        model_name=model_name,
        users=users,
        spawn_rate=spawn_rate,
        duration=duration,
        rest_weight=rest_weight,
        grpc_weight=grpc_weight,
        output="mask",
        images="",
        key_file=str(Path(info.workdir) / "key_file.json"),
        processes=processes,
        expect_workers=0,
    )
    return locust_command(args, prefix)


def run_description(args: argparse.Namespace, returncode: int) -> dict[str, object]:
    return {
        "rest host": args.host if args.rest_weight else "-",
        "grpc host": args.grpc_host if args.grpc_weight else "-",
        "load generators": load_generators(args),
        "users": args.users,
        "spawn rate": args.spawn_rate,
        "duration": args.duration,
        "weights (rest:grpc)": f"{args.rest_weight}:{args.grpc_weight}",
        "output": args.output,
        "client machine": f"{platform.node()} {platform.processor() or platform.machine()}",
        "locust exit code": returncode,
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        slo = Slo(p95_ms=args.slo_p95_ms, error_rate=args.slo_error_rate)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.users < 1:
        print(f"error: --users must be >= 1, got {args.users}", file=sys.stderr)
        return 2
    if args.processes == 0 or args.processes < -1:
        print(f"error: --processes must be >= 1 or -1, got {args.processes}", file=sys.stderr)
        return 2
    if args.expect_workers < 0 or (args.expect_workers and args.processes != 1):
        print("error: --expect-workers N (N >= 1) excludes --processes", file=sys.stderr)
        return 2
    out = args.out or RESULTS / dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out.mkdir(parents=True, exist_ok=True)
    if args.from_csv is not None:
        prefix, returncode = args.from_csv, None
    else:
        prefix = out / "locust"
        # Locust exits 1 whenever a request failed; the SLO decides here instead, so only a
        # missing stats file (Locust never ran) counts as a failed run.
        returncode = subprocess.run(locust_command(args, prefix), check=False).returncode
    meta = run_description(args, returncode) if returncode is not None else {"from": prefix}
    try:
        report = write_report(prefix, out, slo, meta)
    except ReportError as exc:
        print(f"error: no usable Locust stats (Locust exit {returncode}): {exc}", file=sys.stderr)
        return 2
    print(report.markdown.read_text())
    print(f"report: {report.markdown}")
    if report.problems:
        print(f"error: incomplete stats: {'; '.join(report.problems)}", file=sys.stderr)
        return 2
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())

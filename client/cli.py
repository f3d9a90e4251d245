"""``python -m client``: health, model listing/description and predictions over REST or gRPC.

Examples:
    python -m client ping
    python -m client models --protocol grpc
    python -m client describe --model segmenter
    python -m client predict photo.jpg --output overlay --out-dir out/
    python -m client predict images/ --protocol grpc --concurrency 8 --output mask
    python -m client predict images/ --protocol grpc --stream     # gRPC StreamPredictions

The token comes from --token, else --key-file, else $SEGSERVE_TOKEN ($SEGSERVE_MANAGEMENT_TOKEN
for models and describe), else ./key_file.json (TorchServe writes it where it was started).
Exit status: 0 success, 1 a request failed, 2 bad arguments or configuration.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from client.batch import Predictor, predict_paths
from client.errors import ClientError, ConfigurationError
from client.grpc_client import DEFAULT_INFERENCE_TARGET, DEFAULT_MANAGEMENT_TARGET, GrpcClient
from client.outputs import OUTPUT_FORMATS, Prediction, list_images
from client.rest import DEFAULT_INFERENCE_URL, DEFAULT_MANAGEMENT_URL, RestClient
from client.retry import RetryPolicy
from client.tokens import resolve_token
from serving.properties import DEFAULT_MODEL_NAME


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    conn = common.add_argument_group("connection")
    conn.add_argument("--protocol", choices=("rest", "grpc"), default="rest")
    conn.add_argument("--url", default=DEFAULT_INFERENCE_URL, help="REST inference URL")
    conn.add_argument("--management-url", default=DEFAULT_MANAGEMENT_URL)
    conn.add_argument("--grpc-target", default=DEFAULT_INFERENCE_TARGET, help="host:port")
    conn.add_argument("--grpc-management-target", default=DEFAULT_MANAGEMENT_TARGET)
    conn.add_argument(
        "--model", default=DEFAULT_MODEL_NAME, help=f"model name (default: {DEFAULT_MODEL_NAME})"
    )
    conn.add_argument("--key-file", type=Path, help="TorchServe key_file.json")
    conn.add_argument("--token", help="inference token (else key file / $SEGSERVE_TOKEN)")
    conn.add_argument("--management-token", help="else key file / $SEGSERVE_MANAGEMENT_TOKEN")
    conn.add_argument("--timeout", type=float, default=30.0, help="seconds per call")
    conn.add_argument("--retries", type=int, default=3, help="retries on 503/unreachable")

    parser = argparse.ArgumentParser(
        prog="python -m client",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("ping", parents=[common], help="health check (/ping or gRPC Ping)")
    sub.add_parser("models", parents=[common], help="list registered models (management API)")
    describe = sub.add_parser("describe", parents=[common], help="describe a model's workers")
    describe.add_argument("--version", help="model version (default: the default version)")
    predict = sub.add_parser("predict", parents=[common], help="segment an image or a folder")
    predict.add_argument("path", type=Path, help="image file or folder of images")
    predict.add_argument("--output", choices=OUTPUT_FORMATS, default="mask")
    predict.add_argument("--out-dir", type=Path, default=Path("predictions"))
    predict.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    predict.add_argument("--stream", action="store_true", help="gRPC only: use StreamPredictions")
    return parser


def make_client(args: argparse.Namespace) -> RestClient | GrpcClient:
    """The client the arguments describe, with tokens resolved (CLI > env > key file)."""
    if args.retries < 0:
        raise ConfigurationError(f"--retries must be >= 0, got {args.retries}")
    token = resolve_token("inference", args.token, args.key_file)
    management_token = resolve_token("management", args.management_token, args.key_file)
    common = dict(
        model_name=args.model,
        token=token,
        management_token=management_token,
        timeout=args.timeout,
        retry=RetryPolicy(attempts=args.retries + 1),
    )
    if args.protocol == "grpc":
        return GrpcClient(args.grpc_target, args.grpc_management_target, **common)
    return RestClient(args.url, args.management_url, **common)


class _Streamed:
    """Adapts GrpcClient.predict_via_stream to the Predictor protocol of predict_paths."""

    def __init__(self, client: GrpcClient) -> None:
        self.client = client

    def predict(self, image: bytes, output: str = "mask") -> Prediction:
        return self.client.predict_via_stream(image, output)


def _predict(client: RestClient | GrpcClient, args: argparse.Namespace) -> int:
    paths = list_images(args.path)
    predictor: Predictor = client
    if args.stream:
        if not isinstance(client, GrpcClient):
            raise ConfigurationError("--stream needs --protocol grpc (StreamPredictions)")
        predictor = _Streamed(client)
    result = predict_paths(predictor, paths, args.out_dir, args.output, args.concurrency)
    for path, saved in sorted(result.saved.items()):
        print(f"{path} -> {saved}")
    for path, error in sorted(result.failed.items()):
        print(f"FAILED {path}: {error}", file=sys.stderr)
    print(f"{len(result.saved)}/{len(paths)} saved in {args.out_dir}")
    return 1 if result.failed else 0


def run(args: argparse.Namespace) -> int:
    with make_client(args) as client:
        if args.command == "ping":
            print(client.ping())
            return 0
        if args.command == "models":
            print(json.dumps(client.list_models(), indent=2))
            return 0
        if args.command == "describe":
            print(json.dumps(client.describe_model(args.model, args.version), indent=2))
            return 0
        return _predict(client, args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except ConfigurationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

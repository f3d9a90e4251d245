"""``python -m ui``: start the page against a running TorchServe and print its URL.

Examples:
    python -m ui                                   # REST on 127.0.0.1:8080, page on :7860
    python -m ui --protocol grpc --grpc-target 127.0.0.1:7070
    python -m ui --inference-url http://segserve:8080 --token-file /etc/segserve/ui/token \\
        --host 0.0.0.0

The token comes from --token-file (a bare token, or TorchServe's key_file.json; re-read on
every request), else $SEGSERVE_TOKEN, else ./key_file.json. It stays in this process: the
browser never receives it. Exit status: 0 on Ctrl-C, 2 for bad settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from ui.config import PROTOCOLS, PageConfig, PageConfigError, load_page_config


def build_parser() -> argparse.ArgumentParser:
    defaults = PageConfig()
    parser = argparse.ArgumentParser(
        prog="python -m ui",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, help="YAML file of the settings below")
    parser.add_argument("--inference-url", help=f"REST inference URL ({defaults.inference_url})")
    parser.add_argument("--protocol", choices=PROTOCOLS, help="rest (default) or grpc")
    parser.add_argument("--grpc-target", help=f"gRPC host:port ({defaults.grpc_target})")
    parser.add_argument("--model-name", help=f"model to ask ({defaults.model_name})")
    parser.add_argument("--token-file", type=Path, help="file holding the inference token")
    parser.add_argument("--host", help=f"address the page listens on ({defaults.host})")
    parser.add_argument("--port", type=int, help=f"page port ({defaults.port})")
    parser.add_argument("--samples", type=Path, help=f"sample images ({defaults.samples})")
    parser.add_argument("--timeout-s", type=float, help="seconds per prediction")
    parser.add_argument("--max-upload-mb", type=int, help="the page's own upload limit")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    config_path = args.pop("config")
    names = {f.name for f in dataclasses.fields(PageConfig)}
    try:
        config = load_page_config(config_path, {k: v for k, v in args.items() if k in names})
    except PageConfigError as exc:
        print(f"python -m ui: {exc}", file=sys.stderr)
        return 2
    # Gradio's usage analytics would phone home; the page works offline.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from ui.app import serve  # gradio is imported only once the settings are good

    try:
        serve(config)
    except KeyboardInterrupt:
        pass
    return 0

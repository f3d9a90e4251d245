"""The page's fixtures: a TorchServe with a small request limit, sample images, the page.

* ``ui_server``   ServerInfo of a TorchServe serving the tiny archive, max_request_size
                  ``MAX_REQUEST_SIZE`` (so a "too large" file is cheap to make).
* ``token_file``  the server's inference token in a file (what the page reads).
* ``samples``     a folder of the embedded dataset's scenes at a size the model's stride does
                  not divide (the page must show them at their own size).
* ``page``        a real ``python -m ui`` process against ``ui_server`` (REST), module scope.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ui.shot import run_page

MAX_REQUEST_SIZE = 2 * 1024 * 1024
SAMPLE_SIZE = (150, 210)  # height, width
# The tests check what the page shows, not how fast: room for a fresh worker on a busy CI box.
ANSWER_TIMEOUT_S = 120.0


@pytest.fixture(scope="session")
def ui_server(tiny_archive, torchserve_factory):
    return torchserve_factory(tiny_archive, overrides={"max_request_size": str(MAX_REQUEST_SIZE)})


@pytest.fixture(scope="session")
def token_file(ui_server, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ui_token") / "token"
    path.write_text(ui_server.inference_key + "\n")
    return path


@pytest.fixture(scope="session")
def samples(tmp_path_factory) -> Path:
    from training.synthetic import write_samples

    out = tmp_path_factory.mktemp("ui_samples")
    write_samples(out, 2, seed=3, size=SAMPLE_SIZE)
    return out


def page_args(server, token_file: Path, samples: Path, protocol: str = "rest") -> list[str]:
    return ["--inference-url", server.inference_url, "--grpc-target",
            server.grpc_inference_target, "--protocol", protocol, "--token-file",
            str(token_file), "--samples", str(samples),
            "--timeout-s", str(ANSWER_TIMEOUT_S)]  # fmt: skip


@pytest.fixture(scope="module")
def page(ui_server, token_file, samples, tmp_path_factory):
    log = tmp_path_factory.mktemp("ui_page") / "page.log"
    with run_page(page_args(ui_server, token_file, samples), log) as running:
        yield running

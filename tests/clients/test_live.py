"""Clients and CLI against a real TorchServe (the shared ``torchserve`` fixture)."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from client.cli import main as cli_main
from client.errors import AuthError, RequestRejected, ServerUnavailable
from client.grpc_client import GrpcClient
from client.outputs import OUTPUT_FORMATS, decode_png
from client.rest import RestClient
from client.retry import RetryPolicy

pytestmark = [pytest.mark.serving, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
NUM_CLASSES = 4  # tests/conftest.py's tiny model
FAST = RetryPolicy(attempts=2, base_delay=0.05, jitter=0.0)


def _png(h: int, w: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    img[: h // 2] = (70, 130, 180)  # some structure, not only noise
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def rest(torchserve) -> RestClient:
    client = RestClient(
        torchserve.inference_url,
        torchserve.management_url,
        token=torchserve.inference_key,
        management_token=torchserve.management_key,
        retry=FAST,
    )
    yield client
    client.close()


@pytest.fixture(scope="module")
def grpc_client(torchserve) -> GrpcClient:
    client = GrpcClient(
        torchserve.grpc_inference_target,
        torchserve.grpc_management_target,
        token=torchserve.inference_key,
        management_token=torchserve.management_key,
        retry=FAST,
    )
    yield client
    client.close()


@pytest.fixture(scope="module")
def key_file(torchserve) -> Path:
    path = Path(torchserve.workdir) / "key_file.json"
    assert path.is_file(), f"TorchServe wrote no key file in {torchserve.workdir}"
    return path


def _conn_args(info, key_file: Path) -> list[str]:
    return [
        "--url", info.inference_url, "--management-url", info.management_url,
        "--grpc-target", info.grpc_inference_target,
        "--grpc-management-target", info.grpc_management_target,
        "--key-file", str(key_file), "--retries", "1",
    ]  # fmt: skip


def test_rest_and_grpc_give_the_same_mask(rest: RestClient, grpc_client: GrpcClient) -> None:
    for seed, (h, w) in enumerate([(64, 64), (48, 80), (37, 101)]):
        image = _png(h, w, seed)
        by_rest = rest.predict(image).mask()
        by_grpc = grpc_client.predict(image).mask()
        assert by_rest.shape == (h, w)
        assert by_rest.max() < NUM_CLASSES
        np.testing.assert_array_equal(by_rest, by_grpc)


@pytest.mark.parametrize("output", OUTPUT_FORMATS)
def test_every_output_format_agrees_across_protocols(
    rest: RestClient, grpc_client: GrpcClient, output: str
) -> None:
    image = _png(48, 64, 7)
    a = rest.predict(image, output=output)
    b = grpc_client.predict(image, output=output)
    if output == "json":
        body = a.json()
        assert (body["height"], body["width"]) == (48, 64)
        np.testing.assert_array_equal(a.mask(), b.mask())
        assert len(body["classes"]) == NUM_CLASSES
    elif output == "overlay_jpeg":
        assert a.content_type == "image/jpeg" and a.content[:2] == b"\xff\xd8"
        assert a.content == b.content
    else:
        assert a.content_type == "image/png"
        decoded = decode_png(a.content)
        assert decoded.shape[:2] == (48, 64)
        np.testing.assert_array_equal(decoded, decode_png(b.content))


def test_health_and_management_on_both_protocols(
    rest: RestClient, grpc_client: GrpcClient, torchserve
) -> None:
    for client in (rest, grpc_client):
        assert client.ping() == "Healthy"
        assert [m["modelName"] for m in client.list_models()] == [torchserve.model_name]
        described = client.describe_model()
        assert described[0]["modelName"] == torchserve.model_name
        assert described[0]["batchSize"] == 4
        assert described[0]["workers"] and described[0]["workers"][0]["status"] == "READY"


def test_bad_image_is_a_clear_4xx_on_both_protocols(
    rest: RestClient, grpc_client: GrpcClient
) -> None:
    for client in (rest, grpc_client):
        with pytest.raises(RequestRejected) as info:
            client.predict(b"this is plain text, not an image")
        assert 400 <= info.value.status < 500
        assert info.value.error_type.endswith("not_an_image") or "image" in info.value.message
        assert "image" in str(info.value)


def test_wrong_token_says_where_the_key_comes_from(torchserve) -> None:
    rest = RestClient(
        torchserve.inference_url, torchserve.management_url, token="wrong", retry=FAST
    )
    with pytest.raises(AuthError, match="key_file.json.*SEGSERVE_TOKEN"):
        rest.ping()
    grpc_client = GrpcClient(
        torchserve.grpc_inference_target,
        torchserve.grpc_management_target,
        management_token=torchserve.inference_key,  # the wrong kind of key
        retry=FAST,
    )
    with pytest.raises(AuthError, match="management token.*SEGSERVE_MANAGEMENT_TOKEN"):
        grpc_client.list_models()
    grpc_client.close()


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_down_is_a_clear_message(capsys: pytest.CaptureFixture[str]) -> None:
    port = _dead_port()
    for protocol in ("rest", "grpc"):
        argv = ["ping", "--protocol", protocol, "--url", f"http://127.0.0.1:{port}"]
        argv += ["--grpc-target", f"127.0.0.1:{port}", "--token", "x", "--retries", "1"]
        assert cli_main(argv) == 1
        err = capsys.readouterr().err
        assert f"127.0.0.1:{port}" in err and "make serve" in err and "Traceback" not in err
    with pytest.raises(ServerUnavailable):
        GrpcClient(f"127.0.0.1:{port}", retry=FAST).ping()


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_cli_commands(
    torchserve, key_file: Path, tmp_path: Path, protocol: str, capsys: pytest.CaptureFixture[str]
) -> None:
    conn = [*_conn_args(torchserve, key_file), "--protocol", protocol]
    assert cli_main(["ping", *conn]) == 0
    assert capsys.readouterr().out.strip() == "Healthy"
    assert cli_main(["models", *conn]) == 0
    assert json.loads(capsys.readouterr().out)[0]["modelName"] == "segmenter"
    assert cli_main(["describe", *conn]) == 0
    assert json.loads(capsys.readouterr().out)[0]["modelVersion"] == "1.0"

    images = tmp_path / "images"
    images.mkdir()
    for i in range(5):
        (images / f"img{i}.png").write_bytes(_png(40 + i, 56, i))
    out = tmp_path / "out"
    argv = ["predict", str(images), *conn, "--out-dir", str(out), "--concurrency", "3"]
    assert cli_main(argv) == 0
    assert "5/5 saved" in capsys.readouterr().out
    saved = sorted(out.glob("*.mask.png"))
    assert [p.name for p in saved] == [f"img{i}.mask.png" for i in range(5)]
    assert decode_png(saved[4].read_bytes()).shape == (44, 56)

    (images / "broken.png").write_bytes(b"not a png at all")
    argv = ["predict", str(images), *conn, "--out-dir", str(out), "--output", "overlay"]
    assert cli_main(argv) == 1  # one image refused, the others saved
    captured = capsys.readouterr()
    assert "FAILED" in captured.err and "broken.png" in captured.err
    assert "5/6 saved" in captured.out
    assert len(list(out.glob("*.overlay.png"))) == 5


def test_cli_token_from_environment_and_entry_point(torchserve, key_file: Path) -> None:
    keys = json.loads(key_file.read_text())
    env = {
        "SEGSERVE_TOKEN": keys["inference"]["key"],
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(REPO),
    }
    cmd = [sys.executable, "-m", "client", "ping", "--url", torchserve.inference_url]
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout.strip()) == (0, "Healthy"), done.stderr
    env["SEGSERVE_TOKEN"] = "wrong"
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "refused the inference token" in done.stderr and "Traceback" not in done.stderr


def test_bad_cli_configuration_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["ping", "--key-file", str(tmp_path / "missing.json")]) == 2
    assert "missing.json does not exist" in capsys.readouterr().err
    assert cli_main(["predict", str(tmp_path / "nothing"), "--token", "x"]) == 2
    assert "neither an image file nor a folder" in capsys.readouterr().err
    (tmp_path / "a.png").write_bytes(_png(8, 8, 0))
    assert cli_main(["predict", str(tmp_path / "a.png"), "--token", "x", "--stream"]) == 2
    assert "--stream needs --protocol grpc" in capsys.readouterr().err


def test_grpc_stream_predictions(grpc_client: GrpcClient) -> None:
    image = _png(48, 64, 3)
    chunks = list(grpc_client.stream_predict(image))
    assert len(chunks) == 1
    np.testing.assert_array_equal(chunks[0].mask(), grpc_client.predict(image).mask())
    assert grpc_client.ping() == "Healthy"  # the worker survived

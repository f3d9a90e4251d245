"""Pure client pieces: token resolution, output formats, stub generation, gRPC error mapping."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from client.errors import (
    AuthError,
    ConfigurationError,
    RequestRejected,
    ServerUnavailable,
    WorkerDied,
)
from client.grpc_client import error_from_rpc
from client.grpc_stubs import fix_imports, generate
from client.outputs import Prediction, list_images, output_path, save_prediction
from client.tokens import resolve_token


def _key_file(tmp_path: Path) -> Path:
    path = tmp_path / "key_file.json"
    body = {
        "management": {"key": "mkey", "expiration time": "2030-01-01T00:00:00Z"},
        "inference": {"key": "ikey", "expiration time": "2030-01-01T00:00:00Z"},
        "API": {"key": "akey"},
    }
    path.write_text(json.dumps(body))
    return path


def test_token_precedence(tmp_path: Path) -> None:
    kf = _key_file(tmp_path)
    assert resolve_token("inference", key_file=kf, environ={}) == "ikey"
    assert resolve_token("management", key_file=kf, environ={}) == "mkey"
    env = {"SEGSERVE_TOKEN": "env-i"}
    assert resolve_token("inference", key_file=kf, environ=env) == "ikey"  # explicit file wins
    assert resolve_token("inference", environ=env) == "env-i"
    assert resolve_token("inference", "cli", key_file=kf, environ=env) == "cli"


def test_no_token_anywhere_is_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no ./key_file.json here
    assert resolve_token("inference", environ={}) is None


def test_default_key_file_in_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _key_file(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert resolve_token("management", environ={}) == "mkey"


def test_bad_key_files_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="does not exist.*make serve"):
        resolve_token("inference", key_file=tmp_path / "nope.json", environ={})
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ConfigurationError, match="broken.json is not readable JSON"):
        resolve_token("inference", key_file=broken, environ={})
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"API": {"key": "x"}}))
    with pytest.raises(ConfigurationError, match="no 'inference.key' entry"):
        resolve_token("inference", key_file=wrong, environ={})
    with pytest.raises(ConfigurationError, match="not one of"):
        resolve_token("admin", environ={})


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_prediction_decodes_mask_and_json() -> None:
    mask = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert np.array_equal(Prediction(_png(mask), "mask").mask(), mask)
    as_json = json.dumps(
        {"mask_format": "png/base64", "mask": base64.b64encode(_png(mask)).decode()}
    )
    assert np.array_equal(Prediction(as_json.encode(), "json").mask(), mask)
    stock = json.dumps(mask.tolist()).encode()  # stock TorchServe: per-pixel rows
    assert np.array_equal(Prediction(stock, "json").mask(), mask)
    with pytest.raises(ConfigurationError, match="holds no class-id mask"):
        Prediction(_png(mask), "overlay").mask()
    with pytest.raises(ConfigurationError, match="not an image"):
        Prediction(b'{"code": 400}', "mask").mask()


def test_output_files(tmp_path: Path) -> None:
    assert output_path(tmp_path, Path("a/cat.jpg"), "overlay_jpeg").name == "cat.overlay.jpg"
    with pytest.raises(ConfigurationError, match="not one of"):
        output_path(tmp_path, Path("cat.jpg"), "heatmap")
    saved = save_prediction(tmp_path / "out", Path("cat.jpg"), Prediction(b"abc", "json"))
    assert saved == tmp_path / "out" / "cat.json" and saved.read_bytes() == b"abc"


def test_list_images(tmp_path: Path) -> None:
    for name in ("b.png", "a.JPG", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in list_images(tmp_path)] == ["a.JPG", "b.png"]
    assert list_images(tmp_path / "b.png") == [tmp_path / "b.png"]
    with pytest.raises(ConfigurationError, match="neither an image file nor a folder"):
        list_images(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigurationError, match="holds no images"):
        list_images(tmp_path / "empty")


def test_fix_imports_makes_stub_imports_relative() -> None:
    src = "import grpc\nimport inference_pb2 as inference__pb2\n"
    assert fix_imports(src) == "import grpc\nfrom . import inference_pb2 as inference__pb2\n"


def test_generate_stubs_into_a_fresh_package(tmp_path: Path) -> None:
    out = generate(tmp_path / "stubs", force=True)
    names = sorted(p.name for p in out.glob("*.py"))
    assert names == [
        "__init__.py",
        "inference_pb2.py",
        "inference_pb2_grpc.py",
        "management_pb2.py",
        "management_pb2_grpc.py",
    ]
    grpc_src = (out / "inference_pb2_grpc.py").read_text()
    assert "from . import inference_pb2" in grpc_src and "StreamPredictions2" in grpc_src
    stamp = (out / ".source").read_text()
    assert generate(out) == out and (out / ".source").read_text() == stamp  # idempotent


class _RpcError(grpc.RpcError):
    """A real grpc.RpcError subclass carrying a code, as grpc raises them."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def test_grpc_error_mapping() -> None:
    down = _RpcError(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses")
    assert isinstance(error_from_rpc(down, "h:1", "inference"), ServerUnavailable)
    denied = _RpcError(grpc.StatusCode.PERMISSION_DENIED, "Token Authorization failed")
    assert isinstance(error_from_rpc(denied, "h:1", "management"), AuthError)
    body = json.dumps({"code": 400, "type": "InvalidImage", "message": "cannot decode image"})
    bad = error_from_rpc(_RpcError(grpc.StatusCode.INVALID_ARGUMENT, body), "h:1", "inference")
    assert isinstance(bad, RequestRejected) and bad.message == "cannot decode image"
    assert not bad.retryable
    busy = error_from_rpc(_RpcError(grpc.StatusCode.UNAVAILABLE, "no worker"), "h:1", "inference")
    assert busy.retryable and not isinstance(busy, ServerUnavailable)


@pytest.mark.parametrize(
    ("code", "status", "killed"),
    [(grpc.StatusCode.RESOURCE_EXHAUSTED, 507, True), (grpc.StatusCode.INTERNAL, 500, False)],
)
def test_grpc_worker_died_statuses(code: grpc.StatusCode, status: int, killed: bool) -> None:
    # TorchServe 0.12's details, as measured on a real server (tests/resilience/test_faults.py).
    details = "Worker died.\norg.pytorch.serve.http.InternalServerException"
    error = error_from_rpc(_RpcError(code, details), "127.0.0.1:7070", "inference")
    assert isinstance(error, WorkerDied)
    assert (error.status, error.killed, error.retryable, error.message) == (
        status,
        killed,
        killed,
        "Worker died.",
    )
    # A 413 that TorchServe itself sends is RESOURCE_EXHAUSTED too, but no worker died.
    too_big = error_from_rpc(_RpcError(code, "request too large"), "t", "inference")
    assert not isinstance(too_big, WorkerDied) and not too_big.retryable

"""serving.server: the config it writes, and clear failures (busy port, model that won't load)."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest
import yaml

from serving.archive import ArchiveOptions, build_archive
from serving.server import (
    Ports,
    ServerError,
    listen_ports,
    main,
    model_names,
    read_properties,
    runtime_properties,
    start,
    status,
    stop,
)

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "config.properties"


def test_repo_config_has_the_production_keys():
    props = read_properties(CONFIG)
    assert props["metrics_mode"] == "prometheus"
    assert props["enable_model_api"] == "false"
    assert props["disable_token_authorization"] == "false"
    # Far above TorchServe's 6.5 MB default (photos fit); the upper bound is the memory budget
    # (tests/k8s/test_memory_budget.py).
    assert int(props["max_request_size"]) >= 32 * 1024 * 1024
    assert int(props["max_response_size"]) >= 32 * 1024 * 1024
    assert int(props["token_expiration_min"]) > 60
    assert props["load_models"] == "segmenter=segmenter.mar"
    assert "metrics_format" not in props  # ignored by 0.12: a trap, not a setting
    metrics_yaml = yaml.safe_load((REPO / props["metrics_config"]).read_text())
    declared = {m["name"] for kind in metrics_yaml["model_metrics"].values() for m in kind}
    assert "segserve_rejected_inputs_total" in declared and "HandlerTime" in declared
    ports = {k: p for k, (_, p) in listen_ports(props).items()}
    assert ports == {
        "inference_address": 8080,
        "management_address": 8081,
        "metrics_address": 8082,
        "grpc_inference_port": 7070,
        "grpc_management_port": 7071,
    }
    assert model_names(props) == ["segmenter"]


def test_runtime_properties_resolve_paths_and_override_ports(tmp_path):
    props = runtime_properties(read_properties(CONFIG), REPO, tmp_path, Ports(1, 2, 3, 4, 5))
    assert props["metrics_config"] == str(REPO / "handler" / "metrics.yaml")
    assert props["model_store"] == str(tmp_path.resolve())
    assert props["inference_address"] == "http://0.0.0.0:1"
    assert props["metrics_address"] == "http://0.0.0.0:3"
    assert (props["grpc_inference_port"], props["grpc_management_port"]) == ("4", "5")
    assert props["enable_model_api"] == "false"  # everything else is kept


def test_busy_port_fails_fast_and_names_it(tiny_archive, tmp_path):
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        sock.listen()
        busy = sock.getsockname()[1]
        free = Ports.free()
        ports = Ports(free.inference, busy, free.metrics, free.grpc_inference, free.grpc_management)
        with pytest.raises(ServerError, match=f"port {busy} \\(management_address"):
            start(CONFIG, model_store=tiny_archive, workdir=tmp_path, ports=ports)
    assert status(tmp_path) == {"running": False}


def test_missing_archive_says_make_archive(tmp_path):
    with pytest.raises(ServerError, match="make archive"):
        start(CONFIG, model_store=tmp_path, workdir=tmp_path, ports=Ports.free())


def test_stop_and_status_when_nothing_runs(tmp_path, capsys):
    assert stop(tmp_path) is False
    assert main(["status", "--workdir", str(tmp_path)]) == 1
    assert main(["stop", "--workdir", str(tmp_path)]) == 0
    assert "No TorchServe was running" in capsys.readouterr().out


@pytest.mark.serving
@pytest.mark.slow
def test_model_that_does_not_load_fails_start_with_the_log(tiny_export, tmp_path):
    broken = tmp_path / "broken_export"
    shutil.copytree(tiny_export, broken)
    (broken / "model.pt").write_bytes(b"this is not TorchScript")
    store = tmp_path / "store"
    build_archive(broken, store, ArchiveOptions())
    workdir = tmp_path / "wd"
    with pytest.raises(ServerError) as info:
        start(CONFIG, model_store=store, workdir=workdir, ports=Ports.free(), timeout_s=120)
    message = str(info.value)
    assert "Load model failed" in message or "failed" in message.lower()
    assert "model_log.log" in message  # the tail of the worker log comes with it
    assert status(workdir) == {"running": False}
    assert not (workdir / "key_file.json").exists()

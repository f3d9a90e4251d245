"""The page's settings: one typed config from YAML + flags, refused with the key named."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ui.config import PageConfig, PageConfigError, load_page_config, page_config

REPO = Path(__file__).resolve().parents[2]


def test_defaults_and_overrides(tmp_path):
    assert page_config() == PageConfig()
    path = tmp_path / "page.yaml"
    path.write_text("protocol: grpc\nport: 7999\n")
    cfg = load_page_config(path, {"port": 8001, "model_name": None})
    assert (cfg.protocol, cfg.port, cfg.model_name) == ("grpc", 8001, "segmenter")


@pytest.mark.parametrize(
    "values, message",
    [
        ({"protcol": "rest"}, "protcol: unknown setting"),
        ({"port": "eighty"}, "port: 'eighty' is not a int"),
        ({"port": 70000}, "port: 70000 is not a TCP port"),
        ({"inference_url": "127.0.0.1:8080"}, "must start with http://"),
        ({"grpc_target": "localhost"}, "must be host:port"),
        ({"timeout_s": 0}, "timeout_s: must be > 0"),
        ({"token_file": "/nonexistent/token"}, "token_file: /nonexistent/token is not a file"),
    ],
)
def test_bad_settings_name_the_key(values, message):
    with pytest.raises(PageConfigError, match=message):
        page_config(values)


def test_a_bad_yaml_file_is_named(tmp_path):
    path = tmp_path / "page.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(PageConfigError, match=rf"{path}: must be a mapping"):
        load_page_config(path, {})
    path.write_text("protocol: soap\n")
    with pytest.raises(PageConfigError, match=rf"{path}: protocol: 'soap' is not one of"):
        load_page_config(path, {})


def test_the_cli_refuses_bad_settings_with_exit_2(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "ui", "--token-file", str(tmp_path / "nope")],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert f"token_file: {tmp_path / 'nope'} is not a file" in result.stderr

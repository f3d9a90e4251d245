"""The .mar layout, its model-config, the manifest, and the CLI's errors."""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile

import pytest
import yaml

from serving.archive import ArchiveError, ArchiveOptions, build_archive, main


def test_archive_layout_config_and_manifest(tiny_archive):
    mar = tiny_archive / "segmenter.mar"
    names = set(zipfile.ZipFile(mar).namelist())
    for expected in (
        "segmenter_handler.py",
        "model.pt",
        "metadata.json",
        "model-config.yaml",
        "handler/__init__.py",
        "handler/imaging.py",
        "handler/preprocessing.py",
        "handler/metrics.yaml",
        "MAR-INF/MANIFEST.json",
    ):
        assert expected in names
    assert not any("__pycache__" in n or n.startswith("training/") for n in names)
    assert "MODEL_CARD.md" not in names  # packed only when given (tests/training/test_card.py)
    with zipfile.ZipFile(mar) as z:
        config = yaml.safe_load(z.read("model-config.yaml"))
        mar_manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))
    assert config["batchSize"] == 4 and config["maxBatchDelay"] == 50
    assert "minWorkers" not in config and "maxWorkers" not in config  # TorchServe decides
    assert config["deviceType"] == "gpu" and config["responseTimeout"] == 120
    assert config["handler"] == {
        "max_pixels": 40_000_000,
        "cuda_half": False,
        "cuda_channels_last": False,
        "cuda_jpeg_decode": True,
        "drift_every_s": 0.1,
        "runtime": "torchscript",  # auto on a TorchScript-only export
    }
    assert mar_manifest["model"]["handler"] == "segmenter_handler.py"
    assert mar_manifest["model"]["modelVersion"] == "1.0"
    manifest = json.loads((tiny_archive / "segmenter.manifest.json").read_text())
    assert manifest["sha256"] == hashlib.sha256(mar.read_bytes()).hexdigest()
    assert manifest["name"] == "segmenter" and manifest["version"] == "1.0"
    assert manifest["metrics"]["miou"] == 0.5
    assert manifest["source_checkpoint"] == "tests/tiny/best.pt"
    assert manifest["model_card"] is None
    assert manifest["versions"]["torchserve"] == "0.12.0"
    assert manifest["model"]["class_names"] == ["background", "road", "building", "sky"]
    assert (
        manifest["runtime"]["name"] == "torchscript" and manifest["runtime"]["file"] == "model.pt"
    )
    assert (
        manifest["runtime"]["requested"] == "auto" and manifest["runtime"]["parity"]["argmax_equal"]
    )


def test_cli_overrides(tiny_export, tmp_path):
    rc = main(
        [
            "--export-dir", str(tiny_export),
            "--out-dir", str(tmp_path),
            "--model-name", "seg-b2",
            "--version", "2.1",
            "--batch-size", "2",
            "--max-batch-delay", "7",
            "--max-workers", "3",
            "--threads", "2",
            "--device-type", "cpu",
            "--cuda-half",
            "--no-cuda-jpeg-decode",
            "--drift-every-s", "0",
        ]
    )  # fmt: skip
    assert rc == 0
    with zipfile.ZipFile(tmp_path / "seg-b2.mar") as z:
        config = yaml.safe_load(z.read("model-config.yaml"))
        assert json.loads(z.read("MAR-INF/MANIFEST.json"))["model"]["modelVersion"] == "2.1"
    assert (config["batchSize"], config["maxBatchDelay"], config["maxWorkers"]) == (2, 7, 3)
    assert config["minWorkers"] == 1 and config["handler"]["threads"] == 2
    assert config["deviceType"] == "cpu" and config["handler"]["cuda_half"] is True
    assert config["handler"]["cuda_jpeg_decode"] is False
    assert config["handler"]["drift_every_s"] == 0.0
    assert (tmp_path / "seg-b2.manifest.json").is_file()


def test_missing_export_pieces_say_make_export(tiny_export, tmp_path, capsys):
    assert main(["--export-dir", str(tmp_path / "nope"), "--out-dir", str(tmp_path)]) == 2
    assert "make export" in capsys.readouterr().err
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(tiny_export / "metadata.json", partial)
    assert main(["--export-dir", str(partial), "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "model.pt" in err and "make export" in err
    (partial / "metadata.json").unlink()
    shutil.copy(tiny_export / "model.pt", partial)
    assert main(["--export-dir", str(partial), "--out-dir", str(tmp_path)]) == 2
    assert "metadata.json" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.mar"))


def test_a_missing_model_card_says_how_to_write_one(tiny_export, tmp_path, capsys):
    card = tmp_path / "MODEL_CARD.md"
    argv = ["--export-dir", str(tiny_export), "--out-dir", str(tmp_path), "--model-card", str(card)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"--model-card {card}: no such file" in err and "python -m training card" in err
    assert not list(tmp_path.glob("*.mar"))


def test_inconsistent_metadata_is_refused(tiny_export, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_export, bad)
    meta = json.loads((bad / "metadata.json").read_text())
    meta["palette"] = meta["palette"][:3]
    (bad / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ArchiveError, match="palette"):
        build_archive(bad, tmp_path / "store", ArchiveOptions())


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (ArchiveOptions(model_name="bad name"), "model-name"),
        (ArchiveOptions(batch_size=0), "batch-size"),
        (ArchiveOptions(min_workers=2, max_workers=1), "max-workers"),
        (ArchiveOptions(device_type="tpu"), "device-type"),
        (ArchiveOptions(runtime="tensorrt"), "runtime"),
        (ArchiveOptions(drift_every_s=-1), "drift-every-s"),
        # TorchServe 0.12 reads maxBatchDelay 0 as unset: 100 ms (c=1 p50 131 ms, not 30)
        (ArchiveOptions(max_batch_delay_ms=0), "max-batch-delay must be >= 1"),
    ],
)
def test_bad_options(options, message, tiny_export, tmp_path):
    with pytest.raises(ArchiveError, match=message):
        build_archive(tiny_export, tmp_path, options)


def test_a_runtime_the_export_lacks_names_the_file_and_the_fix(tiny_export, tmp_path, capsys):
    argv = ["--export-dir", str(tiny_export), "--out-dir", str(tmp_path), "--runtime", "onnx"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "export has no model.onnx: re-export with export.runtimes including onnx" in err
    assert not list(tmp_path.glob("*.mar"))

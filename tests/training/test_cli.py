"""``python -m training``: subcommands wired to the library, clean one-line errors, exit codes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from training.cli import main

REPO = Path(__file__).resolve().parents[2]
TINY = {
    "seed": 1,
    "data": {
        "input_size": [64, 64],
        "batch_size": 4,
        "synthetic": {"num_train": 8, "num_val": 2, "image_size": [64, 64]},
    },
    "model": {"kwargs": {"encoder_depth": 3, "decoder_channels": [16, 8, 8]}},
    "train": {"epochs": 1, "amp": "off", "threads": 1, "progress": False},
}


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def write_recipe(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def run_module(*args: str) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "training", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_missing_recipe_is_one_line_exit_2_no_traceback(tmp_path: Path) -> None:
    proc = run_module("train", "--config", str(tmp_path / "nope.yaml"), "--run-dir", "x")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: ") and "nope.yaml: recipe not found" in lines[0]


def test_bad_override_names_the_key(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = write_recipe(tmp_path / "r.yaml", TINY)
    code = main(["train", "--config", str(config), "--run-dir", str(tmp_path / "run"),
                 "--set", "optim.nme=sgd"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert "unknown key optim.nme" in err and "allowed keys: name, lr" in err
    assert not (tmp_path / "run").exists()


def test_data_error_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "mine").mkdir()
    recipe = TINY | {"data": TINY["data"] | {"kind": "folder", "root": str(tmp_path / "mine")}}
    config = write_recipe(tmp_path / "r.yaml", recipe)
    code = main(["train", "--config", str(config), "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and "classes.yaml" in err


def test_missing_checkpoint_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["evaluate", "--run-dir", str(tmp_path)])
    assert code == 2
    assert "best.pt: no such checkpoint" in capsys.readouterr().err


def test_a_subcommand_is_required(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


def _folder_recipe(tmp_path: Path, root: Path) -> Path:
    data = TINY["data"] | {"kind": "folder", "root": str(root), "input_size": [32, 32]}
    # output_dir in tmp_path: check-data writes its report to output_dir/check-data.
    recipe = TINY | {"data": data, "output_dir": str(tmp_path / "run")}
    return write_recipe(tmp_path / "folder.yaml", recipe)


def test_evaluate_a_split_with_tta_from_the_command_line(tmp_path: Path, capsys) -> None:
    import json

    from training.config import recipe_from_dict

    from .conftest import write_untrained_checkpoint

    run_dir = tmp_path / "run"
    write_untrained_checkpoint(recipe_from_dict(TINY), run_dir)
    code = main(["evaluate", "--run-dir", str(run_dir), "--split", "train", "--tta", "flip",
                 "--scales", "0.5,1"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0
    out = run_dir / "eval-train-flip-scales0.5_1"
    assert f"wrote {out}" in captured.err and not (run_dir / "eval").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split"] == "train" and metrics["num_images"] == 8
    assert metrics["inference"]["flip"] is True and metrics["inference"]["scales"] == [0.5, 1.0]
    assert '"miou"' in captured.out

    assert main(["evaluate", "--run-dir", str(run_dir), "--scales", "big"]) == 2
    assert "--scales 'big': expected comma-separated factors" in capsys.readouterr().err
    assert main(["evaluate", "--run-dir", str(run_dir), "--split", "holdout"]) == 2
    assert "synthetic data has splits train, val and test" in capsys.readouterr().err
    assert main(["evaluate", "--run-dir", str(run_dir), "--out", str(tmp_path / "mine")]) == 0
    assert (tmp_path / "mine" / "metrics.json").is_file()


def test_check_data_on_clean_data(tmp_path, folder_root, capsys) -> None:
    code = main(["check-data", "--config", str(_folder_recipe(tmp_path, folder_root))])
    out = capsys.readouterr().out
    assert code == 0
    assert "folder data: train: 3 samples, val: 1 samples; 0 problem(s)" in out
    assert f"{tmp_path / 'run' / 'check-data' / 'samples.png'}" in out  # the data report


def test_check_data_lists_every_bad_file(tmp_path, folder_root, capsys) -> None:
    (folder_root / "images" / "train" / "img1.jpg").write_bytes(b"not a jpeg at all")
    bad = np.zeros((24, 32), np.uint8)
    bad[0, 0] = 7  # not a class (0..2) and not the ignore value 9
    Image.fromarray(bad, mode="L").save(folder_root / "masks" / "train" / "img2.png")
    code = main(["check-data", "--config", str(_folder_recipe(tmp_path, folder_root))])
    out = capsys.readouterr().out
    assert code == 1
    assert "img1.jpg" in out and "img2.png" in out and "[7]" in out
    assert "2 problem(s)" in out


@pytest.mark.slow
def test_train_evaluate_export_predict(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The whole offline chain through the CLI, on a tiny run."""
    config = write_recipe(tmp_path / "r.yaml", TINY)
    run_dir = tmp_path / "run"
    assert main(["train", "--config", str(config), "--run-dir", str(run_dir)]) == 0
    assert '"epochs_completed": 1' in capsys.readouterr().out
    assert main(["train", "--config", str(config), "--run-dir", str(run_dir),
                 "--resume", "--set", "train.epochs=2"]) == 0  # fmt: skip
    assert (run_dir / "metrics.jsonl").read_text().count("\n") == 2
    assert main(["evaluate", "--run-dir", str(run_dir)]) == 0
    assert (run_dir / "eval" / "metrics.json").is_file()
    assert main(["export", "--run-dir", str(run_dir)]) == 0
    assert (run_dir / "export" / "model.pt").is_file()
    image = tmp_path / "scene.png"
    Image.fromarray(np.full((50, 70, 3), 120, np.uint8)).save(image)
    capsys.readouterr()
    code = main(["predict", "--export-dir", str(run_dir / "export"), str(image),
                 "--out-dir", str(tmp_path / "preds")])  # fmt: skip
    assert code == 0
    mask = Image.open(tmp_path / "preds" / "scene.png")
    assert mask.mode == "P" and mask.size == (70, 50)
    assert np.asarray(mask).max() < 6
    assert mask.getpalette()[3:6] == [230, 25, 75]  # class 1's colour from the metadata


def test_samples_writes_a_folder_dataset_the_folder_recipe_reads(tmp_path: Path, capsys) -> None:
    root = tmp_path / "imbalanced"
    args = ["samples", "--out-dir", str(root), "--mode", "imbalanced", "--size", "64", "64"]
    assert main([*args, "--splits", "train=3,val=1,test=2"]) == 0
    assert "wrote a folder dataset (train: 3, val: 1, test: 2)" in capsys.readouterr().out
    assert sorted(p.name for p in (root / "masks" / "test").iterdir()) == [
        "test_0000.png",
        "test_0001.png",
    ]
    config = write_recipe(
        tmp_path / "r.yaml",
        {"data": {"kind": "folder", "root": str(root), "input_size": [64, 64]}},
    )
    assert main(["check-data", "--config", str(config), "--out", str(tmp_path / "check")]) == 0
    assert "train: 3 samples, val: 1 samples" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exited:
        main([*args, "--splits", "train=3,holdout=1"])
    assert exited.value.code == 2
    assert "'holdout=1': expected SPLIT=N with SPLIT in ['train', 'val', 'test']" in (
        capsys.readouterr().err
    )

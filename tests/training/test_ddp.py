"""DDP through torchrun: 2 CPU processes on gloo train a tiny recipe end to end."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from training.checkpoint import load_checkpoint

from .conftest import torchrun_train

RECIPE = {
    "name": "ddp",
    "seed": 5,
    "data": {
        "input_size": [64, 64],
        "batch_size": 2,
        # 5 val images: uneven shards (3 + 2); a padded sampler would count one twice.
        "synthetic": {"num_train": 8, "num_val": 5, "image_size": [64, 64]},
    },
    "model": {"kwargs": {"encoder_depth": 3, "decoder_channels": [16, 8, 8]}},
    "train": {"epochs": 2, "amp": "off", "threads": 1, "progress": False},
}


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    return torchrun_train(RECIPE, tmp_path_factory.mktemp("ddp"))


@pytest.mark.slow
def test_torchrun_trains_and_rank0_writes_once(ddp_run) -> None:
    run_dir, proc = ddp_run
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert ckpt["epoch"] == 2
    # 8 images over 2 ranks with batch 2: 2 steps per epoch. One process would take 4.
    assert ckpt["global_step"] == 4
    assert (run_dir / "checkpoints" / "best.pt").is_file()
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2  # one writer: no duplicated rows
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
    assert proc.stdout.count('"best_miou"') == 1  # only rank 0 prints the summary


@pytest.mark.slow
def test_val_confusion_matrix_equals_a_single_process_evaluation(ddp_run) -> None:
    """Counts summed over both ranks' shards == the evaluator on one process, pixel for pixel."""
    from training.evaluate import run_evaluation

    run_dir, _ = ddp_run
    last = run_dir / "checkpoints" / "last.pt"
    ddp_matrix = load_checkpoint(last)["metrics"]["confusion_matrix"]
    assert sum(map(sum, ddp_matrix)) == 5 * 64 * 64  # every val pixel exactly once
    single = run_evaluation(run_dir, last)
    assert single["confusion_matrix"] == ddp_matrix


@pytest.mark.slow
def test_torchrun_draws_one_split_and_one_repeat_list_for_both_ranks(tmp_path: Path) -> None:
    """A flat folder (no split folders) under data.split and data.rare_repeat on 2 ranks: rank 0
    writes the lists once, both ranks train and validate on that split, repeats included."""
    from training.synthetic import write_folder_dataset

    root = tmp_path / "flat"
    write_folder_dataset(root, {"train": 14}, seed=3, size=(64, 64), mode="imbalanced")
    for folder in ("images", "masks"):  # flatten: images/*.png + masks/*.png
        (root / folder / "train").rename(root / f"{folder}.tmp")
        (root / folder).rmdir()
        (root / f"{folder}.tmp").rename(root / folder)
    recipe = RECIPE | {
        "data": RECIPE["data"] | {"kind": "folder", "root": str(root),
                                  "split": {"val": 0.3, "seed": 1}, "rare_repeat": 0.5},
    }  # fmt: skip
    recipe["data"].pop("synthetic")
    run_dir, proc = torchrun_train(recipe, tmp_path)
    splits = run_dir / "splits"
    lists = {n: (splits / f"{n}.txt").read_text().splitlines() for n in ("train", "val")}
    assert len(lists["val"]) == 4 and len(lists["train"]) == 10
    # Each rank printed the same repeat list length (it is drawn from the masks and the seed).
    # Each its own line: the ranks share stdout, and the message is one write per rank.
    repeats = [line for line in proc.stdout.splitlines() if line.startswith("data.rare_repeat")]
    assert len(repeats) == 2 and repeats[0] == repeats[1] and "from 10 images" in repeats[0], \
        proc.stdout  # fmt: skip
    matrix = load_checkpoint(run_dir / "checkpoints" / "last.pt")["metrics"]["confusion_matrix"]
    assert sum(map(sum, matrix)) == 4 * 64 * 64  # the 4 val images of the drawn split, once each
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["metadata"]["class_names"][-1] \
        == "beacon"  # fmt: skip

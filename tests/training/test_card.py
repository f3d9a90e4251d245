"""``python -m training card``: the model card of a real tiny run, its limitations, its errors,
and the card inside a real ``.mar`` named by the manifest."""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from handler.artifact import MODEL_CARD_FILE, load_metadata
from serving.archive import ArchiveOptions, build_archive
from training.card import collect_card_facts, hex_colour, limitations, render_card
from training.cli import main
from training.config import recipe_from_dict
from training.evaluate import read_metrics, run_evaluation
from training.export import export_run
from training.train import train

from .conftest import write_untrained_checkpoint

TINY = {
    "seed": 1,
    "data": {
        "input_size": [64, 64],
        "batch_size": 4,
        "synthetic": {"num_train": 8, "num_val": 2, "image_size": [64, 64]},
    },
    "model": {"kwargs": {"encoder_depth": 3, "decoder_channels": [16, 8, 8]}},
    "train": {"epochs": 1, "amp": "off", "threads": 1, "progress": False},
    "eval": {"num_overlays": 1},
    "export": {"drift_reference_images": 2},
}
FORWARDS = "3"  # the latency's median: enough to exercise it, cheap on a shared CPU


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real tiny run (a training epoch, the evaluation, the export) the tests only read."""
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("card") / "run"
    train(recipe_from_dict(TINY), run)
    run_evaluation(run)
    export_run(run)
    return run


def evaluated_untrained_run(tmp_path: Path) -> Path:
    """A run folder of random weights (conftest's writer) with its evaluation: seconds, no
    training, for the tests that need an evaluated run but not a trained one."""
    run = tmp_path / "run"
    write_untrained_checkpoint(recipe_from_dict(TINY), run)
    run_evaluation(run)
    return run


def card_of(run: Path, *args: str) -> str:
    assert main(["card", "--run-dir", str(run), "--forwards", FORWARDS, *args]) == 0
    return (run / MODEL_CARD_FILE).read_text(encoding="utf-8")


def table_rows(card: str, header: str) -> list[list[str]]:
    """The cells of the Markdown table whose header line starts with ``header``."""
    lines = card.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


@pytest.mark.slow
def test_card_of_a_trained_evaluated_exported_run(run_dir: Path, capsys) -> None:
    card = card_of(run_dir)
    assert f"wrote {run_dir / MODEL_CARD_FILE}" in capsys.readouterr().out
    meta = load_metadata(run_dir / "export" / "metadata.json")
    evaluation = read_metrics(run_dir / "eval")
    assert card.startswith(f"# Model card: {meta.model_name} {meta.model_version}\n")
    # export read eval/metrics.json of its checkpoint through the same reader as the card
    assert meta.metrics["boundary_f1"] == evaluation["boundary_f1"]

    per_class = table_rows(card, "| class | IoU |")
    assert [row[0] for row in per_class] == list(meta.class_names)
    header = "| class | IoU | accuracy | Dice | boundary F1 | pixels |"
    assert header in card.splitlines()
    for row, iou, bf1 in zip(
        per_class, evaluation["per_class_iou"], evaluation["per_class_boundary_f1"], strict=True
    ):
        assert row[1] == ("—" if iou is None else f"{iou:.4f}")
        assert row[4] == ("—" if bf1 is None else f"{bf1:.4f}")
    classes = table_rows(card, "| id | class | colour")
    assert [(int(r[0]), r[1]) for r in classes] == list(enumerate(meta.class_names))
    assert [r[2].split("`")[1] for r in classes] == [hex_colour(c) for c in meta.palette]
    assert f"mIoU {evaluation['miou']:.4f}" in card
    assert "Splits: train: 8 images · val: 2 images." in card

    # After one epoch every class is far under 0.5: the limitation names them.
    low = next(line for line in card.splitlines() if line.startswith("- IoU below 0.50"))
    for name, iou in zip(meta.class_names, evaluation["per_class_iou"], strict=True):
        assert (iou is not None and iou < 0.5) == (f" {name} (" in low)
    assert "- Synthetic data: trained and evaluated on the embedded generator" in card
    assert "a 1920×1080 photo shrinks 30× in width" in card  # 1920 / the 64 px input

    assert "Input size 64×64; resize policy `resize`" in card
    assert "more than 40,000,000 pixels" in card  # handler.imaging's default limit
    latency = next(line for line in card.splitlines() if line.startswith("Median "))
    assert "input 1×3×64×64, batch 1, median of 3 forwards" in latency and "on CPU (" in latency
    assert "- torchscript (`model.pt`): max |logit diff|" in card
    assert "1 epoch(s) in metrics.jsonl" in card

    recipe = card.split("```yaml\n", 1)[1].split("\n```", 1)[0]
    assert yaml.safe_load(recipe) == dict(meta.recipe)  # the resolved recipe, whole
    assert "<details><summary>Training recipe (resolved)</summary>" in card


def test_low_iou_limitation_names_only_the_classes_under_the_threshold(tmp_path: Path) -> None:
    facts = collect_card_facts(evaluated_untrained_run(tmp_path), latency_forwards=0)
    names = facts["metadata"]["class_names"]
    good = copy.deepcopy(facts)
    ious = [0.9] * len(names)
    ious[2], ious[4] = 0.31, None  # one weak class, one the split lacks
    good["evaluation"]["per_class_iou"] = ious
    lines = limitations(good)
    low = [line for line in lines if line.startswith("IoU below")]
    assert low == [
        f"IoU below 0.50 on `val`: {names[2]} (0.31); expect these classes to be missed or "
        "confused with others."
    ]
    assert any(
        line.startswith(f"Not measured: {names[4]} has no pixels in `val`") for line in lines
    )
    assert f"- {low[0]}" in render_card(good)
    good["low_iou"] = 0.3
    assert not any(line.startswith("IoU below") for line in limitations(good))
    assert f"## Latency\n\n{good['latency_note']}.\n" in render_card(good)  # no export here


def test_unevaluated_run_says_how_to_evaluate(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    best = write_untrained_checkpoint(recipe_from_dict(TINY), run)
    card = card_of(run)
    hint = f"run `python -m training evaluate --run-dir {run}`"
    assert f"**not evaluated: {hint}**" in card
    assert f"- Quality unknown: not evaluated: {hint}." in card
    export_hint = f"run `python -m training export --run-dir {run}`"
    assert f"not measured: no exported model; {export_hint}" in card
    assert [row[1] for row in table_rows(card, "| id | class |")][:2] == ["background", "disc"]

    # An evaluation of other weights is not this model's: said, not shown.
    other = run / "checkpoints" / "other.pt"
    shutil.copy(best, other)
    run_evaluation(run, other)
    card = card_of(run)
    assert f"not evaluated: eval/metrics.json scores {other}, not this model's {best}" in card
    assert "| class | IoU |" not in card


def test_a_folder_that_is_not_a_run_exits_2_naming_it(tmp_path: Path, capsys) -> None:
    assert main(["card", "--run-dir", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --run-dir {tmp_path / 'nope'}: no such folder")
    assert "python -m training train --run-dir R" in err
    assert main(["card", "--run-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"error: {tmp_path}: not a training run (no export/metadata.json" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / MODEL_CARD_FILE).exists()


@pytest.mark.slow
def test_the_archive_packs_the_card_and_the_manifest_names_it(run_dir: Path, tmp_path) -> None:
    card_of(run_dir)
    card = run_dir / MODEL_CARD_FILE
    options = ArchiveOptions(runtime="torchscript")
    mar = build_archive(run_dir / "export", tmp_path, options, model_card=card)
    with zipfile.ZipFile(mar) as archive:
        assert archive.read(MODEL_CARD_FILE) == card.read_bytes()
    manifest = json.loads(mar.with_suffix(".manifest.json").read_text())
    assert manifest["model_card"] == {
        "path": MODEL_CARD_FILE,
        "sha256": hashlib.sha256(card.read_bytes()).hexdigest(),
        "size_bytes": card.stat().st_size,
    }


@pytest.mark.skipif(torch.cuda.is_available(), reason="there the card measures on the GPU")
def test_cuda_latency_without_cuda_is_a_clear_error(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    write_untrained_checkpoint(recipe_from_dict(TINY), run)
    assert main(["card", "--run-dir", str(run), "--device", "cuda"]) == 2
    assert "--device cuda: CUDA is not available here; use --device cpu" in capsys.readouterr().err
    assert main(["card", "--run-dir", str(run), "--device", "tpu"]) == 2
    assert "--device 'tpu': use cpu, cuda or cuda:N" in capsys.readouterr().err
    assert not (run / MODEL_CARD_FILE).exists()

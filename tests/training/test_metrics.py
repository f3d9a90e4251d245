"""Confusion-matrix and boundary-F1 metrics against numbers worked out by hand."""

from __future__ import annotations

import math
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from training.metrics import BoundaryF1, ConfusionMatrix, jsonable

X = 255  # ignore_index (void)

# 4x4, 3 classes, 3 ignored pixels. Worked by hand (rows = target, cols = prediction):
#   t0: [3, 1, 0]   t1: [0, 4, 1]   t2: [1, 0, 3]       13 valid pixels, 10 correct
TARGET = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, X, 1], [2, 2, X, X]])
PRED = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 2], [2, 0, 0, 1], [2, 2, 1, 0]])


def test_hand_computed_4x4_with_ignore() -> None:
    cm = ConfusionMatrix(num_classes=3)
    cm.update(PRED, TARGET)
    assert cm.matrix.tolist() == [[3, 1, 0], [0, 4, 1], [1, 0, 3]]
    m = cm.compute()
    # IoU = tp / (row + col - tp): 3/(4+4-3), 4/(5+5-4), 3/(4+4-3)
    assert m["per_class_iou"] == pytest.approx([3 / 5, 4 / 6, 3 / 5])
    assert m["miou"] == pytest.approx(28 / 45)
    assert m["pixel_accuracy"] == pytest.approx(10 / 13)
    assert m["per_class_accuracy"] == pytest.approx([3 / 4, 4 / 5, 3 / 4])
    assert m["mean_accuracy"] == pytest.approx(2.3 / 3)
    # Dice = 2 tp / (row + col): 6/8, 8/10, 6/8
    assert m["per_class_dice"] == pytest.approx([0.75, 0.8, 0.75])
    assert m["mean_dice"] == pytest.approx(2.3 / 3)
    assert cm.pixels_per_class() == [4, 5, 4]


def test_ignored_pixels_do_not_count_whatever_is_predicted_there() -> None:
    other = PRED.clone()
    other[TARGET == X] = 2
    a, b = ConfusionMatrix(3), ConfusionMatrix(3)
    a.update(PRED, TARGET)
    b.update(other, TARGET)
    assert torch.equal(a.matrix, b.matrix)
    assert int(a.matrix.sum()) == 13


def test_absent_class_is_nan_and_left_out_of_the_means() -> None:
    cm = ConfusionMatrix(num_classes=4)  # class 3: in neither target nor prediction
    cm.update(PRED, TARGET)
    m = cm.compute()
    assert math.isnan(m["per_class_iou"][3])
    assert math.isnan(m["per_class_accuracy"][3])
    assert math.isnan(m["per_class_dice"][3])
    assert m["miou"] == pytest.approx(28 / 45)  # not (28/15 + 1) / 4 as zero_division=1 gives


def test_class_only_predicted_scores_zero_and_counts() -> None:
    target = torch.zeros(2, 2, dtype=torch.long)
    pred = torch.tensor([[0, 0], [0, 1]])
    cm = ConfusionMatrix(num_classes=2)
    cm.update(pred, target)
    m = cm.compute()
    assert m["per_class_iou"][0] == pytest.approx(3 / 4)
    assert m["per_class_iou"][1] == 0.0
    assert m["miou"] == pytest.approx(3 / 8)
    assert math.isnan(m["per_class_accuracy"][1])  # no target pixels of class 1
    assert m["mean_accuracy"] == 0.75  # class 0 only: 3 of its 4 pixels


def test_perfect_and_all_wrong() -> None:
    perfect = ConfusionMatrix(num_classes=3)
    target = TARGET.clone()
    target[target == X] = 0
    perfect.update(target, target)
    m = perfect.compute()
    assert m["miou"] == m["pixel_accuracy"] == m["mean_accuracy"] == m["mean_dice"] == 1.0

    wrong = ConfusionMatrix(num_classes=3)
    wrong.update((target + 1) % 3, target)
    m = wrong.compute()
    assert m["miou"] == m["pixel_accuracy"] == m["mean_accuracy"] == m["mean_dice"] == 0.0
    assert m["per_class_iou"] == [0.0, 0.0, 0.0]


def test_dataset_level_not_mean_of_images() -> None:
    # Image A: 1 of 4 pixels right (class 0); image B: 8 pixels all right (class 0).
    a_t, a_p = torch.zeros(2, 2, dtype=torch.long), torch.tensor([[0, 1], [1, 1]])
    b = torch.zeros(2, 4, dtype=torch.long)
    cm = ConfusionMatrix(num_classes=2)
    cm.update(a_p, a_t)
    cm.update(b, b)
    m = cm.compute()
    assert m["pixel_accuracy"] == pytest.approx(9 / 12)  # per-image mean would be 0.625
    assert m["per_class_iou"] == pytest.approx([9 / 12, 0.0])


def test_batched_update_equals_separate_updates() -> None:
    g = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 5, (3, 16, 16), generator=g)
    target = torch.randint(0, 5, (3, 16, 16), generator=g)
    target[:, :2] = X
    one, many = ConfusionMatrix(5), ConfusionMatrix(5)
    one.update(pred, target)
    for p, t in zip(pred, target, strict=True):
        many.update(p, t)
    assert torch.equal(one.matrix, many.matrix)


@pytest.mark.parametrize(
    ("pred", "target", "message"),
    [
        (torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long), "shape"),
        (torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long), "integer"),
        (torch.full((2, 2), 3), torch.zeros(2, 2, dtype=torch.long), r"\[0, 3\)"),
        (torch.zeros(2, 2, dtype=torch.long), torch.full((2, 2), 7), "label mapping"),
        (torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long), r"\(H, W\)"),
    ],
)
def test_bad_inputs_are_named(pred, target, message) -> None:
    with pytest.raises(ValueError, match=message):
        ConfusionMatrix(3).update(pred, target)
    with pytest.raises(ValueError, match=message):
        BoundaryF1(3).update(pred, target)


def test_all_reduce_without_process_group_is_a_no_op_and_guards_twice() -> None:
    cm = ConfusionMatrix(3)
    cm.update(PRED, TARGET)
    before = cm.matrix.clone()
    cm.all_reduce()
    assert torch.equal(cm.matrix, before)
    with pytest.raises(RuntimeError, match="twice"):
        cm.all_reduce()
    with pytest.raises(RuntimeError, match="reset"):
        cm.update(PRED, TARGET)
    cm.reset()
    assert int(cm.matrix.sum()) == 0


# Boundary F1. Target: class 1 in columns >= 2. Prediction: the edge moves two columns right in
# the bottom two rows.
BF_TARGET = torch.tensor([[0, 0, 1, 1, 1]] * 4)
BF_PRED = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 0, 0, 1], [0, 0, 0, 0, 1]])
# Boundary pixels (label differs from a 4-neighbour):
#   target  class 0: (0,1) (1,1) (2,1) (3,1)       class 1: (0,2) (1,2) (2,2) (3,2)
#   pred    class 0: (0,1) (1,1) (2,2) (2,3) (3,3) class 1: (0,2) (1,2) (1,3) (2,4) (3,4)


def test_boundary_f1_tolerance_0_by_hand() -> None:
    bf = BoundaryF1(num_classes=2, tolerance=0)
    bf.update(BF_PRED, BF_TARGET)
    # Both classes: 2 of 5 predicted pixels on a target boundary, 2 of 4 target pixels hit.
    # P = 2/5, R = 1/2, F1 = 2PR/(P+R) = 0.4/0.9 = 4/9.
    assert bf.counts.tolist() == [[2, 2], [5, 5], [2, 2], [4, 4]]
    assert bf.per_class() == pytest.approx([4 / 9, 4 / 9])
    assert bf.compute() == pytest.approx(4 / 9)


def test_boundary_f1_tolerance_1_by_hand() -> None:
    bf = BoundaryF1(num_classes=2, tolerance=1)
    bf.update(BF_PRED[None], BF_TARGET[None])
    # Class 0: pred (2,3), (3,3) are 2 columns from column 1 -> P = 3/5; every target pixel has a
    # pred pixel within 1 ((3,1) sees (2,2) diagonally) -> R = 1; F1 = 1.2/1.6 = 0.75.
    # Class 1: pred (2,4), (3,4) unmatched -> P = 3/5; target (3,2) has no class-1 pred boundary
    # within 1 -> R = 3/4; F1 = 0.9/1.35 = 2/3.
    assert bf.counts.tolist() == [[3, 3], [5, 5], [4, 3], [4, 4]]
    assert bf.per_class() == pytest.approx([0.75, 2 / 3])
    assert bf.compute() == pytest.approx((0.75 + 2 / 3) / 2)


def test_boundary_f1_predicted_edges_on_ignored_pixels_are_not_false_positives() -> None:
    target = torch.tensor([[0, 0, 0, 0, X]] * 4)
    pred = torch.tensor([[0, 0, 0, 0, 1]] * 4)
    bf = BoundaryF1(num_classes=2, tolerance=0)
    bf.update(pred, target)
    # Class 0's edge at column 3 matches exactly; class 1's edge lies on ignored pixels only.
    assert bf.per_class()[0] == 1.0
    assert math.isnan(bf.per_class()[1])
    assert bf.compute() == 1.0


def test_boundary_f1_one_sided_class_scores_zero_and_no_edges_is_nan() -> None:
    bf = BoundaryF1(num_classes=3, tolerance=2)
    target = torch.zeros(6, 6, dtype=torch.long)
    bf.update(target, target)
    assert math.isnan(bf.compute())  # no boundary anywhere: undefined
    pred = target.clone()
    pred[2:4, 2:4] = 2  # a spurious blob: class 2 edges without target edges
    bf.reset()
    bf.update(pred, target)
    per_class = bf.per_class()
    assert per_class[2] == 0.0 and per_class[0] == 0.0  # class 0's predicted edges ring the blob
    assert math.isnan(per_class[1])


def test_jsonable_replaces_nan() -> None:
    cm = ConfusionMatrix(4)
    cm.update(PRED, TARGET)
    data = jsonable(cm.compute())
    assert data["per_class_iou"][3] is None
    assert data["miou"] == pytest.approx(28 / 45)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shard(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    pred = torch.randint(0, 4, (2, 12, 12), generator=g)
    target = torch.randint(0, 4, (2, 12, 12), generator=g)
    target[:, 0] = X
    return pred, target


def _reduce_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        torch.set_num_threads(1)
        cm, bf = ConfusionMatrix(4), BoundaryF1(4, tolerance=1)
        pred, target = _shard(rank)
        cm.update(pred, target)
        bf.update(pred, target)
        cm.all_reduce()
        bf.all_reduce()
        torch.save({"matrix": cm.matrix, "counts": bf.counts}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_all_reduce_over_two_gloo_processes_equals_all_data(tmp_path: Path) -> None:
    mp.spawn(_reduce_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    cm, bf = ConfusionMatrix(4), BoundaryF1(4, tolerance=1)
    for rank in range(2):
        cm.update(*_shard(rank))
        bf.update(*_shard(rank))
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.equal(got["matrix"], cm.matrix), f"rank {rank} confusion matrix"
        assert torch.equal(got["counts"], bf.counts), f"rank {rank} boundary counts"
    single_rank = ConfusionMatrix(4)
    single_rank.update(*_shard(0))
    assert not torch.equal(single_rank.matrix, cm.matrix)  # the reduction did add rank 1's data

from __future__ import annotations

import warnings

import albumentations as A
import numpy as np
import pytest
import torch

from handler.preprocessing import PreprocessSpec, prepare_image, rgb_array_to_tensor
from training.config import AugmentConfig
from training.transforms import build_train_transform, build_val_transform, resize_mask

STRONG = AugmentConfig(
    hflip=0.5, vflip=0.5, scale=(0.5, 1.5), rotate=30, color_jitter=0.3, noise=0.2
)
# Sparse label values (never 0): a blended or zero-padded pixel cannot pass as a label.
LABELS = (1, 6, 18, 41)


def _pair(h: int, w: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    blocks = np.array(LABELS)[rng.integers(0, len(LABELS), (h // 4 + 1, w // 4 + 1))]
    mask = np.kron(blocks, np.ones((4, 4), dtype=np.int64))[:h, :w]
    return rgb, mask


@pytest.mark.parametrize("policy", ["resize", "pad"])
def test_train_output_shapes_and_dtypes(policy):
    spec = PreprocessSpec((64, 96), resize_policy=policy)
    x, y = build_train_transform(STRONG, spec, seed=0)(*_pair(50, 70))
    assert x.shape == (3, 64, 96) and x.dtype == torch.float32
    assert y.shape == (64, 96) and y.dtype == torch.int64


@pytest.mark.parametrize("policy", ["resize", "pad"])
def test_train_masks_keep_only_valid_labels(policy):
    """Nearest-neighbour only: no blended label values, border/padding is ignore, never 0."""
    spec = PreprocessSpec((64, 64), resize_policy=policy)
    transform = build_train_transform(STRONG, spec, ignore_index=255, seed=1)
    seen: set[int] = set()
    for i in range(12):
        rgb, mask = _pair(40, 48, seed=i)
        _, y = transform(rgb, mask)
        values = set(torch.unique(y).tolist())
        assert values <= {*LABELS, 255}, values
        seen |= values
    assert 255 in seen, "a 40x48 image cropped to 64x64 must show an ignore border"


def test_pad_border_is_ignore_and_image_border_is_zero_before_normalising():
    """pad policy, no augmentation: a small image lands inside a 255 frame."""
    still = AugmentConfig(hflip=0, vflip=0, scale=(1.0, 1.0), rotate=0, color_jitter=0, noise=0)
    spec = PreprocessSpec((64, 64), resize_policy="pad", mean=(0, 0, 0), std=(1, 1, 1))
    rgb = np.full((32, 32, 3), 200, dtype=np.uint8)
    x, y = build_train_transform(still, spec, ignore_index=255, seed=0)(
        rgb, np.ones((32, 32), dtype=np.int64)
    )
    assert int((y == 1).sum()) == 32 * 32
    assert int((y == 255).sum()) == 64 * 64 - 32 * 32
    assert torch.all(x[:, y == 255] == 0)
    assert torch.allclose(x[:, y == 1], torch.full((3, 1024), 200 / 255))


def test_rotation_border_is_ignore():
    rotate = AugmentConfig(hflip=0, vflip=0, scale=(1.0, 1.0), rotate=45, color_jitter=0, noise=0)
    spec = PreprocessSpec((64, 64))
    transform = build_train_transform(rotate, spec, ignore_index=255, seed=3)
    borders = 0
    for _ in range(5):
        _, y = transform(*_pair(64, 64))
        assert set(torch.unique(y).tolist()) <= {*LABELS, 255}
        borders += int(y[0, 0] == 255) + int(y[-1, -1] == 255)
    assert borders > 0


def test_ignore_index_above_255_survives_augmentation():
    spec = PreprocessSpec((32, 32), resize_policy="pad")
    transform = build_train_transform(STRONG, spec, ignore_index=1000, seed=0)
    _, y = transform(*_pair(20, 20))
    assert set(torch.unique(y).tolist()) <= {*LABELS, 1000}
    assert 1000 in torch.unique(y).tolist()


def test_same_seed_same_output_different_seed_different_output():
    spec = PreprocessSpec((64, 64))
    rgb, mask = _pair(80, 80)
    a = build_train_transform(STRONG, spec, seed=7)
    b = build_train_transform(STRONG, spec, seed=7)
    c = build_train_transform(STRONG, spec, seed=8)
    for _ in range(3):
        (xa, ya), (xb, yb), (xc, _) = a(rgb, mask), b(rgb, mask), c(rgb, mask)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(xa, xc)


def test_reseed_restarts_the_stream():
    spec = PreprocessSpec((64, 64))
    rgb, mask = _pair(80, 80)
    t = build_train_transform(STRONG, spec, seed=0)
    t.reseed(123)
    first = t(rgb, mask)[0]
    t.reseed(123)
    assert torch.equal(first, t(rgb, mask)[0])


def test_seed_none_follows_torch_manual_seed():
    spec = PreprocessSpec((64, 64))
    rgb, mask = _pair(80, 80)
    torch.manual_seed(5)
    first = build_train_transform(STRONG, spec)(rgb, mask)[0]
    torch.manual_seed(5)
    assert torch.equal(first, build_train_transform(STRONG, spec)(rgb, mask)[0])


def test_pipeline_builds_without_albumentations_warnings():
    """Old argument names only warn in albumentations 2.x (and the mask border becomes 0)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for policy in ("resize", "pad"):
            t = build_train_transform(
                STRONG, PreprocessSpec((32, 32), resize_policy=policy), seed=0
            )
            t(*_pair(40, 40))
    assert any(isinstance(s, A.Rotate) for s in t.pipeline.transforms)


@pytest.mark.parametrize(
    ("augment", "match"),
    [
        (AugmentConfig(scale=(1.2, 0.8)), "scale"),
        (AugmentConfig(hflip=1.5), "hflip"),
        (AugmentConfig(noise=2.0), "noise"),
    ],
)
def test_bad_augment_values_name_the_field(augment, match):
    with pytest.raises(ValueError, match=match):
        build_train_transform(augment, PreprocessSpec((32, 32)), seed=0)


def test_train_refuses_mismatched_mask():
    t = build_train_transform(STRONG, PreprocessSpec((32, 32)), seed=0)
    rgb, _ = _pair(32, 32)
    with pytest.raises(ValueError, match="differs"):
        t(rgb, np.zeros((30, 32), dtype=np.int64))


@pytest.mark.parametrize("size", [(50, 70), (64, 64), (200, 130)])
def test_val_image_is_bit_identical_to_serving_preprocessing(size):
    spec = PreprocessSpec((64, 96), mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    rgb, mask = _pair(*size)
    x, y = build_val_transform(spec)(rgb, mask)
    expected, _ = prepare_image(rgb_array_to_tensor(rgb), spec)
    assert torch.equal(x, expected)
    assert y.shape == (64, 96) and y.dtype == torch.int64
    assert set(torch.unique(y).tolist()) <= set(LABELS)


def test_val_pad_policy_keeps_native_size_and_mask_unchanged():
    spec = PreprocessSpec((64, 64), resize_policy="pad")
    rgb, mask = _pair(50, 70)
    x, y = build_val_transform(spec)(rgb, mask)
    assert torch.equal(x, prepare_image(rgb_array_to_tensor(rgb), spec)[0])
    assert x.shape == (3, 50, 70)
    assert torch.equal(y, torch.from_numpy(mask))


def test_resize_mask_is_nearest_and_keeps_values():
    mask = torch.tensor([[0, 255], [7, 3]])
    up = resize_mask(mask, (4, 6))
    assert up.tolist() == [[0, 0, 0, 255, 255, 255]] * 2 + [[7, 7, 7, 3, 3, 3]] * 2
    down = resize_mask(torch.arange(64).view(8, 8), (4, 4))
    assert set(down.flatten().tolist()) <= set(range(64))
    assert down.dtype == torch.int64

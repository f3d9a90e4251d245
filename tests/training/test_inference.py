"""Test-time augmentation and sliding windows (training/inference.py) on tiny tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from handler.preprocessing import PreprocessSpec
from training import inference
from training.inference import (
    InferenceError,
    InferenceOptions,
    padded_forward,
    parse_scales,
    parse_size,
    segment_with_options,
    sliding_window,
    tta_probabilities,
    window_starts,
)
from training.predict import segment


def conv_model(seed: int, symmetric: bool = False, kernel: int = 3) -> torch.nn.Module:
    """A 3 → 4 class conv; ``symmetric``: its kernels are mirror images of themselves left to
    right, so the model commutes with a horizontal flip."""
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d(3, 4, kernel, padding=kernel // 2)
    if symmetric:
        with torch.no_grad():
            conv.weight.copy_((conv.weight + conv.weight.flip(-1)) / 2)
    return conv.eval()


def images(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    ("length", "window", "stride"), [(10, 4, 3), (11, 4, 3), (64, 32, 32), (65, 32, 16), (7, 8, 4)]
)
def test_window_starts_cover_every_pixel_without_overhang(length, window, stride) -> None:
    starts = window_starts(length, window, stride)
    covered = np.zeros(max(length, window), bool)
    for s in starts:
        covered[s : s + window] = True
    assert covered[:length].all()
    assert starts[0] == 0 and starts == sorted(set(starts))
    assert max(starts) + window == max(length, window)  # the last window ends at the border
    assert all(b - a <= stride for a, b in zip(starts, starts[1:], strict=False))


@pytest.mark.parametrize(("h", "w"), [(64, 64), (50, 77), (20, 100)])
@pytest.mark.parametrize(("window", "stride"), [((32, 32), (16, 16)), ((32, 64), (32, 20))])
def test_sliding_window_puts_every_output_back_where_it_came_from(h, w, window, stride) -> None:
    x = images(2, h, w)
    # The identity "model": any misplaced window or wrong overlap count shows as a difference.
    out = sliding_window(lambda t: t, x, window, stride)
    assert out.shape == x.shape
    torch.testing.assert_close(out, x, rtol=0, atol=1e-6)
    ones = sliding_window(lambda t: torch.ones(t.shape[0], 1, *t.shape[2:]), x, window, stride)
    assert torch.equal(ones, torch.ones(2, 1, h, w))


def test_sliding_window_with_the_image_as_window_is_a_plain_forward() -> None:
    model, x = conv_model(0), images(2, 32, 64)
    with torch.no_grad():
        assert torch.equal(sliding_window(model, x, (32, 64), (16, 16)), model(x))
        # Overlapping smaller windows see less context: not the same (the test can fail).
        assert not torch.allclose(sliding_window(model, x, (32, 32), (32, 16)), model(x))


def test_padded_forward_pads_to_the_divisor_and_crops_back() -> None:
    seen = []

    def model(t: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(t.shape[-2:]))
        return t[:, :2] * 2

    x = images(1, 30, 45)
    out = padded_forward(model, x, 32)
    assert seen == [(32, 64)] and torch.equal(out, x[:, :2] * 2)


def test_flip_tta_of_a_flip_equivariant_model_equals_the_plain_forward() -> None:
    x = images(2, 16, 24)
    flip = InferenceOptions(flip=True)
    symmetric = conv_model(1, symmetric=True)
    with torch.no_grad():
        plain = symmetric(x).softmax(1)
        got = tta_probabilities(symmetric, x, (16, 24), flip, size_divisor=8)
        torch.testing.assert_close(got, plain, rtol=0, atol=1e-6)
        # A model that does not commute with flips: TTA averages two different answers.
        lopsided = conv_model(1)
        averaged = tta_probabilities(lopsided, x, (16, 24), flip, size_divisor=8)
        mirrored = lopsided(x.flip(-1)).softmax(1).flip(-1)
        torch.testing.assert_close(averaged, (lopsided(x).softmax(1) + mirrored) / 2)
        assert not torch.allclose(averaged, lopsided(x).softmax(1), atol=1e-3)


def test_plain_options_give_softmax_of_the_forward_and_scales_average_at_the_output_size() -> None:
    model = conv_model(2)
    x = images(1, 16, 16)
    with torch.no_grad():
        got = tta_probabilities(model, x, (16, 16), InferenceOptions(), size_divisor=8)
        assert torch.equal(got, model(x).softmax(1))
        # A 1x1 conv on a flat image answers the same at every scale, so the average is too.
        flat = torch.full((1, 3, 16, 16), 0.3)
        pointwise = conv_model(3, kernel=1)
        scales = InferenceOptions(scales=(0.5, 1.0, 1.5))
        many = tta_probabilities(pointwise, flat, (40, 24), scales, size_divisor=8)
        assert many.shape == (1, 4, 40, 24)
        expected = pointwise(flat).softmax(1)[:, :, :1, :1].expand(1, 4, 40, 24)
        torch.testing.assert_close(many, expected, rtol=0, atol=1e-6)
        assert torch.allclose(many.sum(1), torch.ones(1, 40, 24))


def test_segment_with_a_window_the_size_of_the_input_equals_the_served_path() -> None:
    """64x64 images under resize to 64x64: no resampling, so the argmax of the probabilities
    must be the served mask exactly."""
    spec = PreprocessSpec(input_size=(64, 64))
    model = conv_model(4)
    rgb = [np.random.default_rng(i).integers(0, 256, (64, 64, 3), np.uint8) for i in range(3)]
    options = InferenceOptions(window=(64, 64))
    with torch.no_grad():
        served = segment(model, rgb, spec)
        windowed = segment_with_options(model, rgb, spec, options)
    for (mask, conf), (want_mask, want_conf) in zip(windowed, served, strict=True):
        assert mask.dtype == want_mask.dtype and np.array_equal(mask, want_mask)
        np.testing.assert_allclose(conf, want_conf, rtol=0, atol=1e-6)


@pytest.mark.parametrize("group_pixels", [inference.GROUP_PIXELS, 40 * 70])
def test_segment_with_options_answers_each_image_at_its_size_batched_or_not(
    group_pixels: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(inference, "GROUP_PIXELS", group_pixels)  # 40 * 70: one image a group
    spec = PreprocessSpec(input_size=(32, 32), resize_policy="pad")
    model = conv_model(5)
    rgb = [
        np.random.default_rng(i).integers(0, 256, size, np.uint8)
        for i, size in enumerate([(40, 70, 3), (40, 70, 3), (25, 33, 3)])
    ]
    options = InferenceOptions(flip=True, scales=(0.75, 1.0), window=(32, 32), stride=(16, 24))
    with torch.no_grad():
        together = segment_with_options(model, rgb, spec, options)
        for image, (mask, conf) in zip(rgb, together, strict=True):
            assert mask.shape == conf.shape == image.shape[:2]
            alone_mask, alone_conf = segment_with_options(model, [image], spec, options)[0]
            assert np.array_equal(mask, alone_mask)
            np.testing.assert_allclose(conf, alone_conf, rtol=0, atol=1e-6)
            assert conf.min() >= 0.25 - 1e-6 and conf.max() <= 1 + 1e-6


def test_bad_options_name_the_flag_and_the_fix() -> None:
    with pytest.raises(InferenceError, match=r"--window 100x100: each side must be a multiple "
                       r"of 32 .*e\.g\. --window 96x96"):  # fmt: skip
        InferenceOptions(window=(100, 100)).check_for(PreprocessSpec((64, 64)))
    with pytest.raises(InferenceError, match=r"--stride 64x64: .* would skip pixels"):
        InferenceOptions(window=(32, 32), stride=(64, 64))
    with pytest.raises(InferenceError, match="--stride needs --window"):
        InferenceOptions(stride=(8, 8))
    with pytest.raises(InferenceError, match=r"--scales: factors in \[0.05, 8\]"):
        InferenceOptions(scales=(0.0, 1.0))
    with pytest.raises(InferenceError, match=r"--scales 'a,1': expected comma-separated"):
        parse_scales("a,1")
    with pytest.raises(InferenceError, match=r"--window '12x': expected HxW"):
        parse_size("12x", "--window")
    assert parse_size("32X64", "--window") == (32, 64)


def test_options_describe_themselves_for_folders_and_metrics() -> None:
    options = InferenceOptions(flip=True, scales=(0.75, 1.0, 1.25), window=(512, 1024))
    assert options.tag == "flip-scales0.75_1_1.25-window512x1024-stride256x512"
    assert options.describe() == {
        "flip": True,
        "scales": [0.75, 1.0, 1.25],
        "window": [512, 1024],
        "stride": [256, 512],
    }
    assert InferenceOptions().is_plain and InferenceOptions().tag == ""
    assert not InferenceOptions(scales=(1.0, 0.5)).is_plain

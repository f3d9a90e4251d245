"""Decoding of every accepted format and every refusal; the mask/colour/overlay encoders."""

from __future__ import annotations

import io
import struct
import zipfile
import zlib

import numpy as np
import pytest
from PIL import Image

from handler.errors import InputError
from handler.imaging import (
    ALPHA_BACKGROUND,
    blend_overlay,
    decode_image,
    encode_color_png,
    encode_mask_png,
    encode_overlay,
)
from loadtest import hostile

LIMIT = 10_000_000


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def gradient(h: int = 24, w: int = 32) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) % 256], -1).astype(np.uint8)


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "WEBP"])
def test_lossless_formats_roundtrip_exactly(fmt):
    rgb = gradient()
    kwargs = {"lossless": True} if fmt == "WEBP" else {}
    out = decode_image(encode(Image.fromarray(rgb), fmt, **kwargs), LIMIT)
    assert out.dtype == np.uint8 and out.shape == (24, 32, 3)
    np.testing.assert_array_equal(out, rgb)


def test_jpeg_decodes_close_to_source():
    rgb = gradient()
    out = decode_image(encode(Image.fromarray(rgb), "JPEG", quality=95), LIMIT)
    assert out.shape == rgb.shape
    assert np.abs(out.astype(int) - rgb.astype(int)).mean() < 4


def test_cmyk_jpeg_becomes_rgb():
    cmyk = Image.new("CMYK", (16, 8), (0, 255, 255, 0))  # pure red in CMYK
    out = decode_image(encode(cmyk, "JPEG", quality=95), LIMIT)
    assert out.shape == (8, 16, 3)
    r, g, b = out.reshape(-1, 3).mean(0)
    assert r > 200 and g < 60 and b < 60


def test_grey_png():
    grey = np.arange(0, 200, dtype=np.uint8).reshape(10, 20)
    out = decode_image(encode(Image.fromarray(grey), "PNG"), LIMIT)
    np.testing.assert_array_equal(out, np.repeat(grey[:, :, None], 3, axis=2))


def test_16bit_grey_png_keeps_the_top_byte():
    grey16 = (np.arange(200, dtype=np.uint16).reshape(10, 20) * 300).astype(np.uint16)
    data = encode(Image.fromarray(grey16), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = decode_image(data, LIMIT)
    np.testing.assert_array_equal(out[:, :, 0], (grey16 >> 8).astype(np.uint8))
    assert out[:, :, 0].max() > 200  # not clipped to white, not squashed to black


def test_palette_png():
    image = Image.fromarray(np.array([[0, 1], [2, 1]], dtype=np.uint8))
    image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
    out = decode_image(encode(image, "PNG"), LIMIT)
    assert out[0, 0].tolist() == [255, 0, 0]
    assert out[0, 1].tolist() == [0, 255, 0]
    assert out[1, 0].tolist() == [0, 0, 255]


def test_rgba_is_composited_on_the_background():
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 255
    rgba[:2, :, 3] = 255  # top half opaque red, bottom half fully transparent
    out = decode_image(encode(Image.fromarray(rgba), "PNG"), LIMIT)
    assert out[0, 0].tolist() == [255, 0, 0]
    assert out[3, 3].tolist() == list(ALPHA_BACKGROUND)


def test_gif_first_frame():
    frames = [Image.new("RGB", (8, 6), c) for c in [(255, 0, 0), (0, 0, 255)]]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    out = decode_image(buf.getvalue(), LIMIT)
    assert out.shape == (6, 8, 3)
    assert out[0, 0].tolist() == [255, 0, 0]


def test_exif_orientation_is_applied():
    rgb = np.zeros((10, 20, 3), dtype=np.uint8)
    rgb[:, :10] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = encode(Image.fromarray(rgb), "JPEG", quality=95, exif=exif)
    out = decode_image(data, LIMIT)
    assert out.shape == (20, 10, 3)  # displayed portrait
    assert out[:5].mean() > 200 and out[-5:].mean() < 50  # left half became the top half


@pytest.mark.parametrize(
    ("data", "reason", "status"),
    [
        (b"", "empty", 400),
        (
            bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)),
            "not_an_image",
            415,
        ),
        (b"hello, I am plain text", "not_an_image", 415),
        (b"<!DOCTYPE html><html><body>hi</body></html>", "not_an_image", 415),
        (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', "not_an_image", 415),
        (b"%PDF-1.4\n%...", "not_an_image", 415),
    ],
    ids=["empty", "random", "text", "html", "svg", "pdf"],
)
def test_refusals(data, reason, status):
    with pytest.raises(InputError) as info:
        decode_image(data, LIMIT)
    assert (info.value.reason, info.value.status) == (reason, status)
    assert info.value.message  # says what to send instead


def test_zip_is_not_an_image():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("a.txt", "x")
    with pytest.raises(InputError, match="zip") as info:
        decode_image(buf.getvalue(), LIMIT)
    assert info.value.status == 415


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file(fmt):
    data = encode(Image.fromarray(gradient(64, 64)), fmt)
    with pytest.raises(InputError) as info:
        decode_image(data[: len(data) // 2], LIMIT)
    assert info.value.reason == "truncated" and info.value.status == 400


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width x height`` but holds one tiny IDAT: a decompression bomb."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


@pytest.mark.parametrize("side", [5_000, 100_000])  # below and far above Pillow's own limit
def test_bomb_refused_from_the_header(side):
    with pytest.raises(InputError) as info:
        decode_image(png_header_only(side, side), max_pixels=1_000_000)
    assert info.value.reason == "too_many_pixels" and info.value.status == 413
    assert "downscale" in info.value.message or "too large" in info.value.message


def test_pixel_limit_is_per_call():
    data = encode(Image.fromarray(gradient(20, 20)), "PNG")
    with pytest.raises(InputError):
        decode_image(data, max_pixels=399)
    assert decode_image(data, max_pixels=400).shape == (20, 20, 3)


def test_mask_png_8_and_16_bit():
    mask = np.array([[0, 1], [2, 3]])
    img = Image.open(io.BytesIO(encode_mask_png(mask, 4)))
    assert img.mode == "L"
    np.testing.assert_array_equal(np.asarray(img), mask)
    big = np.array([[0, 300], [299, 1]])
    img16 = Image.open(io.BytesIO(encode_mask_png(big, 301)))
    assert img16.mode.startswith("I")
    np.testing.assert_array_equal(np.asarray(img16), big)


def test_color_png_uses_the_palette():
    palette = [[0, 0, 0], [255, 0, 0], [0, 255, 0]]
    mask = np.array([[0, 1, 2]])
    img = Image.open(io.BytesIO(encode_color_png(mask, palette)))
    assert img.mode == "P"
    assert np.asarray(img.convert("RGB")).tolist() == [[[0, 0, 0], [255, 0, 0], [0, 255, 0]]]


def test_overlay_blends_and_encodes():
    rgb = np.full((2, 2, 3), 100, dtype=np.uint8)
    mask = np.array([[0, 1], [1, 0]])
    palette = [[0, 0, 0], [200, 0, 0]]
    blended = blend_overlay(rgb, mask, palette, alpha=0.5)
    assert blended[0, 0].tolist() == [50, 50, 50] and blended[0, 1].tolist() == [150, 50, 50]
    png = Image.open(io.BytesIO(encode_overlay(rgb, mask, palette, "PNG")))
    assert png.format == "PNG" and np.asarray(png).tolist() == blended.tolist()
    jpg = Image.open(io.BytesIO(encode_overlay(rgb, mask, palette, "JPEG")))
    assert jpg.format == "JPEG" and jpg.size == (2, 2)
    with pytest.raises(ValueError, match="PNG or JPEG"):
        encode_overlay(rgb, mask, palette, "GIF")


def test_jpeg_scan_bomb_is_refused_before_decoding():
    from handler.imaging import MAX_JPEG_SCANS, jpeg_scan_count

    progressive = io.BytesIO()
    Image.new("RGB", (40, 30), (9, 99, 199)).save(progressive, format="JPEG", progressive=True)
    assert 1 < jpeg_scan_count(progressive.getvalue()) <= 20
    assert decode_image(progressive.getvalue(), max_pixels=10_000).shape == (30, 40, 3)
    bomb = hostile.jpeg_scan_bomb()
    assert jpeg_scan_count(bomb) == MAX_JPEG_SCANS + 1  # counting stops past the limit
    with pytest.raises(InputError) as refused:
        decode_image(bomb, max_pixels=10_000)
    assert refused.value.status == 413 and refused.value.reason == "decode_limit"
    assert "baseline" in refused.value.message

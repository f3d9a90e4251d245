"""Image bytes → pixels on the model's device (handler.pixels), and which JPEGs are plain.

The device-decode branch (torchcodec, nvJPEG on CUDA) runs here on CPU, where torchcodec
decodes with libjpeg-turbo: the routing, the per-file fallbacks and the refusals are those of a
CUDA worker; only the decoder's arithmetic differs there. The CUDA tests run where CUDA is.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from handler.errors import InputError
from handler.imaging import decode_image, plain_jpeg
from handler.pixels import decode_to_device, host_rgb, host_to_device
from loadtest import hostile

LIMIT = 10_000_000
CPU = torch.device("cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def photo(h: int = 60, w: int = 80, seed: int = 0) -> np.ndarray:
    """Smooth colour plus noise: chroma subsampling and the IDCT both have work to do."""
    y, x = np.mgrid[0:h, 0:w]
    noise = np.random.default_rng(seed).integers(0, 40, (h, w, 3))
    base = np.stack([x * 200 // w, y * 200 // h, (x + y) % 200], -1)
    return (base + noise).astype(np.uint8)


def encode(image: Image.Image, fmt: str = "JPEG", **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    return encode(Image.fromarray(photo()), exif=exif)


PLAIN = {
    "4:2:0": encode(Image.fromarray(photo()), quality=90),
    "4:4:4": encode(Image.fromarray(photo()), quality=95, subsampling=0),
    "4:2:2": encode(Image.fromarray(photo()), subsampling=1),
    "progressive": encode(Image.fromarray(photo()), progressive=True),
    "odd size": encode(Image.fromarray(photo(37, 53))),
    "cut short, end marker kept": (lambda d: d[: len(d) // 2] + b"\xff\xd9")(
        encode(Image.fromarray(photo()))
    ),
}
NOT_PLAIN = {
    "PNG": encode(Image.fromarray(photo()), "PNG"),
    "grey JPEG": encode(Image.fromarray(photo()[:, :, 0])),
    "CMYK JPEG": encode(Image.fromarray(photo()).convert("CMYK")),
    "EXIF-rotated JPEG": rotated_jpeg(),
    "multi-picture (MPO)": encode(
        Image.fromarray(photo()), "MPO", save_all=True, append_images=[Image.fromarray(photo())]
    ),
    "JPEG cut short": (lambda d: d[: len(d) // 2])(encode(Image.fromarray(photo()))),
    "bytes after the end marker": encode(Image.fromarray(photo())) + b"trailing",
}
REFUSED = {
    "empty": (b"", "empty"),
    "text": (b"hello, not an image", "not_an_image"),
    "pixel bomb": (hostile.png_claiming(20_000, 20_000), "too_many_pixels"),
    "JPEG scan bomb": (hostile.jpeg_scan_bomb(), "decode_limit"),
}


@pytest.mark.parametrize("name", PLAIN)
def test_plain_jpegs(name: str) -> None:
    assert plain_jpeg(PLAIN[name], LIMIT) is True


@pytest.mark.parametrize("name", NOT_PLAIN)
def test_files_pillow_must_decode(name: str) -> None:
    assert plain_jpeg(NOT_PLAIN[name], LIMIT) is False


@pytest.mark.parametrize("name", REFUSED)
def test_the_header_check_refuses_before_any_decoder(name: str) -> None:
    data, reason = REFUSED[name]
    with pytest.raises(InputError) as refused:
        plain_jpeg(data, 1_000_000)
    assert refused.value.reason == reason


def outcome(result: torch.Tensor | InputError) -> np.ndarray | str:
    return result.reason if isinstance(result, InputError) else host_rgb(result)


def pillow_outcome(data: bytes) -> np.ndarray | str:
    try:
        return decode_image(data, 1_000_000)
    except InputError as error:
        return error.reason


def test_device_decode_gives_pillows_answer_for_every_file_in_one_batch() -> None:
    """A batch of plain, not-plain and refused files decoded "on the device": each file gets
    exactly Pillow's pixels or Pillow's refusal, whatever its batch-mates are (here the device
    is the CPU, whose torchcodec decoder is libjpeg-turbo, as Pillow's is)."""
    files = {**PLAIN, **NOT_PLAIN, **{k: data for k, (data, _) in REFUSED.items()}}
    results = decode_to_device(list(files.values()), 1_000_000, CPU, jpegs_on_device=True)
    assert len(results) == len(files)
    for name, data, result in zip(files, files.values(), results, strict=True):
        want, got = pillow_outcome(data), outcome(result)
        if isinstance(want, str):
            assert got == want, name
        else:
            assert isinstance(got, np.ndarray) and np.array_equal(got, want), name
            assert result.dtype == torch.uint8 and result.device == CPU


def test_a_file_the_device_decoder_refuses_falls_back_to_pillow(caplog) -> None:
    """Header fine for Pillow's parse, Huffman table bogus: torchcodec raises, so the batch
    call fails as a whole; its batch-mates are decoded one by one and the bad file gets
    Pillow's answer (a 400 naming the corruption)."""
    good = PLAIN["4:2:0"]
    table = good.index(b"\xff\xc4")  # DHT: 16 code-length counts after marker, length, class
    bogus = good[: table + 5] + b"\xff" * 16 + good[table + 21 :]
    assert plain_jpeg(bogus, LIMIT)
    from torchcodec.decoders import decode_jpeg

    with pytest.raises(RuntimeError, match="Huffman"):
        decode_jpeg([good, bogus], device=CPU)
    with caplog.at_level("INFO", logger="handler.pixels"):
        first, second, third = decode_to_device([good, bogus, good], LIMIT, CPU, True)
    # the device decoder saw the batch, then each file: only the bogus one went to Pillow
    assert [r.message for r in caplog.records] == [
        "a JPEG the device decoder refused goes to Pillow"
    ]
    assert np.array_equal(outcome(first), decode_image(good, LIMIT))
    assert np.array_equal(outcome(third), decode_image(good, LIMIT))
    assert outcome(second) == pillow_outcome(bogus) == "truncated"


def test_without_device_decode_pillow_decodes_and_the_tensor_is_a_view() -> None:
    rgb = decode_image(PLAIN["4:2:0"], LIMIT)
    [pixels] = decode_to_device([PLAIN["4:2:0"]], LIMIT, CPU)
    assert np.array_equal(host_rgb(pixels), rgb)
    view = host_to_device(rgb, CPU)
    assert view.shape == (3, 60, 80) and view.data_ptr() == rgb.ctypes.data  # no copy on CPU
    assert host_rgb(view).ctypes.data == rgb.ctypes.data


@needs_cuda
def test_cuda_pinned_copy_and_nvjpeg_decode() -> None:
    """On a GPU: Pillow's pixels arrive intact through pinned memory; nvJPEG's stay within a
    few levels of libjpeg's (its IDCT and chroma upsampling differ) and are repeatable."""
    cuda = torch.device("cuda")
    rgb = decode_image(PLAIN["4:2:0"], LIMIT)
    copied = host_to_device(rgb, cuda)
    assert copied.device.type == "cuda" and np.array_equal(host_rgb(copied), rgb)
    first = decode_to_device(list(PLAIN.values()), LIMIT, cuda, jpegs_on_device=True)
    again = decode_to_device(list(PLAIN.values()), LIMIT, cuda, jpegs_on_device=True)
    for name, data, a, b in zip(PLAIN, PLAIN.values(), first, again, strict=True):
        assert a.device.type == "cuda" and torch.equal(a, b), name
        gap = np.abs(host_rgb(a).astype(int) - decode_image(data, LIMIT)).max()
        assert gap <= 8, (name, gap)

"""Image bytes → ``(3, H, W)`` uint8 pixels on the model's device: the one way the handler and
``training.predict`` put an image there, so a served mask equals the offline one on the same
device.

* Every file's header is checked first, as :func:`handler.imaging.decode_image` checks it
  (pixel limit, JPEG scan count): a refused image never reaches a decoder.
* With ``jpegs_on_device`` (the handler sets it on a CUDA device), plain JPEGs
  (:func:`handler.imaging.plain_jpeg`) are decoded by torchcodec on the device itself, nvJPEG
  on CUDA, the whole batch in one call; camera frames then never exist as host pixels. Other
  files, and a JPEG the device decoder refuses, go through Pillow.
* Pillow's pixels reach a CUDA device from pinned host memory, copied asynchronously: the copy
  of one image runs while the CPU decodes the next.

nvJPEG's inverse DCT and chroma upsampling are not libjpeg's: on a GPU a JPEG's pixels may
differ from Pillow's by a level or two, as the GPU's arithmetic already differs from the CPU's.
On CPU nothing changes: Pillow decodes, and the tensor is a view of its array.

Example:
    >>> import io
    >>> from PIL import Image
    >>> buf = io.BytesIO()
    >>> Image.new("RGB", (40, 30), (255, 0, 0)).save(buf, format="PNG")
    >>> pixels, refused = decode_to_device([buf.getvalue(), b"%PDF"], 10_000, torch.device("cpu"))
    >>> tuple(pixels.shape), pixels.dtype, refused.reason
    ((3, 30, 40), torch.uint8, 'not_an_image')
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from handler.errors import InputError, quote_input
from handler.imaging import decode_image, plain_jpeg
from handler.preprocessing import rgb_array_to_tensor

logger = logging.getLogger(__name__)


def host_to_device(rgb: np.ndarray, device: torch.device) -> torch.Tensor:
    """``(H, W, 3)`` uint8 array → ``(3, H, W)`` uint8 on ``device`` (on CPU a view of it).

    To CUDA through pinned memory, without waiting: from pageable memory the driver copies
    through a staging buffer and blocks; from pinned memory the copy is a DMA queued on the
    stream that the resize after it also runs on, so nothing reads the pixels early.
    """
    pixels = rgb_array_to_tensor(rgb)
    if device.type != "cuda":
        return pixels.to(device)
    return pixels.pin_memory().to(device, non_blocking=True)


def host_rgb(pixels: torch.Tensor) -> np.ndarray:
    """``(3, H, W)`` uint8 on any device → ``(H, W, 3)`` uint8 array (on CPU a view).

    >>> host_rgb(torch.zeros(3, 2, 5, dtype=torch.uint8)).shape
    (2, 5, 3)
    """
    return pixels.permute(1, 2, 0).cpu().numpy()


def can_decode_jpegs_on_device() -> bool:
    """Whether torchcodec's JPEG decoder loads here (the serve and train extras install it);
    without it every image goes through Pillow, with a warning, rather than failing."""
    try:
        from torchcodec.decoders import decode_jpeg  # noqa: F401
    except Exception:  # noqa: BLE001 - ImportError, or its native library failing to load
        logger.warning("torchcodec does not load: Pillow decodes every image", exc_info=True)
        return False
    return True


def _decode_jpegs(datas: Sequence[bytes], device: torch.device) -> list[torch.Tensor | None]:
    """torchcodec's decode of each JPEG on ``device`` (nvJPEG on CUDA), None where it fails."""
    from torchcodec.decoders import decode_jpeg  # only where JPEGs are decoded on the device

    try:
        return list(decode_jpeg(list(datas), mode="RGB", device=device))
    except Exception:  # noqa: BLE001 - the files' fault or the device's: Pillow is the fallback
        pass  # nvJPEG's batched call keeps no partial results: find the file it refused
    decoded: list[torch.Tensor | None] = []
    for data in datas:
        try:
            decoded.append(decode_jpeg(data, mode="RGB", device=device))
        except Exception:  # noqa: BLE001
            logger.info("a JPEG the device decoder refused goes to Pillow", exc_info=True)
            decoded.append(None)
    return decoded


def _by_pillow(data: bytes, max_pixels: int, device: torch.device) -> torch.Tensor | InputError:
    """Pillow's answer for one file: its pixels on ``device``, or the error that refuses it."""
    try:
        return host_to_device(decode_image(data, max_pixels), device)
    except InputError as error:
        return error
    except Exception as exc:  # noqa: BLE001 - odd input must not kill the worker
        logger.warning("unexpected decode failure", exc_info=True)
        return InputError("bad_request", f"could not read the image: {quote_input(exc)}")


def decode_to_device(
    datas: Sequence[bytes],
    max_pixels: int,
    device: torch.device,
    jpegs_on_device: bool = False,
) -> list[torch.Tensor | InputError]:
    """Each file's ``(3, H, W)`` uint8 pixels on ``device``, or the :class:`InputError` that
    refuses it; one file's failure is its own (odd input must not fail its batch-mates).

    ``jpegs_on_device``: decode plain JPEGs with torchcodec on ``device`` (see the module's
    docstring); off, Pillow decodes everything, as ``decode_image`` always has.
    """
    on_device = [i for i, data in enumerate(datas) if jpegs_on_device and _plain(data, max_pixels)]
    results: list[torch.Tensor | InputError] = [
        None if i in on_device else _by_pillow(data, max_pixels, device)  # type: ignore[misc]
        for i, data in enumerate(datas)
    ]
    if on_device:
        decoded = _decode_jpegs([bytes(datas[i]) for i in on_device], device)
        for i, pixels in zip(on_device, decoded, strict=True):
            # A file the device decoder refused gets Pillow's answer: its pixels or its error.
            results[i] = pixels if pixels is not None else _by_pillow(datas[i], max_pixels, device)
    return results


def _plain(data: bytes, max_pixels: int) -> bool:
    """:func:`handler.imaging.plain_jpeg`, False for anything it refuses: Pillow's own decode
    of that file then gives the refusal."""
    try:
        return plain_jpeg(data, max_pixels)
    except Exception:  # noqa: BLE001 - InputError or odd input: decided by _by_pillow
        return False

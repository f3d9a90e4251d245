"""Property-based fuzzing of the pure request path: parser, decoder, error bodies, post-process.

Whatever a client sends, the pure functions either return their result or raise
:class:`handler.errors.InputError`, whose status phrase is short ASCII (what TorchServe's wire
protocol survives) and whose message is bounded, printable ASCII (client input escaped). The
live counterpart against TorchServe is ``tests/resilience/test_live_fuzz.py``.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from handler.errors import REASONS, InputError
from handler.imaging import decode_image
from handler.preprocessing import Geometry, logits_to_prediction
from handler.request import parse_request

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MESSAGE_LIMIT = 600

text = st.text(max_size=300)  # any code point, surrogates and controls included
scalars = st.none() | st.booleans() | st.integers() | st.floats() | text
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=12,
)  # fmt: skip
field_values = st.binary(max_size=400) | text | json_values
items = st.dictionaries(text, field_values, max_size=6)
headers = st.dictionaries(
    st.sampled_from(["Accept", "accept", "X-Segserve-Output", "Content-Type", "Host"]) | text,
    text | st.dictionaries(text, text, max_size=2),
    max_size=5,
)


def check_refusal(error: InputError) -> None:
    assert error.reason in REASONS
    assert error.phrase.isascii() and 0 < len(error.phrase) < 40, error.phrase
    message = error.body()["message"]
    assert message.isascii() and message.isprintable(), message[:200]
    assert len(message) <= MESSAGE_LIMIT, len(message)
    json.dumps(error.body())  # always serialisable


@FUZZ
@given(item=items, request_headers=headers)
@example(item={"output": "masqu\u00e9", "data": b"x"}, request_headers={})
@example(item={"\u00e9" * 500: b"x", "\x00": b"y"}, request_headers={})
@example(item={"data": b"x"}, request_headers={"Accept": "\ud800" + "x" * 10_000})
@example(item={"body": {"output": ["\u2028"] * 50, "image": "!!"}}, request_headers={})
# Astral characters escape to 10 ASCII characters each: 8 such names once made a 1,700-char message.
@example(item={"\U00010000" * 40 + str(i): b"" for i in range(8)}, request_headers={})
def test_parse_request_returns_or_refuses_cleanly(item, request_headers):
    try:
        request = parse_request(item, request_headers)
    except InputError as error:
        check_refusal(error)
        return
    assert isinstance(request.image, bytes)
    assert request.content_type.isascii()


def _image_bytes(fmt: str, size: tuple[int, int], seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    kwargs = {"progressive": True} if fmt == "JPEG" and seed % 2 else {}
    Image.fromarray(rgb).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


@st.composite
def mutated_images(draw) -> bytes:
    """A real PNG/JPEG/GIF/BMP/TIFF/WebP, then cut and/or with bytes overwritten."""
    fmt = draw(st.sampled_from(["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"]))
    size = (draw(st.integers(1, 40)), draw(st.integers(1, 40)))
    data = bytearray(_image_bytes(fmt, size, draw(st.integers(0, 3))))
    for _ in range(draw(st.integers(0, 6))):
        pos = draw(st.integers(0, len(data) - 1))
        data[pos] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(data)))
    return bytes(data[: cut or len(data)])


@pytest.mark.filterwarnings("ignore::UserWarning:PIL")  # Pillow's notes on corrupt metadata
@FUZZ
@given(data=st.binary(max_size=2000) | mutated_images())
def test_decode_returns_rgb_or_refuses_cleanly(data):
    try:
        rgb = decode_image(data, max_pixels=4_000)
    except InputError as error:
        check_refusal(error)
        return
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    assert 0 < rgb.shape[0] * rgb.shape[1] <= 4_000


@pytest.mark.parametrize("reason", REASONS)
def test_every_reason_has_an_ascii_phrase(reason):
    check_refusal(InputError(reason, "x" * 30 + " what to do"))


@settings(max_examples=60, deadline=None)
@given(
    classes=st.integers(1, 7),
    low=st.tuples(st.integers(1, 24), st.integers(1, 24)),
    high=st.tuples(st.integers(1, 90), st.integers(1, 90)),
    tile=st.integers(1, 5000),
    seed=st.integers(0, 2**16),
)
def test_the_mask_does_not_depend_on_the_strip_size(classes, low, high, tile, seed):
    """Strip-wise post-processing (bounded memory) gives the same mask and confidence as one
    strip, bit for bit, at any sizes: served masks stay equal to offline ones."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(classes, *low, generator=generator) * 4
    geometry = Geometry(original_size=high, content_size=low)
    whole_mask, whole_conf = logits_to_prediction(logits, geometry, tile_elements=1 << 30)
    mask, conf = logits_to_prediction(logits, geometry, tile_elements=tile)
    assert torch.equal(mask, whole_mask) and torch.equal(conf, whole_conf)
    fast, _ = logits_to_prediction(logits, geometry, tile_elements=tile, with_confidence=False)
    assert torch.equal(fast, whole_mask)
    assert mask.shape == high and int(mask.max()) < classes


@settings(max_examples=80, deadline=None)
@given(
    classes=st.integers(1, 7),
    low=st.tuples(st.integers(1, 24), st.integers(1, 24)),
    high=st.tuples(st.integers(1, 120), st.integers(1, 120)),
    tile=st.integers(1, 5000),
    seed=st.integers(0, 2**16),
    block=st.integers(1, 6),
)
def test_the_boundary_shortcut_is_the_full_upsampling_argmax(classes, low, high, tile, seed, block):
    """Only pixels whose four low-resolution neighbours disagree get upsampled logits; the mask
    equals the argmax of the fully upsampled logits (F.interpolate, bilinear) wherever that
    argmax is not a floating-point tie, and is the same with or without the confidence."""
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(seed)
    # Blocky logits (block > 1): uniform regions, as a real model's, and sparse boundaries;
    # block 1 is noise, every pixel near a boundary.
    cells = torch.randn(classes, -(-low[0] // block), -(-low[1] // block), generator=generator)
    blocks = cells.repeat_interleave(block, 1).repeat_interleave(block, 2)
    logits = blocks[:, : low[0], : low[1]] * 4
    geometry = Geometry(original_size=high, content_size=low)
    fast, none = logits_to_prediction(logits, geometry, tile_elements=tile, with_confidence=False)
    full, conf = logits_to_prediction(logits, geometry, tile_elements=tile)
    assert none is None and conf is not None
    assert torch.equal(fast, full)
    upsampled = F.interpolate(logits[None], size=high, mode="bilinear", align_corners=False)[0]
    top2 = upsampled.topk(min(2, classes), dim=0).values
    clear = (top2[0] - top2[-1] > 1e-5) if classes > 1 else torch.ones(high, dtype=torch.bool)
    assert torch.equal(fast.long()[clear], upsampled.argmax(0)[clear])

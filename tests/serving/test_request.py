"""Where the image and the output format come from in a TorchServe request item."""

from __future__ import annotations

import base64

import pytest

from handler.errors import InputError
from handler.request import OUTPUT_FORMATS, output_from_accept, parse_request

PNG = b"\x89PNG\r\n\x1a\nfake"


@pytest.mark.parametrize("key", ["data", "body", "image", "file"])
def test_image_under_any_known_key(key):
    assert parse_request({key: bytearray(PNG)}, {}).image == PNG


def test_single_unknown_field_is_the_image():
    assert parse_request({"photo": PNG, "output": "json"}, {}).image == PNG


def test_rest_multipart_output_field_str_and_grpc_bytes():
    assert parse_request({"data": PNG, "output": "color"}, {}).output == "color"
    assert parse_request({"data": PNG, "output": b"overlay_jpeg"}, {}).output == "overlay_jpeg"
    assert parse_request({"data": PNG, "output": b"Overlay-JPEG"}, {}).output == "overlay_jpeg"


@pytest.mark.parametrize(
    ("accept", "output"),
    [
        ("image/png", "mask"),
        ("image/jpeg", "overlay_jpeg"),
        ("application/json", "json"),
        ("application/json;q=0.5, image/png", "mask"),
        ("text/html, application/json;q=0.9", "json"),
        ("*/*", "mask"),
    ],
)
def test_accept_header(accept, output):
    assert parse_request({"body": PNG}, {"Accept": accept}).output == output
    assert output_from_accept(accept) == output


def test_precedence_field_then_header_then_accept():
    headers = {"accept": "application/json", "X-Segserve-Output": "color"}
    assert parse_request({"body": PNG}, headers).output == "color"
    assert parse_request({"body": PNG, "output": "overlay"}, headers).output == "overlay"
    assert parse_request({"body": PNG}, {}).output == "mask"


def test_per_parameter_header_dicts_are_ignored():
    headers = {"data": {"content-type": "image/png"}, "Accept": "image/jpeg"}
    assert parse_request({"data": PNG}, headers).content_type == "image/jpeg"


def test_unknown_output_names_the_valid_ones():
    with pytest.raises(InputError) as info:
        parse_request({"data": PNG, "output": "heatmap"}, {})
    assert info.value.status == 400 and info.value.reason == "bad_request"
    assert all(name in info.value.message for name in OUTPUT_FORMATS)


def test_unsatisfiable_accept_is_400():
    with pytest.raises(InputError, match="Accept") as info:
        parse_request({"body": PNG}, {"Accept": "text/html"})
    assert info.value.status == 400


def test_text_body_is_415():
    with pytest.raises(InputError) as info:
        parse_request({"body": "a decoded text/plain body"}, {})
    assert (info.value.reason, info.value.status) == ("not_an_image", 415)


def test_json_body_with_base64_image():
    payload = {"image": base64.b64encode(PNG).decode(), "output": "json"}
    request = parse_request({"body": payload}, {})
    assert (request.image, request.output, request.content_type) == (
        PNG,
        "json",
        "application/json",
    )


def test_json_body_without_image_and_bad_base64():
    with pytest.raises(InputError, match="JSON") as info:
        parse_request({"body": {"hello": 1}}, {})
    assert info.value.status == 415
    with pytest.raises(InputError, match="base64"):
        parse_request({"body": {"image": "not base64!!"}}, {})


def test_no_image_at_all():
    with pytest.raises(InputError) as info:
        parse_request({"output": "mask"}, {})
    assert info.value.reason == "empty"

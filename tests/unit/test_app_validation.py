import base64

import pytest

from app.errors import BadRequest, PayloadTooLarge, Unauthorized
from app.validation import (
    MAX_CAPTION_CHARS,
    optional_caption,
    parse_id,
    parse_json_object,
    parse_limit,
    parse_token,
    require_image,
    require_object_id,
    require_username,
    sniff_content_type,
)


@pytest.mark.parametrize("body", [b"", b"{nope", b"[1, 2]", b'"text"', b"null", b'{"a": "\xff"}'])
def test_json_body_must_be_an_object(body):
    with pytest.raises(BadRequest):
        parse_json_object(body)


def test_json_object_parses():
    assert parse_json_object(b'{"username": "ann"}') == {"username": "ann"}


@pytest.mark.parametrize("text", ["", "abc", "-1", "0", "1.5", " 1", "１２", "99999999999999999999", str(1 << 63)])
def test_bad_path_ids(text):
    with pytest.raises(BadRequest):
        parse_id(text)


def test_good_path_ids():
    assert parse_id("1") == 1
    assert parse_id(str((1 << 63) - 1)) == (1 << 63) - 1


@pytest.mark.parametrize("value", ["5", 5.0, True, None, [5], 0, -3, 1 << 63])
def test_body_ids_must_be_positive_64_bit_integers(value):
    with pytest.raises(BadRequest):
        require_object_id({"user_id": value}, "user_id")


def test_body_id_missing():
    with pytest.raises(BadRequest, match="missing field 'user_id'"):
        require_object_id({}, "user_id")


@pytest.mark.parametrize("username", ["", "a b", "x" * 31, "ann!", 7, None, "émile"])
def test_bad_usernames(username):
    with pytest.raises(BadRequest):
        require_username({"username": username})


def test_good_username():
    assert require_username({"username": "ann_b.c9"}) == "ann_b.c9"


def test_caption_defaults_and_limits():
    assert optional_caption({}) == ""
    assert optional_caption({"caption": None}) == ""
    assert optional_caption({"caption": "hi"}) == "hi"
    for bad in (3, ["x"], "x" * (MAX_CAPTION_CHARS + 1), "a\x00b"):
        with pytest.raises(BadRequest):
            optional_caption({"caption": bad})


def test_image_decoding():
    data = b"\xff\xd8\xff\xe0 photo"
    assert require_image({"image_base64": base64.b64encode(data).decode()}) == data
    for bad in ({}, {"image_base64": 5}, {"image_base64": "!!!"}, {"image_base64": "abc"}, {"image_base64": ""}):
        with pytest.raises(BadRequest):
            require_image(bad)


def test_image_size_limit_is_checked_before_decoding():
    with pytest.raises(PayloadTooLarge, match="larger than 10 bytes"):
        require_image({"image_base64": base64.b64encode(b"x" * 30).decode()}, max_bytes=10)


def test_limit():
    assert parse_limit(None, 20, 500) == 20
    assert parse_limit("", 20, 10) == 10
    assert parse_limit("7", 20, 500) == 7
    for bad in ("0", "501", "-1", "x", "1e3", "٣"):
        with pytest.raises(BadRequest):
            parse_limit(bad, 20, 500)


def test_token_header():
    token = "A" * 20
    assert parse_token(f"Token {token}") == token
    assert parse_token(f"token   {token} ") == token
    for bad in (None, "", token, f"Bearer {token}", "Token short", "Token " + "a b" * 10):
        with pytest.raises(Unauthorized):
            parse_token(bad)


def test_content_type_sniffing():
    assert sniff_content_type(b"\xff\xd8\xff\xe0rest") == "image/jpeg"
    assert sniff_content_type(b"\x89PNG") == "application/octet-stream"

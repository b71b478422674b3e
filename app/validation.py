"""Request parsing: every malformed input becomes a 400 with a message saying what was wrong."""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any

from app.errors import BadRequest, PayloadTooLarge, Unauthorized
from app.ids import MAX_ID

USERNAME_PATTERN = re.compile(r"[A-Za-z0-9_.]{1,30}")
TOKEN_PATTERN = re.compile(r"[A-Za-z0-9_-]{16,128}")
MAX_CAPTION_CHARS = 2200
MAX_IMAGE_BYTES = 10 * 1024 * 1024
# 19 digits is the widest positive signed 64-bit integer
_DIGITS = re.compile(r"[0-9]{1,19}")


def parse_json_object(body: bytes) -> dict[str, Any]:
    if not body:
        raise BadRequest("request body must be a JSON object")
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadRequest(f"malformed JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise BadRequest("request body must be a JSON object")
    return payload


def parse_id(text: str, what: str = "id") -> int:
    if not isinstance(text, str) or not _DIGITS.fullmatch(text):
        raise BadRequest(f"{what} must be a positive integer, got {text!r}")
    value = int(text)
    if not 0 < value <= MAX_ID:
        raise BadRequest(f"{what} is out of range: {text}")
    return value


def require_object_id(payload: dict[str, Any], key: str) -> int:
    if key not in payload:
        raise BadRequest(f"missing field {key!r}")
    value = payload[key]
    # JSON true would otherwise pass as the integer 1
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"field {key!r} must be an integer id")
    if not 0 < value <= MAX_ID:
        raise BadRequest(f"field {key!r} is out of range: {value}")
    return value


def require_username(payload: dict[str, Any]) -> str:
    if "username" not in payload:
        raise BadRequest("missing field 'username'")
    username = payload["username"]
    if not isinstance(username, str):
        raise BadRequest("field 'username' must be a string")
    if not USERNAME_PATTERN.fullmatch(username):
        raise BadRequest("username must be 1-30 characters of letters, digits, '_' or '.'")
    return username


def optional_caption(payload: dict[str, Any]) -> str:
    caption = payload.get("caption", "")
    if caption is None:
        return ""
    if not isinstance(caption, str):
        raise BadRequest("field 'caption' must be a string")
    if len(caption) > MAX_CAPTION_CHARS:
        raise BadRequest(f"caption is longer than {MAX_CAPTION_CHARS} characters")
    if "\x00" in caption:
        raise BadRequest("caption must not contain NUL characters")
    return caption


def require_image(payload: dict[str, Any], max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    if "image_base64" not in payload:
        raise BadRequest("missing field 'image_base64'")
    encoded = payload["image_base64"]
    if not isinstance(encoded, str):
        raise BadRequest("field 'image_base64' must be a base64 string")
    # a cheap bound before decoding: base64 grows data by 4/3
    if len(encoded) > (max_bytes + 2) // 3 * 4:
        raise PayloadTooLarge(f"image is larger than {max_bytes} bytes")
    try:
        image = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("field 'image_base64' is not valid base64") from None
    if not image:
        raise BadRequest("image is empty")
    return image


def parse_limit(text: str | None, default: int, maximum: int) -> int:
    if text is None or text == "":
        return min(default, maximum)
    if not text.isascii() or not text.isdigit():
        raise BadRequest(f"limit must be a positive integer, got {text!r}")
    limit = int(text)
    if not 1 <= limit <= maximum:
        raise BadRequest(f"limit must be between 1 and {maximum}")
    return limit


def parse_token(authorization: str | None) -> str:
    if not authorization:
        raise Unauthorized("missing Authorization header; send 'Authorization: Token <token>'")
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "token" or not TOKEN_PATTERN.fullmatch(token):
        raise Unauthorized("malformed Authorization header; send 'Authorization: Token <token>'")
    return token


def sniff_content_type(image: bytes) -> str:
    return "image/jpeg" if image.startswith(b"\xff\xd8\xff") else "application/octet-stream"

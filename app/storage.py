"""Photo bytes in S3 (or an S3-compatible endpoint in the lab)."""

from __future__ import annotations

import boto3
import botocore.config
import botocore.exceptions

from app.config import S3Config
from app.errors import ServiceUnavailable

# Two tries of at most 2 s + 5 s each keep a hung S3 well inside gunicorn's
# worker timeout, so the client gets a 503 instead of a killed worker.
CLIENT_CONFIG = botocore.config.Config(
    connect_timeout=2,
    read_timeout=5,
    retries={"total_max_attempts": 2, "mode": "standard"},
)
_MISSING_CODES = {"404", "NoSuchKey", "NotFound"}


def photo_key(photo_id: int) -> str:
    return f"photos/{photo_id}"


def make_s3_client(config: S3Config):
    return boto3.client("s3", endpoint_url=config.endpoint_url, region_name=config.region, config=CLIENT_CONFIG)


def is_missing(error: botocore.exceptions.ClientError) -> bool:
    return str(error.response.get("Error", {}).get("Code")) in _MISSING_CODES


class PhotoStore:
    def __init__(self, config: S3Config):
        self.bucket = config.bucket
        self._client = make_s3_client(config)

    def put(self, key: str, data: bytes, content_type: str) -> None:
        try:
            self._client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=content_type)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise ServiceUnavailable(f"photo storage unavailable: {exc}") from exc

    def get(self, key: str) -> tuple[bytes, str] | None:
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=key)
            return response["Body"].read(), response.get("ContentType") or "application/octet-stream"
        except botocore.exceptions.ClientError as exc:
            if is_missing(exc):
                return None
            raise ServiceUnavailable(f"photo storage unavailable: {exc}") from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise ServiceUnavailable(f"photo storage unavailable: {exc}") from exc

"""Secrets: from the environment or a 0600 secrets file, never from the inventory.

Every secret that is loaded is registered for redaction, so it cannot reach output, logs or the
audit trail even if a message or command line happens to contain it.
"""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path
from typing import Any

from igops.errors import SecretsError

# name -> environment variable; the secrets file uses the same names as keys.
KNOWN = {
    "pingdom_token": "IGOPS_PINGDOM_TOKEN",
    "pagerduty_routing_key": "IGOPS_PAGERDUTY_ROUTING_KEY",
    "postgres_password": "IGOPS_POSTGRES_PASSWORD",
    "pgbouncer_password": "IGOPS_PGBOUNCER_PASSWORD",
    "redis_password": "IGOPS_REDIS_PASSWORD",
    "etcd_password": "IGOPS_ETCD_PASSWORD",
    "aws_access_key_id": "AWS_ACCESS_KEY_ID",
    "aws_secret_access_key": "AWS_SECRET_ACCESS_KEY",
    # The WAL repository's own S3 key, not the AWS_* one above: it is written into
    # pgbackrest.conf on every database host, so it should belong to a user that may only
    # read and write the WAL bucket, never touch EC2 snapshots or the photos.
    "archive_s3_key": "IGOPS_ARCHIVE_S3_KEY",
    "archive_s3_key_secret": "IGOPS_ARCHIVE_S3_KEY_SECRET",
}

# Shorter values cannot be hidden without hiding ordinary text too, so they are refused.
MIN_LENGTH = 4

_registered: set[str] = set()


def register(value: str) -> None:
    """Mark a value as secret so `redact` hides it everywhere."""
    if value and len(value) >= MIN_LENGTH:
        _registered.add(value)


def redact(text: str) -> str:
    for value in sorted(_registered, key=len, reverse=True):
        text = text.replace(value, "***")
    return text


def redact_data(value: Any) -> Any:
    """Every string in a JSON-shaped value redacted, keys included. Writers call this before
    they serialise: once `json.dumps` has escaped a secret holding `"`, `\\` or non-ASCII
    text, the escaped form no longer matches it."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {redact_data(key): redact_data(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_data(item) for item in value]
    return value


def _check_length(name: str, value: str, where: str) -> None:
    if len(value) < MIN_LENGTH:
        raise SecretsError(
            f"secret {name} from {where} is shorter than {MIN_LENGTH} characters, too short to be redacted from output",
            f"use a value of at least {MIN_LENGTH} characters (a real credential is far longer)",
        )


class Secrets:
    def __init__(self, file: str | None):
        self._file = Path(file).expanduser() if file else None
        self._from_file: dict[str, str] | None = None

    def get(self, name: str) -> str | None:
        if name not in KNOWN:
            raise KeyError(name)
        value = os.environ.get(KNOWN[name])
        if value:
            _check_length(name, value, f"${KNOWN[name]}")
        else:
            value = self._file_values().get(name)
        if value:
            register(value)
        return value

    def require(self, name: str) -> str:
        value = self.get(name)
        if not value:
            where = f" or {name} in {self._file}" if self._file else ""
            raise SecretsError(f"secret {name} is not set", f"export {KNOWN[name]}=…{where}")
        return value

    def _file_values(self) -> dict[str, str]:
        if self._from_file is None:
            self._from_file = read_secrets_file(self._file) if self._file else {}
        return self._from_file


def read_secrets_file(path: Path) -> dict[str, str]:
    try:
        info = path.stat()
    except FileNotFoundError:
        raise SecretsError(
            f"secrets file {path} does not exist",
            "create it with mode 0600 or remove [secrets] file from the inventory",
        ) from None
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise SecretsError(
            f"secrets file {path} is readable by others (mode {stat.S_IMODE(info.st_mode):04o})", f"chmod 600 {path}"
        )
    try:
        values = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        # The parser's message can quote the offending line, which may hold a secret.
        line = str(exc).rsplit("(at ", 1)[-1].rstrip(")") if "(at " in str(exc) else "unknown position"
        raise SecretsError(f"secrets file {path} is not valid TOML ({line})", "fix its syntax") from None
    unknown = sorted(set(values) - set(KNOWN))
    if unknown:
        raise SecretsError(
            f"secrets file {path} has unknown keys: {', '.join(unknown)}", f"known keys: {', '.join(KNOWN)}"
        )
    for key, value in values.items():
        _check_length(key, str(value), str(path))
    for value in values.values():
        register(str(value))
    return {key: str(value) for key, value in values.items()}


def insecure_url_problem(url: str) -> str | None:
    """Why a URL may not carry a secret (a token, a routing key), or None when it may: https,
    or plain http only to a loopback address (a local relay, the lab's receivers), where TLS
    protects nothing."""
    import ipaddress
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https":
        return None
    if parts.scheme == "http":
        host = parts.hostname or ""
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if loopback:
            return None
    return f"{url} is not https:// (plain http only to a loopback address), and a secret would travel over it"

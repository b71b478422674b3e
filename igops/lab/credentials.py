"""The lab's generated passwords: made once, then reused, since the databases keep them.

`secrets.toml` holds the ones igops itself uses (names from igops.secrets.KNOWN) and is the
file the lab inventory's [secrets] names; `lab/passwords.toml` holds the rest (repmgr's and
the app's database passwords), which only the lab's own configuration files need.
"""

from __future__ import annotations

import secrets as random
import tomllib
from dataclasses import dataclass
from pathlib import Path

from igops.lab import files
from igops.lab.state import AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, Paths

FLEET_SECRETS = ("postgres_password", "pgbouncer_password", "pingdom_token", "pagerduty_routing_key")
LAB_PASSWORDS = ("repmgr_password", "app_password")


@dataclass(frozen=True)
class Credentials:
    postgres_password: str
    pgbouncer_password: str
    pingdom_token: str
    pagerduty_routing_key: str
    repmgr_password: str
    app_password: str

    def fleet_secrets(self) -> dict[str, str]:
        values = {name: getattr(self, name) for name in FLEET_SECRETS}
        values.update(aws_access_key_id=AWS_ACCESS_KEY_ID, aws_secret_access_key=AWS_SECRET_ACCESS_KEY)
        # moto takes any key: the WAL repository's is the lab's one AWS key.
        values.update(archive_s3_key=AWS_ACCESS_KEY_ID, archive_s3_key_secret=AWS_SECRET_ACCESS_KEY)
        return values


def _generate(name: str) -> str:
    # PagerDuty integration keys are 32 characters; the others only need to be unguessable.
    return random.token_hex(16) if name == "pagerduty_routing_key" else random.token_urlsafe(24)


def _read(path: Path) -> dict[str, str]:
    try:
        return {key: str(value) for key, value in tomllib.loads(path.read_text()).items()}
    except (OSError, tomllib.TOMLDecodeError):
        return {}


def _toml(values: dict[str, str]) -> str:
    return "".join(f'{key} = "{value}"\n' for key, value in values.items())


def ensure(paths: Paths) -> Credentials:
    known = {**_read(paths.secrets), **_read(paths.passwords)}
    values = {name: known.get(name) or _generate(name) for name in FLEET_SECRETS + LAB_PASSWORDS}
    credentials = Credentials(**values)
    files.write_file(
        paths.secrets,
        "# The lab's secrets (igops lab up); never commit them.\n" + _toml(credentials.fleet_secrets()),
        mode=0o600,
    )
    files.write_file(paths.passwords, _toml({name: values[name] for name in LAB_PASSWORDS}), mode=0o600)
    return credentials


def load(paths: Paths) -> Credentials | None:
    """The credentials `ensure` wrote, changing nothing; None when they cannot be read (no lab
    yet, or a user who may not read the 0600 files)."""
    known = {**_read(paths.secrets), **_read(paths.passwords)}
    try:
        return Credentials(**{name: known[name] for name in FLEET_SECRETS + LAB_PASSWORDS})
    except KeyError:
        return None

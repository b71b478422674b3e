"""The app's TOML configuration, validated once at start.

igops writes this file and hands its path over in IGOPS_APP_CONFIG; every
problem is reported with the file name, section and key so that a bad deploy
fails at boot with a message instead of at the first request.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG_ENV_VAR = "IGOPS_APP_CONFIG"


class ConfigError(Exception):
    pass


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class PostgresConfig:
    host: str
    port: int
    user: str
    password_file: Path | None
    directory_database: str
    connect_timeout: int

    def password(self) -> str | None:
        """Read on every (re)connect so that a rotated password needs no restart."""
        if self.password_file is None:
            return None
        try:
            return self.password_file.read_text().strip() or None
        except FileNotFoundError:
            return None


@dataclass(frozen=True)
class RedisConfig:
    nodes: tuple[HostPort, ...]
    feed_length: int
    session_ttl: int


@dataclass(frozen=True)
class MemcachedConfig:
    servers: tuple[HostPort, ...]
    ttl: int


@dataclass(frozen=True)
class S3Config:
    endpoint_url: str | None
    region: str
    bucket: str


@dataclass(frozen=True)
class StatsConfig:
    path: Path


@dataclass(frozen=True)
class AppConfig:
    source: str
    postgres: PostgresConfig
    redis: RedisConfig
    memcached: MemcachedConfig
    s3: S3Config
    stats: StatsConfig


def parse_host_port(text: str) -> HostPort:
    """Parse "host:port" or "[v6addr]:port"."""
    if not isinstance(text, str):
        raise ValueError(f'expected a "host:port" string, got {text!r}')
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
    else:
        host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f'expected "host:port", got {text!r}')
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"port out of range in {text!r}")
    return HostPort(host, port)


class _Section:
    """Typed access to one table of the file, naming the key in every error."""

    def __init__(self, source: str, name: str, data: Any):
        self.source = source
        self.name = name
        if not isinstance(data, dict):
            raise self.error(None, "section is missing" if data is None else "must be a table")
        self.data = data

    def error(self, key: str | None, message: str) -> ConfigError:
        where = f"[{self.name}]" if key is None else f"[{self.name}] {key}"
        return ConfigError(f"{self.source}: {where}: {message}")

    def _get(self, key: str, default: Any, kind: type, kind_name: str) -> Any:
        if key not in self.data:
            if default is _REQUIRED:
                raise self.error(key, "is required")
            return default
        value = self.data[key]
        # bool is an int subclass, and `port = true` is a typo worth reporting
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.error(key, f"must be {kind_name}, got {value!r}")
        return value

    def string(self, key: str, default: Any = None) -> Any:
        value = self._get(key, default, str, "a string")
        if value is not None and not value.strip():
            raise self.error(key, "must not be empty")
        return value

    def integer(self, key: str, default: Any, *, minimum: int, maximum: int | None = None) -> int:
        value = self._get(key, default, int, "an integer")
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
            raise self.error(key, f"must be {bound}, got {value}")
        return value

    def addresses(self, key: str) -> tuple[HostPort, ...]:
        value = self._get(key, _REQUIRED, list, 'a list of "host:port" strings')
        if not value:
            raise self.error(key, 'must list at least one "host:port"')
        try:
            return tuple(parse_host_port(item) for item in value)
        except ValueError as exc:
            raise self.error(key, str(exc)) from None


_REQUIRED = object()


def parse_config(data: dict[str, Any], source: str = "<config>") -> AppConfig:
    pg = _Section(source, "postgres", data.get("postgres"))
    password_file = pg.string("password_file")
    postgres = PostgresConfig(
        host=pg.string("host", _REQUIRED),
        port=pg.integer("port", _REQUIRED, minimum=1, maximum=65535),
        user=pg.string("user", _REQUIRED),
        password_file=Path(password_file) if password_file else None,
        directory_database=pg.string("directory_database", _REQUIRED),
        # libpq counts whole seconds and treats anything below 2 as 2
        connect_timeout=pg.integer("connect_timeout", 3, minimum=2, maximum=60),
    )

    rd = _Section(source, "redis", data.get("redis"))
    redis = RedisConfig(
        nodes=rd.addresses("nodes"),
        feed_length=rd.integer("feed_length", 500, minimum=1, maximum=100_000),
        session_ttl=rd.integer("session_ttl", 86400, minimum=1),
    )

    mc = _Section(source, "memcached", data.get("memcached"))
    memcached = MemcachedConfig(
        servers=mc.addresses("servers"),
        ttl=mc.integer("ttl", 300, minimum=0, maximum=30 * 86400),
    )

    s3_section = _Section(source, "s3", data.get("s3"))
    endpoint_url = s3_section.string("endpoint_url")
    if endpoint_url is not None and not endpoint_url.startswith(("http://", "https://")):
        raise s3_section.error("endpoint_url", f"must be an http:// or https:// URL, got {endpoint_url!r}")
    s3 = S3Config(
        endpoint_url=endpoint_url,
        region=s3_section.string("region", "us-east-1"),
        bucket=s3_section.string("bucket", _REQUIRED),
    )

    st = _Section(source, "stats", data.get("stats"))
    stats = StatsConfig(path=Path(st.string("path", _REQUIRED)))

    return AppConfig(source=source, postgres=postgres, redis=redis, memcached=memcached, s3=s3, stats=stats)


def load_config(path: str | os.PathLike[str]) -> AppConfig:
    source = os.fspath(path)
    try:
        with open(source, "rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{source}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read config file: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML: {exc}") from None
    return parse_config(data, source)


def load_config_from_env(environ: dict[str, str] | os._Environ[str] = os.environ) -> AppConfig:
    path = environ.get(CONFIG_ENV_VAR, "").strip()
    if not path:
        raise ConfigError(f"{CONFIG_ENV_VAR} is not set: it must name the app's TOML config file")
    return load_config(path)

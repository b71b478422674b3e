from pathlib import Path

import pytest

from app.config import (
    CONFIG_ENV_VAR,
    ConfigError,
    HostPort,
    load_config,
    load_config_from_env,
    parse_config,
    parse_host_port,
)

FULL = """
[postgres]
host = "127.0.10.20"
port = 6432
user = "app"
password_file = "{password_file}"
directory_database = "directory"
connect_timeout = 3

[redis]
nodes = ["127.0.10.31:6379", "127.0.10.32:6379"]
feed_length = 500
session_ttl = 86400

[memcached]
servers = ["127.0.10.41:11211"]
ttl = 300

[s3]
endpoint_url = "http://127.0.10.5:5000"
region = "us-east-1"
bucket = "igops-photos"

[stats]
path = "/srv/app/shared/stats.db"
"""


def minimal() -> dict:
    return {
        "postgres": {"host": "h", "port": 6432, "user": "app", "directory_database": "directory"},
        "redis": {"nodes": ["r1:6379"]},
        "memcached": {"servers": ["m1:11211"]},
        "s3": {"bucket": "b"},
        "stats": {"path": "/tmp/stats.db"},
    }


def test_full_example_parses(tmp_path):
    password_file = tmp_path / "pw"
    password_file.write_text("s3cret\n")
    path = tmp_path / "app.toml"
    path.write_text(FULL.format(password_file=password_file))
    config = load_config(path)
    assert config.postgres.host == "127.0.10.20"
    assert config.postgres.port == 6432
    assert config.postgres.password() == "s3cret"
    assert config.postgres.directory_database == "directory"
    assert config.redis.nodes == (HostPort("127.0.10.31", 6379), HostPort("127.0.10.32", 6379))
    assert config.redis.feed_length == 500
    assert config.memcached.servers == (HostPort("127.0.10.41", 11211),)
    assert config.s3.endpoint_url == "http://127.0.10.5:5000"
    assert config.stats.path == Path("/srv/app/shared/stats.db")


def test_defaults_for_optional_keys():
    config = parse_config(minimal())
    assert config.postgres.password_file is None
    assert config.postgres.password() is None
    assert config.postgres.connect_timeout == 3
    assert config.redis.feed_length == 500
    assert config.redis.session_ttl == 86400
    assert config.memcached.ttl == 300
    assert config.s3.endpoint_url is None
    assert config.s3.region == "us-east-1"


def test_absent_password_file_means_no_password(tmp_path):
    data = minimal()
    data["postgres"]["password_file"] = str(tmp_path / "missing")
    assert parse_config(data).postgres.password() is None


def test_password_is_reread_so_rotation_needs_no_restart(tmp_path):
    password_file = tmp_path / "pw"
    password_file.write_text("one")
    data = minimal()
    data["postgres"]["password_file"] = str(password_file)
    config = parse_config(data)
    assert config.postgres.password() == "one"
    password_file.write_text("two\n")
    assert config.postgres.password() == "two"


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda d: d.pop("postgres"), r"\[postgres\]: section is missing"),
        (lambda d: d["postgres"].pop("host"), r"\[postgres\] host: is required"),
        (lambda d: d["postgres"].update(port="6432"), r"\[postgres\] port: must be an integer"),
        (lambda d: d["postgres"].update(port=True), r"\[postgres\] port: must be an integer"),
        (lambda d: d["postgres"].update(port=70000), r"\[postgres\] port: must be between 1 and 65535"),
        (lambda d: d["postgres"].update(connect_timeout=1), r"connect_timeout: must be between 2 and 60"),
        (lambda d: d["redis"].update(nodes=[]), r"\[redis\] nodes: must list at least one"),
        (lambda d: d["redis"].update(nodes="r1:6379"), r"\[redis\] nodes: must be a list"),
        (lambda d: d["redis"].update(nodes=["r1"]), r"\[redis\] nodes: expected \"host:port\""),
        (lambda d: d["redis"].update(feed_length=0), r"\[redis\] feed_length: must be between 1"),
        (lambda d: d["memcached"].update(servers=["m:0"]), r"\[memcached\] servers: port out of range"),
        (lambda d: d["s3"].update(endpoint_url="127.0.0.1:5000"), r"\[s3\] endpoint_url: must be an http"),
        (lambda d: d["s3"].update(bucket=""), r"\[s3\] bucket: must not be empty"),
        (lambda d: d.update(stats=[]), r"\[stats\]: must be a table"),
    ],
)
def test_errors_name_section_and_key(mutate, message):
    data = minimal()
    mutate(data)
    with pytest.raises(ConfigError, match=message):
        parse_config(data, source="app.toml")


def test_unknown_keys_are_ignored_for_forward_compatibility():
    data = minimal()
    data["postgres"]["pool_size"] = 4
    data["tracing"] = {"enabled": True}
    assert parse_config(data) == parse_config(minimal())


@pytest.mark.parametrize(
    "text,expected",
    [
        ("127.0.0.1:6379", HostPort("127.0.0.1", 6379)),
        ("[::1]:6379", HostPort("::1", 6379)),
        ("redis-a:1", HostPort("redis-a", 1)),
    ],
)
def test_host_port(text, expected):
    assert parse_host_port(text) == expected
    assert str(expected) == text


@pytest.mark.parametrize("text", ["", ":6379", "host:", "host:port", "host:65536", 6379])
def test_bad_host_port(text):
    with pytest.raises(ValueError):
        parse_host_port(text)


def test_env_var_is_required():
    with pytest.raises(ConfigError, match=CONFIG_ENV_VAR):
        load_config_from_env({})


def test_missing_and_invalid_files_are_reported(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config_from_env({CONFIG_ENV_VAR: str(tmp_path / "absent.toml")})
    bad = tmp_path / "bad.toml"
    bad.write_text("[postgres\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(bad)

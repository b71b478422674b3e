from pathlib import Path

import pytest

from igops import inventory
from igops.errors import ConfigError, SecretsError, UsageError
from igops.secrets import Secrets, redact

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "config" / "example.toml"

GOOD = """
[[hosts]]
name = "db1"
address = "10.0.0.1"
roles = ["postgres"]
[[hosts]]
name = "db2"
address = "10.0.0.2"
roles = ["postgres"]
[[hosts]]
name = "app1"
address = "10.0.0.3"
roles = ["app"]
[postgres.clusters.main]
primary = "db1"
standbys = ["db2"]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "igops.toml"
    path.write_text(text)
    return path


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        inventory.load_file(write(tmp_path, text))
    return [str(problem) for problem in caught.value.problems]


def test_example_inventory_is_production_shaped():
    fleet = inventory.load_file(EXAMPLE)
    assert len(fleet.with_role("lb")) == 3
    assert len(fleet.with_role("app")) == 25
    clusters = fleet.model.postgres.clusters
    assert len(clusters) == 12 and all(len(c.standbys) == 1 for c in clusters.values())
    assert fleet.model.redis.master and fleet.model.redis.replicas
    assert len(fleet.with_role("memcached")) == 6
    assert all(host.mounts for host in fleet.with_role("postgres"))


def test_minimal_inventory_loads(tmp_path):
    fleet = inventory.load_file(write(tmp_path, GOOD))
    assert [h.name for h in fleet.select(roles=["postgres"])] == ["db1", "db2"]
    assert [h.name for h in fleet.select(pattern="app*")] == ["app1"]


def test_unknown_role(tmp_path):
    found = problems(tmp_path, GOOD.replace('roles = ["app"]', 'roles = ["ap"]'))
    assert any("unknown role 'ap'" in p and "hosts[2] (app1).roles" in p and "use one of" in p for p in found)


def test_duplicate_host_name(tmp_path):
    found = problems(tmp_path, GOOD.replace('name = "app1"', 'name = "db2"'))
    assert any("duplicate host name 'db2'" in p for p in found)


def test_duplicate_address(tmp_path):
    found = problems(tmp_path, GOOD.replace('"10.0.0.3"', '"10.0.0.1"'))
    assert any("10.0.0.1" in p and "db1" in p and "own address" in p for p in found)


def test_role_names_undefined_host(tmp_path):
    found = problems(tmp_path, GOOD.replace('standbys = ["db2"]', 'standbys = ["db2", "db9"]'))
    assert any("postgres.clusters.main" in p and "undefined host 'db9'" in p for p in found)


def test_primary_listed_twice(tmp_path):
    text = GOOD + '[postgres.clusters.other]\nprimary = "db1"\n'
    found = problems(tmp_path, text)
    assert any("primary 'db1' is already in cluster 'main'" in p for p in found)


def test_primary_also_standby(tmp_path):
    found = problems(tmp_path, GOOD.replace('standbys = ["db2"]', 'standbys = ["db2", "db1"]'))
    assert any("'db1' is listed twice" in p for p in found)


def test_bad_toml_reports_line(tmp_path):
    found = problems(tmp_path, GOOD + "\n[oops\n")
    assert len(found) == 1 and "line" in found[0] and "fix the syntax" in found[0]


def test_missing_file_names_the_ways_to_fix(tmp_path, monkeypatch):
    monkeypatch.delenv("IGOPS_CONFIG", raising=False)
    with pytest.raises(UsageError) as caught:
        inventory.load(str(tmp_path / "nope.toml"))
    assert "not found" in caught.value.message and "--config" in caught.value.hint


def test_every_problem_reported_at_once(tmp_path):
    text = GOOD.replace('roles = ["app"]', 'roles = ["ap"]').replace('standbys = ["db2"]', 'standbys = ["db9"]')
    text = text.replace('address = "10.0.0.3"', 'address = "not-an-ip"')
    found = problems(tmp_path, text)
    assert any("not an IP address" in p for p in found)
    assert any("unknown role 'ap'" in p for p in found)
    assert any("undefined host 'db9'" in p for p in found)
    assert any("db2" in p and "in no cluster" in p for p in found)


def test_missing_and_unknown_keys(tmp_path):
    found = problems(tmp_path, GOOD.replace('address = "10.0.0.3"\n', 'adress = "10.0.0.3"\n'))
    assert any("hosts[2] (app1).address: required key is missing" in p for p in found)
    assert any("hosts[2] (app1).adress: unknown key" in p for p in found)


def test_secrets_never_live_in_inventory(tmp_path):
    found = problems(
        tmp_path, GOOD.replace('[[hosts]]\nname = "app1"', '[redis]\npassword = "hunter2"\n[[hosts]]\nname = "app1"', 1)
    )
    assert any("redis.password: a secret in the inventory" in p for p in found)
    assert not any("hunter2" in p for p in found)


def test_an_unknown_table_or_array_named_like_a_secret_is_an_unknown_key(tmp_path):
    # Not a secret's value (_secret_keys looks inside it), so the model's error is reported.
    found = problems(tmp_path, GOOD + "[api_key_settings]\nregion = 'eu'\n")
    assert any("api_key_settings: unknown key" in p for p in found)
    found = problems(tmp_path, "tokens = [1, 2]\n" + GOOD)
    assert any("tokens: unknown key" in p for p in found)


def test_root_cannot_be_a_data_mount(tmp_path):
    text = GOOD.replace('roles = ["app"]\n', 'roles = ["app"]\n[[hosts.mounts]]\npath = "/"\n')
    assert any("/ cannot be a data mount" in p for p in problems(tmp_path, text))


def test_discovery_order(tmp_path, monkeypatch):
    explicit, from_env = write(tmp_path, GOOD), tmp_path / "env.toml"
    from_env.write_text(GOOD)
    monkeypatch.setenv("IGOPS_CONFIG", str(from_env))
    assert inventory.find_config(str(explicit)) == explicit
    assert inventory.find_config(None) == from_env
    monkeypatch.delenv("IGOPS_CONFIG")
    monkeypatch.setattr(inventory, "DEFAULT_CONFIG_PATH", explicit)
    assert inventory.find_config(None) == explicit


def test_world_readable_secrets_file_refused(tmp_path, monkeypatch):
    from igops import secrets

    monkeypatch.setattr(secrets, "_registered", set())  # restored after the test
    monkeypatch.delenv("IGOPS_PINGDOM_TOKEN", raising=False)
    path = tmp_path / "secrets.toml"
    path.write_text('pingdom_token = "tok-123456"\n')
    path.chmod(0o644)
    with pytest.raises(SecretsError) as caught:
        Secrets(str(path)).get("pingdom_token")
    assert "chmod 600" in caught.value.hint
    path.chmod(0o600)
    assert Secrets(str(path)).get("pingdom_token") == "tok-123456"
    assert redact("token is tok-123456") == "token is ***"


def test_environment_overrides_secrets_file(tmp_path, monkeypatch):
    from igops import secrets

    monkeypatch.setattr(secrets, "_registered", set())  # restored after the test
    path = tmp_path / "secrets.toml"
    path.write_text('pagerduty_routing_key = "from-file-key"\n')
    path.chmod(0o600)
    monkeypatch.setenv("IGOPS_PAGERDUTY_ROUTING_KEY", "from-env-key")
    assert Secrets(str(path)).get("pagerduty_routing_key") == "from-env-key"


def test_unknown_role_in_selection(tmp_path):
    fleet = inventory.load_file(write(tmp_path, GOOD))
    with pytest.raises(UsageError):
        fleet.select(roles=["webserver"])


def test_a_relative_secrets_file_is_the_inventory_s_neighbour(tmp_path, monkeypatch):
    from igops import secrets

    monkeypatch.setattr(secrets, "_registered", set())
    monkeypatch.delenv("IGOPS_PINGDOM_TOKEN", raising=False)
    (tmp_path / "conf").mkdir()
    secrets_file = tmp_path / "conf" / "secrets.toml"
    secrets_file.write_text('pingdom_token = "neighbour-token"\n')
    secrets_file.chmod(0o600)
    path = tmp_path / "conf" / "igops.toml"
    path.write_text(GOOD + '[secrets]\nfile = "secrets.toml"\n')
    monkeypatch.chdir(tmp_path)  # not the inventory's directory
    fleet = inventory.load_file(Path("conf/igops.toml"))
    assert fleet.model.secrets.file == str(secrets_file)
    assert Secrets(fleet.model.secrets.file).get("pingdom_token") == "neighbour-token"


@pytest.mark.parametrize(
    "addition,where,fix",
    [
        ("[lb]\nport = 0\n", "lb.port: port 0 is out of range", "use a TCP port from 1 to 65535"),
        ("[redis]\nport = 70000\n", "redis.port: port 70000 is out of range", "from 1 to 65535"),
        ("[ssh]\nport = -1\n", "ssh.port: port -1", "from 1 to 65535"),
        ('[fleet]\nstate_dir = "state"\n', "fleet.state_dir: state_dir 'state' is relative", "absolute path"),
        (
            "[check]\ndisk_warning_percent = 95.0\n",
            "check: disk_warning_percent (95) is above disk_critical_percent (90)",
            "set disk_warning_percent at or below disk_critical_percent",
        ),
        (
            "[check]\nsnapshot_warning_hours = 60.0\nsnapshot_critical_hours = 50.0\n",
            "snapshot_warning_hours (60)",
            "at or below snapshot_critical_hours",
        ),
        (
            '[snapshot.pre_freeze]\ndatabase = "psql -c CHECKPOINT"\n',
            "snapshot.pre_freeze: unknown role 'database'",
            "key each command by one of: lb, app, postgres",
        ),
        (
            '[shards]\nschema_prefix = "insta\'; DROP SCHEMA x; --"\n',
            "shards.schema_prefix: schema_prefix",
            "lowercase letters, digits and _",
        ),
        ("[shards]\nschema_prefix = 'in\"sta'\n", "not a plain SQL identifier", "lowercase letters"),
    ],
)
def test_values_that_cannot_work_are_refused_with_a_fix(tmp_path, addition, where, fix):
    [problem] = problems(tmp_path, GOOD.replace('[[hosts]]\nname = "db1"', addition + '[[hosts]]\nname = "db1"', 1))
    assert where in problem and fix in problem


def test_the_bounds_of_valid_values_load(tmp_path):
    fleet = inventory.load_file(
        write(
            tmp_path,
            GOOD.replace(
                '[[hosts]]\nname = "db1"',
                (
                    '[fleet]\nstate_dir = "~/igops-state"\n[lb]\nport = 65535\n[app]\nport = 1\n'
                    '[check]\ndisk_warning_percent = 90.0\n[shards]\nschema_prefix = "shard_"\n'
                    '[snapshot.pre_freeze]\npostgres = "true"\n[[hosts]]\nname = "db1"'
                ),
                1,
            ),
        )
    )
    assert fleet.model.lb.port == 65535 and fleet.model.shards.schema_prefix == "shard_"


def generator():
    """config/generate_fleet.py, which is a script rather than a module of a package."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("generate_fleet", ROOT / "config" / "generate_fleet.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it runs
    spec.loader.exec_module(module)
    return module


def test_the_1000_host_example_is_the_generator_s_output():
    assert (ROOT / "config" / "example-1000.toml").read_text() == generator().render(1000), (
        "regenerate it: python config/generate_fleet.py --hosts 1000 > config/example-1000.toml"
    )


def test_the_1000_host_example_validates_and_is_production_shaped():
    fleet = inventory.load_file(ROOT / "config" / "example-1000.toml")
    assert len(fleet.hosts) == 1000
    assert len(fleet.with_role("lb")) == 8 and len(fleet.with_role("app")) == 734
    clusters = fleet.model.postgres.clusters
    assert len(clusters) == 64 and all(len(cluster.standbys) == 2 for cluster in clusters.values())
    assert len(fleet.with_role("postgres")) == 192 and all(host.mounts for host in fleet.with_role("postgres"))
    assert fleet.model.redis.master == "redis1" and len(fleet.model.redis.replicas) == 5
    assert len(fleet.with_role("memcached")) == 48 and len(fleet.with_role("pgbouncer")) == 12
    assert len({str(host.address) for host in fleet.hosts}) == 1000
    assert len({host.instance_id for host in fleet.hosts}) == 1000
    volumes = [volume for host in fleet.hosts for mount in host.mounts for volume in mount.volumes]
    assert len(volumes) == len(set(volumes)) == 192 * 5


@pytest.mark.parametrize("hosts", [12, 63, 250, 2000])
def test_generated_fleets_of_other_sizes_validate(tmp_path, hosts):
    fleet = inventory.load_file(write(tmp_path, generator().render(hosts)))
    assert len(fleet.hosts) == hosts and fleet.with_role("app") and fleet.model.postgres.clusters


def test_the_generator_refuses_a_fleet_too_small_for_an_app_server():
    with pytest.raises(ValueError, match="no app server"):
        generator().render(8)

"""The pure parts of igops.coordination: holder records, key names, the [coordination]
settings. The etcd backend itself is tested against the lab's etcd
(tests/integration/test_coordination.py)."""

import json
from pathlib import Path

import pytest

from igops import coordination, etcd_gateway, inventory, process_identity, safety
from igops.errors import ConfigError, SecretsError

GOOD = """
[fleet]
name = "prod"
[[hosts]]
name = "app1"
address = "10.0.0.3"
roles = ["app"]
"""


@pytest.fixture
def registered_secrets(monkeypatch):
    from igops import secrets

    monkeypatch.setattr(secrets, "_registered", set())
    return secrets


def load(tmp_path: Path, section: str):
    path = tmp_path / "igops.toml"
    path.write_text(GOOD + section)
    return inventory.load_file(path)


def problems(tmp_path: Path, section: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, section)
    return [str(problem) for problem in caught.value.problems]


def test_without_a_coordination_section_the_backend_is_local(tmp_path):
    backend = coordination.for_fleet(load(tmp_path, ""))
    assert isinstance(backend, coordination.LocalCoordinator)


def test_etcd_settings_and_their_defaults(tmp_path):
    fleet = load(tmp_path, '[coordination]\netcd = ["http://10.1.0.1:2379/", "http://10.1.0.2:2379"]\n')
    settings = coordination.settings_for(fleet)
    assert settings.endpoints == ("http://10.1.0.1:2379", "http://10.1.0.2:2379")
    assert settings.lease_ttl == 10 and settings.prefix == "/igops/prod/"
    assert settings.user is None and settings.password is None
    assert isinstance(coordination.for_fleet(fleet), coordination.EtcdCoordinator)


def test_tls_files_are_resolved_next_to_the_inventory(tmp_path):
    fleet = load(
        tmp_path,
        '[coordination]\netcd = ["https://etcd1:2379"]\nca_file = "tls/ca.pem"\n'
        'cert_file = "/etc/igops/client.pem"\nkey_file = "/etc/igops/client-key.pem"\n'
        'prefix = "/fleets/prod/"\nlease_ttl = 15\n',
    )
    settings = coordination.settings_for(fleet)
    assert settings.ca_file == str(tmp_path / "tls" / "ca.pem")
    assert (settings.cert_file, settings.key_file) == ("/etc/igops/client.pem", "/etc/igops/client-key.pem")
    assert settings.prefix == "/fleets/prod/" and settings.lease_ttl == 15


@pytest.mark.parametrize(
    "section, expected",
    [
        ("etcd = []", "at least 1"),
        ('etcd = ["etcd1:2379"]', "is not an etcd client URL"),
        ('etcd = ["http://etcd1:2379/v3"]', "is not an etcd client URL"),
        ('etcd = ["https://etcd1:2379"]\ncert_file = "/c.pem"', "cert_file and key_file go together"),
        ('etcd = ["http://etcd1:2379"]\nca_file = "/ca.pem"', "is plain http"),
        ('etcd = ["http://10.1.0.1:2379"]\nuser = "igops"', "a secret would travel over it"),
        ('etcd = ["https://etcd1:2379"]\nlease_ttl = 1', "must be at least 2"),
        ('etcd = ["https://etcd1:2379"]\nprefix = "igops"', "must start and end with /"),
        ('etcd = ["https://etcd1:2379"]\npassword = "hunter22"', "a secret in the inventory"),
    ],
)
def test_bad_coordination_settings_are_refused(tmp_path, section, expected):
    found = problems(tmp_path, f"[coordination]\n{section}\n")
    assert any(expected in problem and "coordination" in problem for problem in found), found


def test_a_user_needs_the_etcd_password_secret(tmp_path, monkeypatch, registered_secrets):
    fleet = load(tmp_path, '[coordination]\netcd = ["https://etcd1:2379"]\nuser = "igops"\n')
    monkeypatch.delenv("IGOPS_ETCD_PASSWORD", raising=False)
    with pytest.raises(SecretsError) as caught:
        coordination.settings_for(fleet)
    assert "etcd_password is not set" in caught.value.message and "IGOPS_ETCD_PASSWORD" in caught.value.hint
    monkeypatch.setenv("IGOPS_ETCD_PASSWORD", "etcd-pass-1234")
    settings = coordination.settings_for(fleet)
    assert settings.user == "igops" and settings.password == "etcd-pass-1234"
    assert registered_secrets.redact("pw etcd-pass-1234") == "pw ***"


def test_a_user_over_plain_http_is_fine_on_loopback(tmp_path):
    fleet = load(tmp_path, '[coordination]\netcd = ["http://127.0.0.1:2379"]\nuser = "igops"\n')
    assert fleet.model.coordination.user == "igops"


def test_lock_keys_conflict_exactly_as_the_local_lock_files_do(tmp_path):
    assert coordination.lock_key("/igops/prod/", "pg", "main") == "/igops/prod/locks/pg--main"
    # Same (operation, target) -> same key; the local file name is the same name.
    key = coordination.lock_key("/p/", "munin-install", "app,lb")
    with safety.lock(tmp_path, "munin-install", "app,lb", "igops munin install") as path:
        assert path.name == key.rsplit("/", 1)[1] + ".lock"
    assert coordination.lock_key("/p/", "pg", "main") != coordination.lock_key("/p/", "pg", "pg2")
    assert coordination.lock_key("/p/", "pg", "main") != coordination.lock_key("/p/", "redis", "main")


def test_audit_keys_sort_by_time_and_never_collide():
    records = [
        {"time": "2026-12-03T04:16:08.123+00:00", "host": "bastion 1", "pid": 7},
        {"time": "2026-12-03T04:16:08.123+00:00", "host": "bastion 1", "pid": 7},
        {"time": "2026-12-03T05:00:00.000+00:00", "host": "a", "pid": 1},
    ]
    keys = [coordination.audit_key("/igops/prod/", record) for record in records]
    assert keys[0].startswith("/igops/prod/audit/20261203T041608.123000Z-bastion_1-7-")
    assert len(set(keys)) == 3 and keys[2] > keys[0]


def test_prefix_range_end_covers_exactly_the_prefix():
    end = etcd_gateway.prefix_end("/igops/prod/audit/")
    assert end == "/igops/prod/audit0"
    assert "/igops/prod/audit/" <= "/igops/prod/audit/zzz" < end
    assert not ("/igops/prod/audit/" <= "/igops/prod/audits" < end)


def test_the_holder_record_names_the_operator_and_hides_secrets(monkeypatch, registered_secrets):
    registered_secrets.register("tok-123456")
    monkeypatch.setenv(safety.OPERATOR_HOST_ENV, "bastion-2")
    monkeypatch.setenv("USER", "alice")
    holder = coordination.current_holder("pg", "main", "igops pg switchover main --x tok-123456", "INC-42 tok-123456")
    assert (holder.user, holder.host, holder.operation, holder.target) == ("alice", "bastion-2", "pg", "main")
    assert "tok-123456" not in holder.to_json()
    again = coordination.Holder.from_json(holder.to_json())
    assert again == holder
    text = again.describe()
    assert text.startswith("pg by alice@bastion-2 pid ") and "reason: INC-42 ***" in text
    assert "since " + holder.since in text and text.endswith("igops pg switchover main --x ***")


def test_a_holder_record_of_an_older_igops_reads_without_its_process_identity(monkeypatch):
    """Records written before holders carried their process's identity still read, and read
    as they did: the refusal that names such a holder says what it said."""
    monkeypatch.setenv(safety.OPERATOR_HOST_ENV, "bastion-2")
    older = {
        "operation": "pg-switchover",
        "target": "main",
        "user": "alice",
        "host": "bastion-2",
        "pid": 4242,
        "command": "igops pg switchover main",
        "since": "2026-12-03T04:16:08.123+00:00",
        "reason": None,
        "operation_id": "20261203-041608-a3f9",
    }
    holder = coordination.Holder.from_json(json.dumps(older))
    assert holder.identity() == {"boot_id": None, "pid_namespace": None, "process_start": None}
    assert holder.describe() == (
        "pg-switchover 20261203-041608-a3f9 by alice@bastion-2 pid 4242 since 2026-12-03T04:16:08.123+00:00"
        ": igops pg switchover main"
    )
    current = coordination.current_holder("pg-switchover", "main", "igops pg switchover main", None, "op-1")
    assert current.identity() == process_identity.own() and current.process_start is not None


def test_a_holder_record_that_is_not_one_reads_as_none():
    assert coordination.Holder.from_json("not json") is None
    assert coordination.Holder.from_json("[1, 2]") is None


def test_audit_records_carry_the_operator_host_and_reason(monkeypatch, tmp_path):
    monkeypatch.setenv(safety.OPERATOR_HOST_ENV, "cron-box")
    coordination.LocalCoordinator(tmp_path).audit(
        command="igops x", targets=["t"], result="ok", exit_code=0, duration_ms=1.0, reason="INC-7"
    )
    record = json.loads((tmp_path / "audit.log").read_text())
    assert record["host"] == "cron-box" and record["targets"] == ["t"] and record["reason"] == "INC-7"


def test_a_lost_lease_stops_the_caller_at_its_next_check():
    held = coordination.HeldLease("pg", "main")
    held.check()
    held._mark_lost("etcd expired lease 7")
    with pytest.raises(coordination.LeaseLost, match="pg main was lost .etcd expired lease 7."):
        held.check()

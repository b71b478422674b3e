"""Which Redis member the lab starts as master (the one its config files name, as a rebooted
host would), and why a role igops wrote into a file restarts nothing."""

import pytest

from igops.lab import proc, services
from igops.lab.state import REDIS_MASTER, REDIS_REPLICA, Paths, host


def write_config(paths: Paths, name: str, master: str | None) -> None:
    config = paths.host_dir(name) / "redis" / "redis.conf"
    config.parent.mkdir(parents=True, exist_ok=True)
    role = f"replicaof {host(master).address} 6379\nreplica-read-only yes\n" if master else ""
    config.write_text(f"port 6379\nappendonly yes\n{role}")


def test_a_fresh_lab_starts_its_first_master(tmp_path):
    assert services.configured_redis_master(Paths(tmp_path)) == REDIS_MASTER


def test_the_master_a_switchover_wrote_into_the_config_files_stays_master(tmp_path):
    paths = Paths(tmp_path)
    write_config(paths, REDIS_REPLICA, None)
    write_config(paths, REDIS_MASTER, REDIS_REPLICA)
    assert services.configured_redis_master(paths) == REDIS_REPLICA


@pytest.mark.parametrize("masters", [(REDIS_MASTER, REDIS_REPLICA), ()])
def test_config_files_naming_two_masters_or_none_are_refused(tmp_path, masters):
    paths = Paths(tmp_path)
    for name, other in ((REDIS_MASTER, REDIS_REPLICA), (REDIS_REPLICA, REDIS_MASTER)):
        write_config(paths, name, None if name in masters else other)
    with pytest.raises(proc.LabError, match="master"):
        services.configured_redis_master(paths)


def test_a_role_written_by_a_switchover_does_not_restart_redis_but_other_settings_do(tmp_path):
    from igops.redisops import with_replicaof

    config = tmp_path / "redis.conf"
    daemon = proc.Daemon(
        "redis",
        ("/usr/bin/redis-server", str(config)),
        tmp_path / "redis.pid",
        tmp_path / "redis.log",
        config_files=(config,),
        without_live_settings=lambda text: with_replicaof(text, None),
    )
    config.write_text("port 6379\nmaxmemory 256mb\n")
    as_started = daemon.fingerprint()
    config.write_text(with_replicaof(config.read_text(), ("127.0.10.32", 6379)))
    assert daemon.fingerprint() == as_started
    config.write_text(config.read_text().replace("256mb", "512mb"))
    assert daemon.fingerprint() != as_started

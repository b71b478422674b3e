"""The lab's inventory: the same TOML model production uses, pointing at the lab.

Regenerated on every `lab up` from what is actually running (instance and volume ids from
moto, loop devices, the current Postgres primaries and Redis master), then validated with
igops.inventory, so every igops command works against the lab with `-c <state>/igops.toml`.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from igops import inventory
from igops.lab import files, s3tls, services
from igops.lab.aws import ENDPOINT, AwsState
from igops.lab.postgres import BIN_DIR
from igops.lab.state import (
    APP_PORT,
    AWS_REGION,
    CLUSTERS,
    DIRECTORY_CLUSTER,
    HOSTS,
    LB_PORT,
    LOGICAL_SHARDS,
    MEMCACHED_PORT,
    MUNIN_PORT,
    PAGERDUTY,
    PGBOUNCER_PORT,
    PINGDOM,
    POSTGRES_PORT,
    REDIS_PORT,
    S3_TLS,
    SSH_PORT,
    WAL_BUCKET,
    Paths,
    etcd_endpoints,
)
from igops.lab.storage import VolumeState

if TYPE_CHECKING:
    from igops.coordination import EtcdCoordinator
    from igops.inventory import Fleet

# The lease TTL of the lab's operations: the default a real fleet starts from.
LEASE_TTL_S = 10


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(item) for item in value) + "]"
    return json.dumps(str(value))


def _table(name: str, values: dict[str, Any], array: bool = False) -> str:
    header = f"[[{name}]]" if array else f"[{name}]"
    return header + "\n" + "".join(f"{key} = {_value(value)}\n" for key, value in values.items() if value is not None)


def _templated(path: Path, host_name: str) -> str:
    """A per-host path as an inventory template: the host's name becomes {host}."""
    return str(path).replace(f"/hosts/{host_name}/", "/hosts/{host}/")


def render(
    paths: Paths, volumes: list[VolumeState], aws: AwsState, primaries: dict[str, str], redis_master: str
) -> str:
    probe = "app1"  # any host: its paths become the {host} templates
    sections = [
        "# The lab fleet, written by `igops lab up` on every run: edit the lab, not this file.\n",
        _table("fleet", {"name": "lab", "state_dir": paths.fleet_state}),
        _table(
            "ssh",
            {
                "user": "root",
                "port": SSH_PORT,
                "known_hosts": paths.ssh / "known_hosts",
                "identity_file": paths.ssh / "id_ed25519",
                "connect_timeout": 5,
                "command_timeout": 120,
                "parallel": 32,
            },
        ),
        _table("aws", {"region": AWS_REGION, "endpoint_url": ENDPOINT, "volume_images": paths.store_mount}),
        # A nightly group of each set of data (`igops snapshot cron` takes it; `lab up` too, when
        # missing), a week of dailies, a month of weeklies, a quarter of monthlies, never fewer than 2.
        _table(
            "snapshot",
            {
                "freeze_deadline": 10,
                "restore_root": paths.root / "restore",
                "fstab": _templated(paths.fstab("db1"), "db1"),
                "schedule": "every 1d at 00:00",
                "keep_daily": 7,
                "keep_weekly": 4,
                "keep_monthly": 3,
                "minimum_redundancy": 2,
            },
        ),
        _table(
            "snapshot.pre_freeze",
            {
                "postgres": f"runuser -u postgres -- {BIN_DIR}/psql -X -q -h "
                f"{_templated(paths.pg_socket_dir('db1'), 'db1')} -p {POSTGRES_PORT} "
                "-d postgres -c CHECKPOINT"
            },
        ),
        _table(
            "monitoring",
            {
                "pingdom_url": f"http://{PINGDOM[0]}:{PINGDOM[1]}/api/3.1",
                "pagerduty_url": f"http://{PAGERDUTY[0]}:{PAGERDUTY[1]}",
            },
        ),
        _table("secrets", {"file": paths.secrets}),
        # Leases, journal and audit trail of every operation on the lab's etcd, as a team's would be.
        _table("coordination", {"etcd": etcd_endpoints(), "lease_ttl": LEASE_TTL_S}),
        _table(
            "lb",
            {
                "port": LB_PORT,
                "health_path": "/health",
                "upstream_file": paths.upstream_file(),
                "test_command": services.nginx_test_command(paths),
                "reload_command": services.nginx_reload_command(paths),
                "access_log": paths.nginx_dir() / "access.log",
            },
        ),
        _table(
            "app",
            {
                "port": APP_PORT,
                "health_path": "/health",
                "root": _templated(paths.app_root(probe), probe),
                "reload_command": "pkill -HUP --pidfile "
                + _templated(paths.app_root(probe) / "shared" / "gunicorn.pid", probe),
                "keep_releases": 5,
            },
        ),
        _table(
            "postgres",
            {
                "port": POSTGRES_PORT,
                "database": "instagram",
                "user": "postgres",
                "os_user": "postgres",
                "bin_dir": BIN_DIR,
                "data_directory": _templated(paths.pgdata("db1"), "db1"),
                "repmgr_config": _templated(paths.repmgr_conf("db1"), "db1"),
                "socket_dir": _templated(paths.pg_socket_dir("db1"), "db1"),
                "max_lag_bytes": 1 << 20,
            },
        ),
        _table(
            "pgbouncer",
            {"port": PGBOUNCER_PORT, "admin_user": services.PGBOUNCER_ADMIN, "databases_file": paths.databases_file()},
        ),
        _table(
            "redis",
            {
                "master": redis_master,
                "replicas": [h.name for h in HOSTS if "redis" in h.roles and h.name != redis_master],
                "port": REDIS_PORT,
                "config_file": _templated(paths.host_dir(redis_master) / "redis" / "redis.conf", redis_master),
            },
        ),
        _table("memcached", {"port": MEMCACHED_PORT}),
        _table(
            "munin",
            {
                "port": MUNIN_PORT,
                "plugin_dir": _templated(paths.munin_dir(probe) / "plugins", probe),
                "plugin_conf_dir": _templated(paths.munin_dir(probe) / "plugin-conf.d", probe),
                "restart_command": _templated(paths.munin_dir(probe) / "restart", probe),
                "plugin_library": _templated(paths.munin_dir(probe) / "igops-plugins", probe),
            },
        ),
        _table(
            "shards",
            {
                "count": LOGICAL_SHARDS,
                "directory_database": "directory",
                "directory_cluster": DIRECTORY_CLUSTER,
                "schema_prefix": "insta",
                "shard_ddl": paths.app_source / "sql" / "shard.sql",
                "directory_ddl": paths.app_source / "sql" / "directory.sql",
            },
        ),
    ]
    # WAL archiving (igops pg archive setup) to moto's bucket, through its TLS front.
    pgbackrest = paths.pgbackrest_dir(probe)
    sections.append(
        _table(
            "archive",
            {
                "stanza": "{cluster}",
                "archive_timeout": 60,
                "process_max": 2,
                # Half a lab WAL volume: an archive outage in a test never fills pg_wal.
                "push_queue_max_bytes": 256 << 20,
                "config_file": _templated(pgbackrest / "pgbackrest.conf", probe),
                "spool_path": _templated(pgbackrest / "spool", probe),
                "log_path": _templated(pgbackrest / "log", probe),
                # Every lab host shares one machine: each keeps its own locks.
                "lock_path": _templated(pgbackrest / "lock", probe),
            },
        )
    )
    sections.append(
        _table(
            "archive.repository",
            {
                "type": "s3",
                "bucket": WAL_BUCKET,
                "endpoint": S3_TLS[0],
                "port": S3_TLS[1],
                "region": AWS_REGION,
                "path": "/pgbackrest",
                "uri_style": "path",
                "ca_file": s3tls.ca_file(paths),
                "verify_tls": True,
            },
        )
    )
    for cluster in CLUSTERS:
        primary = primaries[cluster.name]
        standbys = [name for name in (cluster.primary, cluster.standby) if name != primary]
        sections.append(
            _table(
                f"postgres.clusters.{cluster.name}",
                {"primary": primary, "standbys": standbys, "pgbouncer_database": cluster.name},
            )
        )
    by_host: dict[str, list[VolumeState]] = {}
    for volume in volumes:
        by_host.setdefault(volume.host, []).append(volume)
    for lab_host in HOSTS:
        text = _table(
            "hosts",
            {
                "name": lab_host.name,
                "address": lab_host.address,
                "roles": list(lab_host.roles),
                "instance_id": aws.instances.get(lab_host.name),
            },
            array=True,
        )
        for volume in by_host.get(lab_host.name, []):
            text += _table(
                "hosts.mounts",
                {
                    "path": volume.mount_point,
                    "purpose": volume.purpose,
                    # No volumes list: igops finds each mount's volume from the EC2 attachment at
                    # this device, as it does on hosts whose volumes change (an in-place rebuild).
                    "device": volume.device,
                },
                array=True,
            )
        sections.append(text)
    return "\n".join(sections)


def coordinator(paths: Paths) -> EtcdCoordinator:
    """Where the lab inventory's operations keep their leases: what lab up must lease too."""
    from igops import coordination, etcd_gateway

    return coordination.EtcdCoordinator(
        etcd_gateway.EtcdSettings(
            endpoints=tuple(etcd_endpoints()), prefix=coordination.default_prefix("lab"), lease_ttl=LEASE_TTL_S
        ),
        paths.fleet_state,
    )


def write(paths: Paths, text: str) -> Fleet:
    """Validate with igops' own inventory model, then write; returns the loaded Fleet."""
    fleet = inventory.validate(tomllib.loads(text), paths.inventory)
    files.write_file(paths.inventory, text, mode=0o644)
    return fleet

"""The lab's fixed shape (hosts, addresses, roles) and where each of its files lives.

Other code and people rely on the address plan, so it is data here, not configuration.
Everything the lab creates lives under one state directory (IGOPS_LAB_DIR, default
/var/lib/igops-lab), each host's files under `<state>/hosts/<host>/`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from igops.errors import UsageError

STATE_ENV = "IGOPS_LAB_DIR"
DEFAULT_STATE_DIR = Path("/var/lib/igops-lab")
# Every process the lab starts carries this variable (value: the state dir), so `down` can find
# the lab's processes even when a killed run never wrote their pid files.
MARKER_ENV = "IGOPS_LAB_STATE"
# Carried by the one-off commands a build runs (initdb, pip, pg_basebackup): any still alive
# when the next run starts belong to a run that was killed, and are stopped.
BUILD_MARKER_ENV = "IGOPS_LAB_BUILD"

MOTO = ("127.0.10.5", 5000)
PAGERDUTY = ("127.0.10.6", 8080)
PINGDOM = ("127.0.10.7", 8080)
# moto behind TLS (nginx): pgBackRest speaks S3 only over https, and moto itself stays plain
# http for everything else. The certificate names this address, which is the endpoint.
S3_TLS = ("127.0.10.8", 443)
SSH_PORT = 22
LB_PORT = 80
APP_PORT = 8000
PGBOUNCER_PORT = 6432
POSTGRES_PORT = 5432
REDIS_PORT = 6379
MEMCACHED_PORT = 11211
MUNIN_PORT = 4949
# The lab's three-member etcd cluster (igops' fleet-wide leases and audit trail), on addresses
# of their own: no fleet host runs it.
ETCD_MEMBERS = (("etcd1", "127.0.10.51"), ("etcd2", "127.0.10.52"), ("etcd3", "127.0.10.53"))
ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380

PHOTO_BUCKET = "igops-photos"
WAL_BUCKET = "igops-wal"
AWS_REGION = "us-east-1"
AVAILABILITY_ZONE = "us-east-1a"
# moto accepts any credentials; fixed ones let every lab process and person share them.
AWS_ACCESS_KEY_ID = "AKIAIGOPSLAB00000000"
AWS_SECRET_ACCESS_KEY = "igops-lab-secret-access-key-not-a-real-one"

IMAGE_SIZE = 512 << 20  # mkfs.xfs refuses filesystems under 300 MB
# A bigger size for every lab volume (e.g. 3G for bench/restore.py's gigabytes of data): lab up
# makes new volumes that big and grows smaller ones (XFS grows online, never shrinks).
VOLUME_SIZE_ENV = "IGOPS_LAB_VOLUME_SIZE"
STORE_SIZE = 32 << 30  # sparse; holds every volume image and their reflink copies

LOGICAL_SHARDS = 16


@dataclass(frozen=True)
class LabHost:
    name: str
    address: str
    roles: tuple[str, ...]
    volumes: tuple[str, ...] = ()  # purposes of its XFS volumes, e.g. ("data", "wal")


@dataclass(frozen=True)
class PgCluster:
    name: str
    primary: str
    standby: str
    databases: tuple[str, ...]


_DB_VOLUMES = ("data", "wal")
_REDIS_VOLUMES = ("data",)

HOSTS: tuple[LabHost, ...] = (
    LabHost("lb1", "127.0.10.10", ("lb", "munin")),
    LabHost("app1", "127.0.10.11", ("app", "munin")),
    LabHost("app2", "127.0.10.12", ("app", "munin")),
    LabHost("app3", "127.0.10.13", ("app", "munin")),
    LabHost("pgb1", "127.0.10.20", ("pgbouncer", "munin")),
    LabHost("db1", "127.0.10.21", ("postgres", "munin"), _DB_VOLUMES),
    LabHost("db2", "127.0.10.22", ("postgres", "munin"), _DB_VOLUMES),
    LabHost("db3", "127.0.10.23", ("postgres", "munin"), _DB_VOLUMES),
    LabHost("db4", "127.0.10.24", ("postgres", "munin"), _DB_VOLUMES),
    LabHost("redis1", "127.0.10.31", ("redis", "munin"), _REDIS_VOLUMES),
    LabHost("redis2", "127.0.10.32", ("redis", "munin"), _REDIS_VOLUMES),
    LabHost("cache1", "127.0.10.41", ("memcached", "munin")),
)
HOSTS_BY_NAME = {host.name: host for host in HOSTS}

CLUSTERS: tuple[PgCluster, ...] = (
    PgCluster("main", "db1", "db2", ("instagram", "directory")),
    PgCluster("pg2", "db3", "db4", ("instagram",)),
)
DIRECTORY_CLUSTER = "main"
REDIS_MASTER, REDIS_REPLICA = "redis1", "redis2"


def with_role(role: str) -> list[LabHost]:
    return [host for host in HOSTS if role in host.roles]


def host(name: str) -> LabHost:
    return HOSTS_BY_NAME[name]


def etcd_endpoints() -> list[str]:
    """The client URLs of the lab's etcd, for an inventory's [coordination] etcd."""
    return [f"http://{address}:{ETCD_CLIENT_PORT}" for _, address in ETCD_MEMBERS]


def state_dir() -> Path:
    return Path(os.environ.get(STATE_ENV) or DEFAULT_STATE_DIR).expanduser().absolute()


@dataclass(frozen=True)
class Paths:
    root: Path
    app_source: Path = field(default_factory=lambda: Path(__file__).resolve().parents[2] / "app")

    @property
    def inventory(self) -> Path:
        return self.root / "igops.toml"

    @property
    def secrets(self) -> Path:
        return self.root / "secrets.toml"

    @property
    def passwords(self) -> Path:
        """The lab's internal passwords (repmgr, app); secrets.toml holds the fleet's."""
        return self.root / "lab" / "passwords.toml"

    @property
    def fleet_state(self) -> Path:
        return self.root / "igops"

    @property
    def ssh(self) -> Path:
        return self.root / "ssh"

    @property
    def postgres_ssh(self) -> Path:
        """repmgr runs ssh as the postgres user, who cannot enter root's ssh directory: its
        key and a copy of known_hosts live here."""
        return self.root / "postgres-ssh"

    @property
    def storage(self) -> Path:
        return self.root / "storage"

    @property
    def store_image(self) -> Path:
        return self.storage / "store.img"

    @property
    def store_mount(self) -> Path:
        return self.storage / "store"

    def volume_image(self, host_name: str, purpose: str) -> Path:
        return self.store_mount / "volumes" / f"{host_name}-{purpose}.img"

    def host_dir(self, host_name: str) -> Path:
        return self.root / "hosts" / host_name

    def fstab(self, host_name: str) -> Path:
        """The host's /etc/fstab: what it would mount at boot (`lab up` writes its volumes' entries)."""
        return self.host_dir(host_name) / "etc" / "fstab"

    def mount_point(self, host_name: str, purpose: str) -> Path:
        return self.host_dir(host_name) / purpose

    def pgdata(self, host_name: str) -> Path:
        return self.mount_point(host_name, "data") / "pgdata"

    def pg_wal(self, host_name: str) -> Path:
        return self.mount_point(host_name, "wal") / "pg_wal"

    def pgconf(self, host_name: str) -> Path:
        return self.host_dir(host_name) / "pgconf"

    def pg_socket_dir(self, host_name: str) -> Path:
        return self.host_dir(host_name) / "run"

    def repmgr_conf(self, host_name: str) -> Path:
        return self.host_dir(host_name) / "repmgr.conf"

    def pgpass(self, host_name: str) -> Path:
        return self.host_dir(host_name) / "pgpass"

    def app_root(self, host_name: str) -> Path:
        return self.host_dir(host_name) / "app"

    def munin_dir(self, host_name: str) -> Path:
        return self.host_dir(host_name) / "munin"

    def nginx_dir(self) -> Path:
        return self.host_dir("lb1") / "nginx"

    def upstream_file(self) -> Path:
        return self.nginx_dir() / "upstream.conf"

    def pgbouncer_dir(self) -> Path:
        return self.host_dir("pgb1") / "pgbouncer"

    def databases_file(self) -> Path:
        return self.pgbouncer_dir() / "databases.ini"

    @property
    def services(self) -> Path:
        """moto and the monitoring receivers: the lab's stand-ins for outside services."""
        return self.root / "services"

    @property
    def s3_tls(self) -> Path:
        """The TLS front of moto: its CA, certificate, nginx configuration and logs."""
        return self.services / "s3-tls"

    def pgbackrest_dir(self, host_name: str) -> Path:
        return self.host_dir(host_name) / "pgbackrest"

    def etcd_dir(self, member: str) -> Path:
        return self.root / "etcd" / member

    @property
    def venvs(self) -> Path:
        return self.root / "venvs"

    def marker(self, name: str) -> Path:
        """Written when a component finished initialising; absent means redo it from scratch."""
        return self.root / "lab" / "done" / name


def paths() -> Paths:
    return Paths(state_dir())


# The sshd that serves every lab host's address.
SSHD_NAME = "lab"


def lab_endpoints() -> list[tuple[str, int, str]]:
    """Every (address, port, what listens there) of the lab: what `up` checks is free first."""
    ports = {
        "lb": (LB_PORT, "nginx"),
        "app": (APP_PORT, "gunicorn"),
        "pgbouncer": (PGBOUNCER_PORT, "pgbouncer"),
        "postgres": (POSTGRES_PORT, "postgres"),
        "redis": (REDIS_PORT, "redis"),
        "memcached": (MEMCACHED_PORT, "memcached"),
        "munin": (MUNIN_PORT, "munin-node"),
    }
    found = [
        (MOTO[0], MOTO[1], "moto"),
        (S3_TLS[0], S3_TLS[1], "moto TLS front"),
        (PAGERDUTY[0], PAGERDUTY[1], "PagerDuty receiver"),
        (PINGDOM[0], PINGDOM[1], "Pingdom receiver"),
    ]
    for name, address in ETCD_MEMBERS:
        found += [
            (address, ETCD_CLIENT_PORT, f"etcd {name}"),
            (address, ETCD_PEER_PORT, f"etcd {name} (peers)"),
        ]
    for lab_host in HOSTS:
        found.append((lab_host.address, SSH_PORT, f"sshd ({lab_host.name})"))
        found += [(lab_host.address, *ports[role]) for role in lab_host.roles]
    return found


def volume_size(environ: Mapping[str, str]) -> int:
    """The size of each lab volume: IMAGE_SIZE, or IGOPS_LAB_VOLUME_SIZE when bigger (bytes, or
    with a K, M, G suffix)."""
    text = environ.get(VOLUME_SIZE_ENV, "").strip()
    if not text:
        return IMAGE_SIZE
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    number, unit = (text[:-1], units[text[-1].upper()]) if text[-1].upper() in units else (text, 1)
    try:
        size = int(float(number) * unit)
    except ValueError:
        raise UsageError(
            f"{VOLUME_SIZE_ENV}={text!r} is not a size", "use bytes or a K, M or G suffix, e.g. 3G"
        ) from None
    return max(size, IMAGE_SIZE)

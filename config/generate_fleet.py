"""A production-shaped inventory of N hosts, in the shape of config/example.toml, as TOML on stdout.

    python config/generate_fleet.py --hosts 1000 > config/example-1000.toml

The proportions are those of a fleet of a thousand: per 1,000 hosts, 8 nginx load balancers,
12 PgBouncer hosts, 64 Postgres clusters of a primary and two streaming standbys, a Redis master
with 5 replicas and 48 memcached servers; every other host is a Django app server (734 of 1,000).
The output depends on N alone, so a committed file can be compared with a fresh run
(tests/unit/test_inventory.py does).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

DEFAULT_HOSTS = 1000
STANDBYS = 2
SHARDS = 4096

HEADER = """\
{summary}
#
# Generated: python config/generate_fleet.py --hosts {total} > {path}
# (edit the generator, not this file; tests/unit/test_inventory.py keeps the two equal)

[fleet]
name = "photos-prod"
state_dir = "/var/lib/igops"

[ssh]
user = "deploy"
port = 22
known_hosts = "/etc/igops/known_hosts"
identity_file = "/etc/igops/id_ed25519"
connect_timeout = 5
command_timeout = 120
parallel = 100

[aws]
region = "us-east-1"

[monitoring]
pingdom_url = "https://api.pingdom.com/api/3.1"
pagerduty_url = "https://events.pagerduty.com"

[secrets]
file = "/etc/igops/secrets.toml"

[lb]
port = 80
health_path = "/health"
upstream_file = "/etc/nginx/conf.d/photos-upstream.conf"
reload_command = "nginx -s reload"

[app]
port = 8000
health_path = "/health"
root = "/srv/photos"
reload_command = "systemctl reload gunicorn"
keep_releases = 5

[postgres]
port = 5432
database = "instagram"
user = "igops"
os_user = "postgres"
bin_dir = "/usr/lib/postgresql/15/bin"
data_directory = "/var/lib/postgresql/15/main"
repmgr_config = "/etc/repmgr.conf"
max_lag_bytes = 1048576

[pgbouncer]
port = 6432
admin_user = "pgbouncer"
databases_file = "/etc/pgbouncer/databases.ini"

[redis]
master = "redis1"
replicas = [{replica_names}]
port = 6379

[archive]
stanza = "{{cluster}}"
archive_timeout = 60
process_max = 2
push_queue_max_bytes = 4294967296
config_file = "/etc/pgbackrest/pgbackrest.conf"
spool_path = "/var/spool/pgbackrest"
log_path = "/var/log/pgbackrest"
lock_path = "/tmp/pgbackrest"

[archive.repository]
type = "s3"
bucket = "photos-prod-wal"
endpoint = "s3.us-east-1.amazonaws.com"
port = 443
region = "us-east-1"
path = "/pgbackrest"
uri_style = "host"
verify_tls = true

[memcached]
port = 11211

[munin]
port = 4949

[shards]
count = {shards}
directory_database = "directory"
schema_prefix = "insta"
"""


@dataclass(frozen=True)
class Shape:
    """How many hosts of each kind a fleet of `total` has."""

    total: int
    lb: int
    pgbouncer: int
    clusters: int
    replicas: int  # Redis replicas, besides the master
    memcached: int

    @property
    def postgres(self) -> int:
        return self.clusters * (1 + STANDBYS)

    @property
    def app(self) -> int:
        return self.total - self.lb - self.pgbouncer - self.postgres - (1 + self.replicas) - self.memcached


def shape(total: int) -> Shape:
    """The fleet's shape for `total` hosts: the proportions of 1,000, app servers the rest."""

    def share(per_thousand: int, least: int) -> int:
        return max(least, round(total * per_thousand / 1000))

    fleet = Shape(
        total,
        lb=share(8, 2),
        pgbouncer=share(12, 1),
        clusters=share(64, 1),
        replicas=min(5, share(5, 1)),
        memcached=share(48, 1),
    )
    if fleet.app < 1:
        raise ValueError(f"{total} hosts leave no app server for the other kinds: ask for more")
    return fleet


Mounts = Callable[[int], list[tuple[str, str, str, list[str]]]]


@dataclass
class Host:
    name: str
    address: str
    roles: list[str]
    instance_id: str
    mounts: list[tuple[str, str, str, list[str]]] = field(default_factory=list)  # path, purpose, device, volumes

    def toml(self) -> str:
        roles = ", ".join(f'"{role}"' for role in self.roles)
        lines = [
            "[[hosts]]",
            f'name = "{self.name}"',
            f'address = "{self.address}"',
            f"roles = [{roles}]",
            f'instance_id = "{self.instance_id}"',
        ]
        for path, purpose, device, volumes in self.mounts:
            lines += ["[[hosts.mounts]]", f'path = "{path}"', f'purpose = "{purpose}"', f'device = "{device}"']
            if volumes:
                lines.append("volumes = [" + ", ".join(f'"{volume}"' for volume in volumes) + "]")
        return "\n".join(lines) + "\n"


def hosts(fleet: Shape) -> list[Host]:
    """Every host, grouped by kind as example.toml lists them. Each kind has a /16 of its own
    (10.0 load balancers, 10.1 app servers, ...), 200 hosts to a /24."""
    made: list[Host] = []

    def add(prefix: str, block: int, count: int, roles: list[str], mounts: Mounts | None = None) -> list[Host]:
        group = []
        for number in range(1, count + 1):
            index = len(made)
            host = Host(
                f"{prefix}{number}",
                f"10.{block}.{(number - 1) // 200}.{11 + (number - 1) % 200}",
                [*roles, "munin"],
                f"i-0a1b2c3d{index:09x}",
                mounts(index) if mounts else [],
            )
            made.append(host)
            group.append(host)
        return group

    def database_mounts(index: int) -> list[tuple[str, str, str, list[str]]]:
        # The data directory on a RAID 0 of four EBS volumes, the WAL on a volume of its own.
        return [
            ("/var/lib/postgresql", "data", "/dev/md0", [f"vol-0{index:012x}{member:04x}" for member in range(4)]),
            ("/var/lib/postgresql/wal", "wal", "/dev/nvme5n1", [f"vol-0{index:012x}{4:04x}"]),
        ]

    def redis_mounts(index: int) -> list[tuple[str, str, str, list[str]]]:
        return [("/var/lib/redis", "data", "/dev/nvme1n1", [])]

    add("lb", 0, fleet.lb, ["lb"])
    add("app", 1, fleet.app, ["app"])
    add("pgb", 2, fleet.pgbouncer, ["pgbouncer"])
    add("db", 3, fleet.postgres, ["postgres"], database_mounts)
    add("redis", 4, 1 + fleet.replicas, ["redis"], redis_mounts)
    add("cache", 5, fleet.memcached, ["memcached"])
    return made


def summary(fleet: Shape) -> str:
    """The file's opening comment: what the fleet holds."""
    import textwrap

    text = (
        f"A production-shaped fleet of {plural(fleet.total, 'host')} in the shape of config/example.toml, "
        f"on EC2 with data on EBS volumes: {plural(fleet.lb, 'nginx load balancer')}, "
        f"{plural(fleet.app, 'Django app server')}, {plural(fleet.pgbouncer, 'PgBouncer host')}, "
        f"{plural(fleet.clusters, 'PostgreSQL cluster')} of a primary and "
        f"{plural(STANDBYS, 'streaming standby', 'streaming standbys')} (repmgr), a Redis master with "
        f"{plural(fleet.replicas, 'replica')} and {plural(fleet.memcached, 'memcached server')}. "
        "Secrets are not here: see [secrets]."
    )
    return "\n".join("# " + line for line in textwrap.wrap(text, 96, break_on_hyphens=False))


def plural(count: int, noun: str, many: str | None = None) -> str:
    return f"{count:,} {noun if count == 1 else many or noun + 's'}"


def render(total: int = DEFAULT_HOSTS, path: str | None = None) -> str:
    """The inventory of `total` hosts, as TOML; `path` is where it goes, for its header."""
    fleet = shape(total)
    width = len(str(fleet.clusters))
    parts = [
        HEADER.format(
            summary=summary(fleet),
            total=fleet.total,
            path=path or f"config/example-{total}.toml",
            replica_names=", ".join(f'"redis{number}"' for number in range(2, fleet.replicas + 2)),
            shards=SHARDS,
        )
    ]
    parts += ["\n" + host.toml() for host in hosts(fleet)]
    for cluster in range(fleet.clusters):
        first = cluster * (1 + STANDBYS) + 1
        name = f"c{cluster + 1:0{width}d}"
        standbys = ", ".join(f'"db{first + offset}"' for offset in range(1, STANDBYS + 1))
        parts.append(
            f'\n[postgres.clusters.{name}]\nprimary = "db{first}"\nstandbys = [{standbys}]\n'
            f'pgbouncer_database = "{name}"\n'
        )
    return "".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, default=DEFAULT_HOSTS, help=f"how many hosts (default {DEFAULT_HOSTS})")
    parser.add_argument(
        "--path",
        default=None,
        help="the file the output goes to, named in its header comment (default config/example-N.toml)",
    )
    args = parser.parse_args(argv)
    try:
        text = render(args.hosts, args.path)
    except ValueError as exc:
        parser.error(str(exc))
    sys.stdout.write(text)


if __name__ == "__main__":
    main()

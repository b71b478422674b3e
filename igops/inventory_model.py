"""The inventory's pydantic models: the shape of igops.toml and the rules on each value.

Imported only when an inventory is validated (igops.inventory.validate), so the CLI's start-up
never imports pydantic; `igops.inventory.Fleet.model` is an `Inventory`.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    IPvAnyAddress,
    ValidationInfo,
    field_validator,
    model_validator,
)

from igops.inventory_rules import ROLES, SCHEMA_PREFIX_PATTERN, InvalidValue, count_or_percent


def tcp_port(value: int) -> int:
    if not 1 <= value <= 65535:
        raise InvalidValue(f"port {value} is out of range", "use a TCP port from 1 to 65535")
    return value


Port = Annotated[int, AfterValidator(tcp_port)]


def http_path(value: str) -> str:
    # It goes into a request line as it is: a space or a line break would make another request.
    if not re.fullmatch(r"/[!-~]*", value):
        raise InvalidValue(
            f"health path {value!r} is not an HTTP path", "use a path from / with no spaces, e.g. /health"
        )
    return value


HealthPath = Annotated[str, AfterValidator(http_path)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Fleet(Strict):
    name: str = "fleet"
    state_dir: str | None = None

    @field_validator("state_dir")
    @classmethod
    def absolute_state_dir(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("/", "~")):
            raise InvalidValue(
                f"state_dir {value!r} is relative: locks and the audit log would move with the current directory",
                "use an absolute path (or one under ~)",
            )
        return value


class Ssh(Strict):
    user: str = "root"
    port: Port = 22
    known_hosts: str = "~/.ssh/known_hosts"
    identity_file: str | None = None
    connect_timeout: float = Field(default=5.0, gt=0)
    command_timeout: float = Field(default=120.0, gt=0)
    parallel: int = Field(default=32, ge=1, le=1024)


class Aws(Strict):
    region: str = "us-east-1"
    endpoint_url: str | None = None
    # Lab only: where volume contents live as image files, because moto keeps none.
    volume_images: str | None = None


class SnapshotPolicy(Strict):
    """When a set of data is snapshotted and how many of its groups are kept. Every key is
    optional: a cluster's, the Redis set's or a host's table falls back to [snapshot]'s."""

    # "every 6h", "every 1d at 03:00" (UTC): see igops.schedule. None: not scheduled.
    schedule: str | None = None
    # GFS retention: the newest group of each of the last N hours/days/ISO weeks/months
    # that have one, and the N newest. None everywhere: prune keeps every group.
    keep_last: int | None = Field(default=None, ge=0)
    keep_hourly: int | None = Field(default=None, ge=0)
    keep_daily: int | None = Field(default=None, ge=0)
    keep_weekly: int | None = Field(default=None, ge=0)
    keep_monthly: int | None = Field(default=None, ge=0)
    # Complete groups a set never goes below: prune stops there, delete refuses.
    minimum_redundancy: int | None = Field(default=None, ge=0)

    @field_validator("schedule")
    @classmethod
    def readable_schedule(cls, value: str | None) -> str | None:
        from igops import schedule

        if value is not None:
            try:
                schedule.parse(value)
            except schedule.ScheduleError as exc:
                raise InvalidValue(exc.problem, exc.fix) from None
        return value


class Snapshot(SnapshotPolicy):
    freeze_deadline: float = Field(default=10.0, gt=0, le=120)
    # role -> command run on the host before the freeze (e.g. a Postgres CHECKPOINT)
    pre_freeze: dict[str, str] = Field(default_factory=dict)
    restore_root: str = "/mnt/igops-restore"
    # The hosts' fstab ({host} per host): an in-place rebuild points a mount's entry at the
    # filesystem that replaced it, so that the host mounts it after a reboot too.
    fstab: str = "/etc/fstab"
    # A group still `taking` (or `failed`) this long after it began was left by a killed or
    # failed create: `prune` deletes it and `check` reports it. A create lasts seconds.
    stale_after_minutes: float = Field(default=60.0, gt=0)
    # A standby's group of an archived cluster starts its WAL at the standby's newest restartpoint,
    # which is no newer than the primary's last checkpoint: up to checkpoint_timeout or
    # max_wal_size back, all of it replayed by every restore of the group. On: a CHECKPOINT on the
    # primary first, replayed by the standby before its pg_backup_start, so that a restore replays
    # only what was written since the group, for one immediate checkpoint's I/O on the primary.
    checkpoint_primary: bool = True
    # Policies of their own, keyed by Postgres cluster and by host; the Redis set's.
    clusters: dict[str, SnapshotPolicy] = Field(default_factory=dict)
    redis: SnapshotPolicy | None = None
    hosts: dict[str, SnapshotPolicy] = Field(default_factory=dict)

    @field_validator("pre_freeze")
    @classmethod
    def known_roles(cls, value: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(value) - set(ROLES))
        if unknown:
            raise InvalidValue(
                f"unknown role {unknown[0]!r} (a command for it would never run)",
                f"key each command by one of: {', '.join(ROLES)}",
            )
        return value


class Monitoring(Strict):
    pingdom_url: str = "https://api.pingdom.com/api/3.1"
    pagerduty_url: str = "https://events.pagerduty.com"
    # Outside-in HTTP(S) checks that `igops pingdom sync` keeps, besides each load balancer's health.
    public_urls: list[str] = Field(default_factory=list)


class SecretsRef(Strict):
    file: str | None = None


class Mount(Strict):
    path: str
    purpose: str = "data"
    device: str | None = None
    volumes: list[str] = Field(default_factory=list)

    @field_validator("path")
    @classmethod
    def absolute(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must be an absolute path")
        return value

    @field_validator("volumes")
    @classmethod
    def volume_ids(cls, value: list[str]) -> list[str]:
        for volume in value:
            if not volume.startswith("vol-"):
                raise ValueError(f"{volume!r} is not an EBS volume id (vol-…)")
        return value


class Host(Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    address: IPvAnyAddress
    roles: list[str] = Field(default_factory=list)
    ssh_user: str | None = None
    ssh_port: Port | None = None
    instance_id: str | None = Field(default=None, pattern=r"^i-[0-9a-f]+$")
    mounts: list[Mount] = Field(default_factory=list)


class LoadBalancer(Strict):
    port: Port = 80
    health_path: HealthPath = "/health"
    upstream_file: str = "/etc/nginx/conf.d/igops-upstream.conf"
    # Run before every reload: a change that fails it is undone and never reloaded.
    test_command: str = "nginx -t -q"
    reload_command: str = "nginx -s reload"
    # Per-host template ({host}): nginx's access log in the `upstream` log_format of
    # docs/deploy.md, which a deploy's canary analysis reads.
    access_log: str = "/var/log/nginx/access.log"


class App(Strict):
    port: Port = 8000
    health_path: HealthPath = "/health"
    root: str = "/srv/app"
    reload_command: str = "systemctl reload gunicorn"
    keep_releases: int = Field(default=5, ge=1)


class DeployCanary(Strict):
    """The canary analysis of a deploy (igops.deploy_canary): how long it watches the first
    batch beside the servers still on the old release, and what it calls a regression. A fail
    needs both a significant test (one-sided, at `alpha`) and an effect past its threshold, so
    that noise on a good release does not stop a deploy."""

    # Seconds of traffic to watch (`igops deploy --analysis SECONDS` overrides; 0 there disables).
    window: int = Field(default=60, ge=1, le=3600)
    # Seconds the canary takes traffic before the window begins: a release just started answers
    # its first requests slowly (each gunicorn worker imports the app and connects to its
    # databases), and judged on them a good release fails on latency under a loaded machine.
    warmup: int = Field(default=5, ge=0, le=600)
    alpha: float = Field(default=0.01, gt=0, le=0.2)
    # Fewer requests than this on either side (canary, baseline) in the window: inconclusive.
    min_requests: int = Field(default=200, ge=1)
    # An endpoint is compared on its own only with this many requests on each side.
    min_endpoint_requests: int = Field(default=50, ge=1)
    # The canary's 5xx rate may exceed the baseline's by this much (0.01: one percentage point).
    max_error_rate_increase: float = Field(default=0.01, ge=0, lt=1)
    # The canary's median and 95th percentile latency over the baseline's.
    max_p50_ratio: float = Field(default=1.5, ge=1)
    max_p95_ratio: float = Field(default=2.0, ge=1)
    # A latency ratio counts only when the percentile grew by at least this much: nginx times to
    # the millisecond, and 2 ms against 1 ms is a ratio of 2 and no regression.
    min_latency_increase_ms: float = Field(default=20.0, ge=0)
    # gunicorn worker restarts a canary host may have in the window beyond the baseline host
    # with the most (the app's /stats counts `worker_starts`).
    max_worker_restarts: int = Field(default=0, ge=0)
    # The most traffic (percent) the canary takes while the analysis watches: the load balancers
    # raise the other servers' nginx weights by one factor until it gets no more, and put them
    # back when the analysis ends. Unset: the canary's even share (one server of ten: 10%). A
    # smaller share exposes fewer users to a bad release, and needs a longer window for
    # min_requests; the other servers carry the rest meanwhile.
    traffic_percent: int | None = Field(default=None, ge=1, le=99)
    # How many endpoints the report names, worst first.
    worst_endpoints: int = Field(default=3, ge=1, le=20)
    # The most of each load balancer's log a window reads; past it the window is cut short.
    max_log_bytes: int = Field(default=64 << 20, ge=1 << 20, le=1 << 30)

    @model_validator(mode="after")
    def endpoint_minimum(self) -> Self:
        if self.min_endpoint_requests > self.min_requests:
            raise InvalidValue(
                f"min_endpoint_requests ({self.min_endpoint_requests}) is above min_requests ({self.min_requests}): "
                "no endpoint could ever be compared when the window is just conclusive",
                "set min_endpoint_requests at or below min_requests",
            )
        return self


class Deploy(Strict):
    # App servers that must stay in service while a batch is out: a count, or a percentage of
    # the app servers (rounded up). Servers down, unreachable or out for another operation count
    # as out; a plan that would go below it is refused.
    min_in_service: int | str = 1
    # Hosts that may fail their gate before a rollout stops (`--max-fail` overrides): a count,
    # or a percentage of the hosts rolled (rounded down, as Ansible's max_fail_percentage).
    max_fail: int | str = 0
    canary: DeployCanary = DeployCanary()

    @field_validator("min_in_service", "max_fail", mode="before")
    @classmethod
    def hosts_or_percent(cls, value: object, info: ValidationInfo) -> int | str:
        count, percent = count_or_percent(value, str(info.field_name))
        if info.field_name == "min_in_service" and percent == 100:
            raise InvalidValue("min_in_service 100% would never let a server out", "use less than 100%")
        return count if count is not None else f"{percent}%"


class PostgresCluster(Strict):
    primary: str
    standbys: list[str] = Field(default_factory=list)
    pgbouncer_database: str | None = None


class Postgres(Strict):
    port: Port = 5432
    database: str = "instagram"
    user: str = "postgres"
    os_user: str = "postgres"
    bin_dir: str = "/usr/lib/postgresql/15/bin"
    data_directory: str = "/var/lib/postgresql/15/main"
    repmgr_config: str = "/etc/repmgr.conf"
    socket_dir: str = "/var/run/postgresql"
    max_lag_bytes: int = Field(default=1 << 20, ge=0)
    # A switchover refuses a candidate whose replay lags more than this (pg_stat_replication).
    max_lag_seconds: float = Field(default=30.0, gt=0)
    # A switchover refuses a candidate with less free space on its data or WAL volume: a
    # promotion that fills one PANICs after the old primary is stopped.
    min_free_bytes: int = Field(default=64 << 20, ge=0)
    clusters: dict[str, PostgresCluster] = Field(default_factory=dict)


class PgBouncer(Strict):
    port: Port = 6432
    admin_user: str = "pgbouncer"
    databases_file: str = "/etc/pgbouncer/databases.ini"
    # How long a switchover waits for PAUSE before it gives up and resumes.
    pause_timeout: float = Field(default=5.0, gt=0, le=60)
    # The pause watchdog on each PgBouncer host RESUMEs once igops has sent no heartbeat (one a
    # second) for this long; at least 3 heartbeats, so that a late one does not trip it.
    watchdog_deadline: float = Field(default=15.0, ge=3, le=600)


class Redis(Strict):
    master: str | None = None
    replicas: list[str] = Field(default_factory=list)
    port: Port = 6379
    # Per-host template ({host}): failovers set its replicaof line so a restart keeps the role.
    config_file: str = "/etc/redis/redis.conf"
    # The longest a switchover holds writes (CLIENT PAUSE's own timeout, so it ends even if
    # igops dies).
    pause_timeout: float = Field(default=5.0, ge=3, le=60)
    max_lag_bytes: int = Field(default=1 << 20, ge=0)


class Memcached(Strict):
    port: Port = 11211


class Munin(Strict):
    port: Port = 4949
    # Per-host templates ({host}): where `igops munin install` puts plugins and their
    # settings, and how a node is told to pick them up.
    plugin_dir: str = "/etc/munin/plugins"
    plugin_conf_dir: str = "/etc/munin/plugin-conf.d"
    restart_command: str = "systemctl restart munin-node"
    # Where igops' plugin scripts live on a host; plugin_dir gets links to them.
    plugin_library: str = "/usr/local/share/igops/munin-plugins"


class Check(Strict):
    # One deadline for a whole `igops check`: whatever has not answered by then is CRITICAL.
    timeout: float = Field(default=10.0, gt=0, le=300)
    disk_warning_percent: float = Field(default=80.0, gt=0, le=100)
    disk_critical_percent: float = Field(default=90.0, gt=0, le=100)
    replication_lag_warning_bytes: int = Field(default=1 << 20, ge=0)
    replication_lag_critical_bytes: int = Field(default=64 << 20, ge=0)
    pgbouncer_wait_warning_seconds: float = Field(default=1.0, ge=0)
    pgbouncer_wait_critical_seconds: float = Field(default=5.0, ge=0)
    # A paused PgBouncer database is WARNING; CRITICAL once checks have seen it paused this long.
    pgbouncer_paused_critical_seconds: float = Field(default=60.0, ge=0)
    snapshot_warning_hours: float = Field(default=26.0, gt=0)
    snapshot_critical_hours: float = Field(default=50.0, gt=0)
    # The last `igops snapshot drill` that passed, per cluster that archives WAL.
    drill_warning_days: float = Field(default=7.0, gt=0)
    drill_critical_days: float = Field(default=14.0, gt=0)
    # With a [snapshot] schedule: how long after a scheduled time its group may still be
    # missing (being taken, or EBS still copying blocks) before the check warns.
    snapshot_grace_minutes: float = Field(default=60.0, ge=0)
    # Munin plugins whose warning/critical limits `igops check` evaluates (shell patterns).
    munin_plugins: list[str] = Field(default_factory=lambda: ["igops_*"])

    @model_validator(mode="after")
    def warning_before_critical(self) -> Self:
        for warning, critical in (
            ("disk_warning_percent", "disk_critical_percent"),
            ("replication_lag_warning_bytes", "replication_lag_critical_bytes"),
            ("pgbouncer_wait_warning_seconds", "pgbouncer_wait_critical_seconds"),
            ("snapshot_warning_hours", "snapshot_critical_hours"),
            ("drill_warning_days", "drill_critical_days"),
        ):
            if getattr(self, warning) > getattr(self, critical):
                raise InvalidValue(
                    f"{warning} ({getattr(self, warning):g}) is above {critical} "
                    f"({getattr(self, critical):g}): the warning would never be seen",
                    f"set {warning} at or below {critical}",
                )
        return self


class Shards(Strict):
    count: int = Field(default=16, ge=1, le=8192)
    directory_database: str = "directory"
    # The [postgres.clusters] entry holding the directory database (default: the first).
    directory_cluster: str | None = None
    schema_prefix: str = "insta"

    @field_validator("schema_prefix")
    @classmethod
    def identifier(cls, value: str) -> str:
        if not SCHEMA_PREFIX_PATTERN.match(value):
            raise InvalidValue(
                f"schema_prefix {value!r} is not a plain SQL identifier",
                "use lowercase letters, digits and _, starting with a letter or _ (at most 40 characters)",
            )
        return value

    # The service's DDL: shard_ddl is a template with {schema} and {shard_id}.
    shard_ddl: str | None = None
    directory_ddl: str | None = None


class Coordination(Strict):
    """Where leases and the audit trail live when they are shared by the whole team (etcd).
    Without this section they stay in the state directory (see igops.coordination)."""

    etcd: list[str] = Field(min_length=1)
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    # Its password is the secret etcd_password.
    user: str | None = None
    # etcd leases are whole seconds; under 2 s one late keepalive loses the lease.
    lease_ttl: int = Field(default=10, ge=2, le=300)
    # Default: /igops/<fleet name>/
    prefix: str | None = None

    @field_validator("etcd")
    @classmethod
    def urls(cls, value: list[str]) -> list[str]:
        for url in value:
            if not re.match(r"^https?://[^/\s]+/?$", url):
                raise InvalidValue(
                    f"{url!r} is not an etcd client URL", "use http://HOST:2379 or https://HOST:2379 (no path)"
                )
        return [url.rstrip("/") for url in value]

    @field_validator("prefix")
    @classmethod
    def slashed(cls, value: str | None) -> str | None:
        if value is not None and not (value.startswith("/") and value.endswith("/") and len(value) > 1):
            raise InvalidValue(f"prefix {value!r} must start and end with /", "use a key prefix such as /igops/prod/")
        return value

    @model_validator(mode="after")
    def tls_pairs(self) -> Self:
        if bool(self.cert_file) != bool(self.key_file):
            raise InvalidValue(
                "cert_file and key_file go together (a client certificate and its key)", "set both or neither"
            )
        plain = [url for url in self.etcd if url.startswith("http://")]
        if plain and (self.cert_file or self.ca_file):
            raise InvalidValue(
                f"TLS files are set but {plain[0]} is plain http",
                "use https:// URLs with TLS, or drop ca_file/cert_file/key_file",
            )
        if self.user:
            from igops.secrets import insecure_url_problem

            for url in self.etcd:
                problem = insecure_url_problem(url)
                if problem:
                    raise InvalidValue(
                        f"etcd user {self.user!r}: {problem}", "use https:// URLs so the password travels encrypted"
                    )
        return self


class ArchiveRepository(Strict):
    """Where pgBackRest keeps the WAL (and, later, backups): an S3 bucket. pgBackRest speaks S3
    only over TLS, so `endpoint` is a host name (or address) it checks the certificate against.
    Its key and secret are the secrets archive_s3_key and archive_s3_key_secret."""

    type: Literal["s3"] = "s3"
    bucket: str
    endpoint: str = "s3.amazonaws.com"
    port: Port = 443
    region: str = "us-east-1"
    # Every stanza's files live under this prefix of the bucket.
    path: str = "/pgbackrest"
    # "path" (https://endpoint/bucket/key) works with any S3 endpoint; "host" is AWS' own style.
    uri_style: Literal["path", "host"] = "path"
    # A CA bundle on the database hosts, for an endpoint whose certificate a private CA signed.
    ca_file: str | None = None
    verify_tls: bool = True

    @field_validator("path")
    @classmethod
    def absolute(cls, value: str) -> str:
        if not value.startswith("/"):
            raise InvalidValue(f"path {value!r} is relative", "use a prefix starting with /, e.g. /pgbackrest")
        return value


class Archive(Strict):
    """Continuous WAL archiving with pgBackRest (`igops pg archive setup|status`). The paths are
    per-host templates ({host} is replaced by the host's name), like [redis] config_file."""

    repository: ArchiveRepository
    # The stanza of each cluster: {cluster} is replaced by the cluster's name.
    stanza: str = "{cluster}"
    # A segment is archived at least this often (seconds) even when little is written: the
    # most WAL a lost primary can take with it on a quiet cluster.
    archive_timeout: int = Field(default=60, ge=1, le=3600)
    # pgBackRest's parallel processes for the asynchronous push.
    process_max: int = Field(default=2, ge=1, le=32)
    # With the repository away, WAL waits in pg_wal until it is pushed. Past this many bytes
    # waiting, pgBackRest drops it (reporting it as pushed, and logging the loss): the primary
    # keeps running, and point-in-time recovery has a gap until the next snapshot group. None
    # keeps every segment, so a long outage can fill pg_wal and stop the primary.
    push_queue_max_bytes: int | None = Field(default=None, ge=16 << 20)
    config_file: str = "/etc/pgbackrest/pgbackrest.conf"
    # Where asynchronous archive-push queues WAL and its status files (fast local disk).
    spool_path: str = "/var/spool/pgbackrest"
    log_path: str = "/var/log/pgbackrest"
    lock_path: str = "/tmp/pgbackrest"

    @field_validator("config_file", "spool_path", "log_path", "lock_path")
    @classmethod
    def absolute_path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise InvalidValue(f"{value!r} is not an absolute path", "use an absolute path (with {host} if per host)")
        return value

    @field_validator("stanza")
    @classmethod
    def plain_stanza(cls, value: str) -> str:
        if not re.match(r"^[A-Za-z0-9_{}.-]+$", value):
            raise InvalidValue(f"stanza {value!r} is not a plain name", "use letters, digits, _ . - and {cluster}")
        return value


class Inventory(Strict):
    fleet: Fleet = Fleet()
    ssh: Ssh = Ssh()
    aws: Aws = Aws()
    monitoring: Monitoring = Monitoring()
    secrets: SecretsRef = SecretsRef()
    hosts: list[Host] = Field(default_factory=list)
    lb: LoadBalancer = LoadBalancer()
    app: App = App()
    deploy: Deploy = Deploy()
    postgres: Postgres = Postgres()
    pgbouncer: PgBouncer = PgBouncer()
    redis: Redis = Redis()
    memcached: Memcached = Memcached()
    munin: Munin = Munin()
    shards: Shards = Shards()
    snapshot: Snapshot = Snapshot()
    check: Check = Check()
    coordination: Coordination | None = None
    archive: Archive | None = None

"""Every check igops runs across the fleet, as probes for `igops.checks.run_all`.

One probe per host over SSH (reachability, free space and write-ability of the data mounts, by
the stdlib program agent/hostprobe.py), one per HTTP endpoint, Postgres cluster, PgBouncer, the
Redis set, memcached and munin-node, one for the snapshot groups (checks/snapshots.py: one
verdict per set of data) and one for Pingdom. Each reports a Result per (check, target) the
moment it knows it.
"""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path

from igops import remote, status
from igops.checks import (
    Perf,
    Probe,
    Result,
    level,
    munin as munin_checks,
    snapshots as snapshot_checks,
    worst,
)
from igops.errors import NagiosStatus, UsageError
from igops.output import plural
from igops.secrets import Secrets

GROUPS = ("ssh", "disk", "frozen", "http", "postgres", "pgbouncer", "redis", "memcached", "munin", "snapshot",
          "pingdom", "operations")
SSH_GROUPS = ("ssh", "disk", "frozen")
PROBE_TIMEOUT = 5.0
# A write to a data mount that takes longer than this is taken for a frozen filesystem.
WRITE_STALL_SECONDS = 0.5
HTTP_RETRY_PAUSE = 0.3
GIB = 1 << 30


@dataclass
class Context:
    fleet: object
    hosts: list
    timeout: float
    samples: munin_checks.Samples | None
    _views: dict[str, dict[str, MemberView]] = field(default_factory=dict, init=False, repr=False)
    _views_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @property
    def probe_timeout(self) -> float:
        return min(PROBE_TIMEOUT, self.timeout)

    @cached_property
    def secrets(self) -> Secrets:
        return Secrets(self.fleet.model.secrets.file)

    def postgres_views(self, cluster_name: str) -> dict[str, MemberView]:
        """Each member of a cluster as it sees itself, asked once per run: the Postgres and
        the PgBouncer checks both judge against the live primary (a failover does not
        rewrite the inventory, which only names the members)."""
        with self._views_lock:
            if cluster_name not in self._views:
                cluster = self.fleet.model.postgres.clusters[cluster_name]
                members = [cluster.primary, *cluster.standbys]
                with ThreadPoolExecutor(max_workers=len(members)) as pool:
                    self._views[cluster_name] = dict(zip(members, pool.map(self._member_view, members), strict=False))
            return self._views[cluster_name]

    def _member_view(self, name: str) -> MemberView:
        import psycopg2

        view = MemberView()
        try:
            connection = _postgres_connect(self, self.fleet.host(name), self.probe_timeout)
            try:
                with connection.cursor() as cursor:
                    cursor.execute("SET statement_timeout = %s", (int(self.probe_timeout * 1000),))
                    cursor.execute("SELECT pg_is_in_recovery(), (SELECT status FROM pg_stat_wal_receiver LIMIT 1)")
                    view.in_recovery, view.receiver = cursor.fetchone()
                    if not view.in_recovery:
                        try:
                            # Assigning a transaction id writes and flushes WAL: the cheapest real write.
                            cursor.execute("SELECT txid_current()")
                        except psycopg2.Error as exc:
                            view.write_error = _short(exc)
                        cursor.execute("SELECT application_name, state, "
                                       "pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::bigint "
                                       "FROM pg_stat_replication")
                        view.replication = {name: (state, lag) for name, state, lag in cursor.fetchall()}
            finally:
                connection.close()
        except Exception as exc:  # noqa: BLE001
            view.error = _short(exc)
        return view


@dataclass
class MemberView:
    """One Postgres member as it sees itself."""

    in_recovery: bool | None = None  # None: it could not be asked (see error)
    receiver: str | None = None  # its WAL receiver's status
    write_error: str | None = None  # out of recovery, yet a write failed
    replication: dict[str, tuple[str, int | None]] = field(default_factory=dict)  # standby -> (state, lag)
    error: str | None = None


def live_primary(cluster, views: dict[str, MemberView]) -> str | None:
    """The member out of recovery; of two (a split brain), the one standbys stream from."""
    out = [name for name, view in views.items() if view.in_recovery is False]
    return max(out, key=lambda name: (len(views[name].replication), name == cluster.primary), default=None)


def validate_groups(only: list[str] | None) -> list[str]:
    unknown = sorted(set(only or []) - set(GROUPS))
    if unknown:
        raise UsageError(f"unknown check {unknown[0]!r}", f"checks are: {', '.join(GROUPS)}")
    return list(only or [])


def probes(fleet, roles: list[str] | None = None, only: list[str] | None = None, timeout: float = 10.0,
           samples: munin_checks.Samples | None = None) -> list[Probe]:
    enabled = set(validate_groups(only) or GROUPS)
    hosts = fleet.select(roles=roles)
    context = Context(fleet, hosts, timeout, samples)
    found: list[Probe] = []
    if enabled & set(SSH_GROUPS):
        found += ssh_probes(context, enabled)
    if "http" in enabled:
        found += http_probes(context)
    if "postgres" in enabled:
        found += postgres_probes(context)
    if "pgbouncer" in enabled:
        found += [pgbouncer_probe(context, host) for host in hosts if "pgbouncer" in host.roles]
    if "redis" in enabled:
        found += redis_probes(context)
    if "memcached" in enabled:
        found += [memcached_probe(context, host) for host in hosts if "memcached" in host.roles]
    if "munin" in enabled:
        found += [munin_probe(context, host) for host in hosts if "munin" in host.roles]
    if "snapshot" in enabled:
        found += snapshot_checks.snapshot_probes(fleet, hosts)
    if "pingdom" in enabled and (not roles or "lb" in roles):
        found += pingdom_probes(context)
    if "operations" in enabled and not roles:
        from igops.checks.operations import operations_probe

        found.append(operations_probe(fleet))
    return found


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def _ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 1)


# --- SSH: reachability, disks, frozen filesystems ----------------------------------------------

def ssh_probes(context: Context, enabled: set[str]) -> list[Probe]:
    from igops import agent

    fleet = context.fleet
    settings = remote.settings_for(fleet)
    # Connect and command deadlines inside the global one, so no session outlives the run by much.
    settings = remote.SshSettings(settings.known_hosts, settings.identity_file,
                                  min(settings.connect_timeout, context.timeout), context.timeout,
                                  settings.parallel)
    gate = threading.Semaphore(settings.parallel)
    mount_checks = [group for group in ("disk", "frozen") if group in enabled]
    built = []
    for host, target in zip(context.hosts, remote.targets_for(fleet, context.hosts), strict=False):
        mounts = [mount.path for mount in host.mounts] if mount_checks else []
        expected = ([("ssh", host.name)] if "ssh" in enabled else []) + [
            (group, f"{host.name}:{mount}") for mount in mounts for group in mount_checks]
        if not expected:
            continue
        command, stdin = agent.invocation("hostprobe", [f"{WRITE_STALL_SECONDS:g}", *mounts])
        built.append(Probe(f"ssh-{host.name}", expected,
                           _ssh_runner(context, host, target, command, stdin, settings, gate, enabled, mount_checks)))
    return built


def _ssh_runner(context, host, target, command, stdin, settings, gate, enabled, mount_checks):
    def run(report) -> None:
        import json

        with gate:
            [result] = remote.run([target], command, settings, stdin=stdin, timeout=context.timeout)
        mounts = [mount.path for mount in host.mounts] if mount_checks else []
        if not result.ok:
            reason = result.error or (result.stderr.strip().splitlines() or [f"exit {result.exit_code}"])[-1]
            if "ssh" in enabled:
                report(Result("ssh", host.name, NagiosStatus.CRITICAL, reason, duration_ms=result.duration_ms))
            for mount in mounts:
                for group in mount_checks:
                    report(Result(group, f"{host.name}:{mount}", NagiosStatus.UNKNOWN,
                                  f"not checked: {host.name} did not answer over SSH"))
            return
        answer = json.loads(result.stdout)
        if "ssh" in enabled:
            report(Result("ssh", host.name, NagiosStatus.OK, f"reachable, load {' '.join(answer['load'])}",
                          [Perf(f"ssh {host.name}", result.duration_ms / 1000, "s", minimum=0)],
                          duration_ms=result.duration_ms))
        thresholds = context.fleet.model.check
        for entry in answer["mounts"]:
            target_name = f"{host.name}:{entry['mount']}"
            if "disk" in enabled:
                report(disk_result(target_name, entry, thresholds.disk_warning_percent,
                                   thresholds.disk_critical_percent, result.duration_ms))
            if "frozen" in enabled:
                report(frozen_result(target_name, entry, result.duration_ms))
    return run


def disk_result(target: str, entry: dict, warning: float, critical: float, duration_ms: float | None) -> Result:
    if not entry.get("mounted"):
        return Result("disk", target, NagiosStatus.CRITICAL, "not mounted", duration_ms=duration_ms)
    used = entry["bytes_total"] - entry["bytes_free"]
    usable = used + entry["bytes_available"]
    percent = 100.0 * used / usable if usable else 0.0
    inodes = entry["inodes_total"]
    inode_percent = 100.0 * (inodes - entry["inodes_free"]) / inodes if inodes else 0.0
    state = level(max(percent, inode_percent), warning, critical)
    summary = (f"{percent:.1f}% used, {entry['bytes_available'] / GIB:.2f} GiB free of {usable / GIB:.2f} GiB; "
               f"inodes {inode_percent:.1f}% used")
    return Result("disk", target, state, summary,
                  [Perf(f"disk {target}", round(percent, 2), "%", warning, critical, 0, 100),
                   Perf(f"inodes {target}", round(inode_percent, 2), "%", warning, critical, 0, 100)],
                  duration_ms=duration_ms)


def frozen_result(target: str, entry: dict, duration_ms: float | None) -> Result:
    if not entry.get("mounted"):
        return Result("frozen", target, NagiosStatus.CRITICAL, "not mounted", duration_ms=duration_ms)
    writable = entry.get("writable")
    if writable:
        return Result("frozen", target, NagiosStatus.OK, "writable", duration_ms=duration_ms)
    if writable is None:
        return Result("frozen", target, NagiosStatus.UNKNOWN, entry.get("detail") or "not tested",
                      duration_ms=duration_ms)
    detail = entry.get("detail") or "not writable"
    prefix = "" if "read-only" in detail or detail.startswith("error") else "frozen: "
    return Result("frozen", target, NagiosStatus.CRITICAL, prefix + detail, duration_ms=duration_ms)


# --- HTTP ---------------------------------------------------------------------------------------

def http_probes(context: Context) -> list[Probe]:
    model = context.fleet.model
    built = []
    for host in context.hosts:
        for role, port, path in (("lb", model.lb.port, model.lb.health_path),
                                 ("app", model.app.port, model.app.health_path)):
            if role in host.roles:
                built.append(Probe(f"http-{role}-{host.name}", [(f"http-{role}", host.name)],
                                   _http_runner(f"http-{role}", host, port, path, context.probe_timeout)))
    return built


def _http_runner(check: str, host, port: int, path: str, timeout: float):
    def run(report) -> None:
        started = time.monotonic()
        ok, detail = health(str(host.address), port, path, timeout)
        if not ok:
            # One failure may be a blip (the app's own health deadline under a load spike): a
            # second look a moment later decides, as Pingdom confirms a "down" before alerting.
            time.sleep(HTTP_RETRY_PAUSE)
            ok, detail = health(str(host.address), port, path, timeout)
        elapsed = _ms(started)
        report(Result(check, host.name, NagiosStatus.OK if ok else NagiosStatus.CRITICAL,
                      f"{detail} on :{port} in {elapsed:.0f} ms" if ok else f"{detail} on :{port} (twice)",
                      [Perf(f"{check} {host.name}", elapsed / 1000, "s", minimum=0)] if ok else [],
                      duration_ms=elapsed))
    return run


def health(address: str, port: int, path: str, timeout: float) -> tuple[bool, str]:
    """GET a health URL: (answered 200, what it said). A JSON body's failing checks are named."""
    import http.client
    import json

    connection = http.client.HTTPConnection(address, port, timeout=timeout)
    try:
        connection.request("GET", path, headers={"User-Agent": "igops-check"})
        response = connection.getresponse()
        body = response.read(65536)
    except (OSError, http.client.HTTPException) as exc:
        return False, f"GET {path}: {_short(exc)}"
    finally:
        connection.close()
    detail = f"GET {path} -> {response.status}"
    if response.status != 200:
        try:
            failing = [f"{name}: {check.get('error', 'failed')}" for name, check in json.loads(body)["checks"].items()
                       if not check.get("ok")]
        except (ValueError, KeyError, TypeError, AttributeError):
            failing = []
        if failing:
            detail += " (" + "; ".join(failing)[:300] + ")"
    return response.status == 200, detail


# --- Postgres -----------------------------------------------------------------------------------

def _postgres_connect(context: Context, host, timeout: float, database: str = "postgres"):
    import psycopg2

    model = context.fleet.model
    connection = psycopg2.connect(host=str(host.address), port=model.postgres.port, user=model.postgres.user,
                                  dbname=database, password=context.secrets.get("postgres_password"),
                                  connect_timeout=max(1, int(timeout)), application_name="igops-check")
    connection.autocommit = True
    return connection


def postgres_probes(context: Context) -> list[Probe]:
    selected = {host.name for host in context.hosts}
    built = []
    for name, cluster in context.fleet.model.postgres.clusters.items():
        members = [cluster.primary, *cluster.standbys]
        if not selected & set(members):
            continue
        expected = [("postgres-primary", cluster.primary)] + [("postgres-standby", s) for s in cluster.standbys]
        built.append(Probe(f"postgres-{name}", expected, _postgres_runner(context, name, cluster)))
        built.append(Probe(f"repmgrd-{name}", [("postgres-repmgrd", member) for member in members],
                           _repmgrd_runner(context, name, members)))
    return built


def _repmgrd_runner(context: Context, cluster_name: str, members: list[str]):
    """repmgrd on each member, as its registration in the node's shared memory says. Running on no
    member is a fleet without automatic failover (OK); on some members only, or paused outside
    an operation, leaves a failover to chance (WARNING)."""
    from igops import postgres

    def state_of(name: str) -> tuple[str, str | None]:
        try:
            connection = _postgres_connect(context, context.fleet.host(name), context.probe_timeout,
                                           postgres.REPMGR_DATABASE)
            try:
                return name, postgres.repmgrd_state(connection)
            finally:
                connection.close()
        except Exception:  # noqa: BLE001 - a member that does not answer is the postgres check's finding
            return name, None

    def run(report) -> None:
        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=len(members), thread_name_prefix="repmgrd") as pool:
            states = dict(pool.map(state_of, members))
        in_use = any(state in ("running", "paused") for state in states.values())
        for name, state in states.items():
            if state is None:
                status, summary = NagiosStatus.UNKNOWN, "repmgrd: the node does not answer"
            elif state == "paused":
                status, summary = (NagiosStatus.WARNING, "repmgrd paused: no automatic failover "
                                   f"(`igops pg switchover {cluster_name} --to PRIMARY` unpauses it)")
            elif state == "not running" and in_use:
                status, summary = (NagiosStatus.WARNING, f"repmgrd not running here but on other members of "
                                   f"{cluster_name}: automatic failover may not act")
            else:
                status, summary = NagiosStatus.OK, f"repmgrd {state}" + ("" if in_use else " (not in use)")
            report(Result("postgres-repmgrd", name, status, summary, duration_ms=_ms(started)))
    return run


def _postgres_runner(context: Context, cluster_name: str, cluster):
    thresholds = context.fleet.model.check

    def run(report) -> None:
        started = time.monotonic()
        views = context.postgres_views(cluster_name)
        primary = live_primary(cluster, views)
        if primary is None:
            answers = "; ".join(f"{name}: {view.error or 'a standby'}" for name, view in views.items())
            primary_error = f"no member accepts writes ({answers})"
        else:
            primary_error = views[primary].write_error
        named = primary or cluster.primary
        if primary_error:
            report(Result("postgres-primary", named, NagiosStatus.CRITICAL,
                          f"cluster {cluster_name}: not writable: {primary_error}", duration_ms=_ms(started)))
        else:
            replication = views[named].replication
            streaming = sum(1 for state, _ in replication.values() if state == "streaming")
            moved = f"; promoted (the inventory lists {cluster.primary} first)" if named != cluster.primary else ""
            report(Result("postgres-primary", named, NagiosStatus.OK,
                          f"cluster {cluster_name}: writable, {streaming} standby(s) streaming{moved}",
                          [Perf(f"postgres-primary {named}", _ms(started) / 1000, "s", minimum=0)],
                          duration_ms=_ms(started)))
        for standby in views:
            if standby != named:
                row = views[named].replication.get(standby)
                report(_standby_result(named, standby, row, primary_error, views[standby], thresholds,
                                       _ms(started)))
    return run


def _standby_result(primary: str, standby: str, row, primary_error, view: MemberView, thresholds,
                    duration_ms: float) -> Result:
    if view.in_recovery is False:
        return Result("postgres-standby", standby, NagiosStatus.CRITICAL,
                      f"not in recovery: {standby} is a second primary", duration_ms=duration_ms)
    if row and row[0] == "streaming":
        lag = row[1] or 0
        state = level(lag, thresholds.replication_lag_warning_bytes, thresholds.replication_lag_critical_bytes)
        return Result("postgres-standby", standby, state, f"streaming from {primary}, replay lag {lag} bytes",
                      [Perf(f"postgres-lag {standby}", lag, "B", thresholds.replication_lag_warning_bytes,
                            thresholds.replication_lag_critical_bytes, 0)], duration_ms=duration_ms)
    if primary_error and view.receiver == "streaming":
        return Result("postgres-standby", standby, NagiosStatus.UNKNOWN,
                      f"its WAL receiver is streaming, but the primary {primary} cannot confirm its lag",
                      duration_ms=duration_ms)
    why = f"{standby} itself: {view.error}" if view.error else f"its WAL receiver is {view.receiver or 'not running'}"
    seen = f" (primary reports state {row[0]})" if row else ""
    return Result("postgres-standby", standby, NagiosStatus.CRITICAL, f"not streaming from {primary}{seen}; {why}",
                  duration_ms=duration_ms)


# --- PgBouncer ----------------------------------------------------------------------------------

def pgbouncer_probe(context: Context, host) -> Probe:
    fleet = context.fleet
    model = fleet.model
    thresholds = model.check

    def run(report) -> None:
        import psycopg2

        started = time.monotonic()
        try:
            connection = psycopg2.connect(host=str(host.address), port=model.pgbouncer.port,
                                          user=model.pgbouncer.admin_user, dbname="pgbouncer",
                                          password=context.secrets.get("pgbouncer_password"),
                                          connect_timeout=max(1, int(context.probe_timeout)))
            try:
                connection.autocommit = True
                with connection.cursor() as cursor:
                    cursor.execute("SHOW POOLS")
                    columns = [column.name for column in cursor.description]
                    pools = [dict(zip(columns, row, strict=False)) for row in cursor.fetchall()]
                    cursor.execute("SHOW DATABASES")
                    columns = [column.name for column in cursor.description]
                    databases = {row["name"]: row
                                 for row in (dict(zip(columns, r, strict=False)) for r in cursor.fetchall())}
            finally:
                connection.close()
        except Exception as exc:  # noqa: BLE001
            report(Result("pgbouncer", host.name, NagiosStatus.CRITICAL, _short(exc), duration_ms=_ms(started)))
            return
        problems = []
        for cluster_name, cluster in model.postgres.clusters.items():
            database = cluster.pgbouncer_database
            if not database:
                continue
            entry = databases.get(database)
            live = live_primary(cluster, context.postgres_views(cluster_name))
            primary = fleet.host(live) if live else None
            if entry is None:
                problems.append(f"no database {database!r} (cluster {cluster_name})")
            elif primary and entry.get("host") not in (str(primary.address), primary.name):
                problems.append(f"{database} points at {entry.get('host')}, not the primary "
                                f"{primary.name} ({primary.address})")
        user_pools = [pool for pool in pools if pool.get("database") != "pgbouncer"]
        waiting = sum(int(pool.get("cl_waiting") or 0) for pool in user_pools)
        longest = max((float(pool.get("maxwait") or 0) + float(pool.get("maxwait_us") or 0) / 1e6
                       for pool in user_pools), default=0.0)
        paused = sorted(name for name, entry in databases.items()
                        if name != "pgbouncer" and int(entry.get("paused") or 0))
        now = time.time()
        since = paused_since(fleet.state_dir / "check" / f"pgbouncer-paused-{host.name}.json", paused, now)
        paused_state, paused_text = paused_finding(since, now, thresholds.pgbouncer_paused_critical_seconds)
        state = NagiosStatus.CRITICAL if problems else worst([paused_state, level(
            longest, thresholds.pgbouncer_wait_warning_seconds, thresholds.pgbouncer_wait_critical_seconds)])
        counts = (f"{plural(len([name for name in databases if name != 'pgbouncer']), 'database')}, "
                  f"{plural(waiting, 'client')} waiting, "
                  f"longest wait {longest:.1f} s")
        summary = "; ".join(filter(None, [*problems, paused_text, None if problems else counts]))
        report(Result("pgbouncer", host.name, state, summary,
                      [Perf(f"pgbouncer-waiting {host.name}", waiting, minimum=0),
                       Perf(f"pgbouncer-maxwait {host.name}", round(longest, 3), "s",
                            thresholds.pgbouncer_wait_warning_seconds, thresholds.pgbouncer_wait_critical_seconds, 0)],
                      duration_ms=_ms(started)))

    return Probe(f"pgbouncer-{host.name}", [("pgbouncer", host.name)], run)


def paused_since(path: Path, paused: list[str], now: float) -> dict[str, float]:
    """database -> when a check first saw it paused (Unix time), for the databases paused now.
    PgBouncer does not say since when a database is paused, so each check remembers it in
    `path` (one file per PgBouncer host) and forgets a database once it is seen resumed."""
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    since = {name: float(known[name]) if isinstance(known.get(name), (int, float)) else now for name in paused}
    if since != known:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        temporary = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}")
        temporary.write_text(json.dumps(since))
        os.replace(temporary, path)
    return since


def paused_finding(since: dict[str, float], now: float, critical_seconds: float) -> tuple[NagiosStatus, str | None]:
    """WARNING while a database is paused; CRITICAL once checks have seen it paused for
    `critical_seconds` (a switchover holds it for seconds, so longer means an operation died
    or an operator forgot the RESUME)."""
    if not since:
        return NagiosStatus.OK, None
    ages = {name: max(0.0, now - first) for name, first in sorted(since.items())}
    state = NagiosStatus.CRITICAL if max(ages.values()) >= critical_seconds else NagiosStatus.WARNING
    shown = ", ".join(f"{name} (seen paused for {age:.0f} s)" for name, age in ages.items())
    return state, (f"PAUSED: {shown}; CRITICAL after {critical_seconds:g} s; "
                   "RESUME it on the admin console when no operation holds it")


# --- Redis --------------------------------------------------------------------------------------

def redis_probes(context: Context) -> list[Probe]:
    model = context.fleet.model.redis
    members = ([model.master] if model.master else []) + list(model.replicas)
    if not members or not {host.name for host in context.hosts} & set(members):
        return []
    expected = [("redis-master", model.master)] + [("redis-replica", name) for name in model.replicas]
    return [Probe("redis", expected, _redis_runner(context))]


def _redis_runner(context: Context):
    """Judge the Redis tier by live roles against the master the app writes to (the directory's
    redis_master endpoint): a failover changes both and leaves the inventory as it was."""
    from igops import redis_tier, redisops

    fleet = context.fleet
    thresholds = fleet.model.check

    def run(report) -> None:
        started = time.monotonic()
        members = redis_tier.redis_members(fleet)
        with ThreadPoolExecutor(max_workers=len(members) + 1, thread_name_prefix="check-redis") as pool:
            endpoint = pool.submit(_directory_redis_master, context)
            probed = list(pool.map(lambda name: redisops.probe(fleet, name, context.probe_timeout), members))
        address, version, directory_error = endpoint.result()
        states = {name: found for name, found, _ in probed}
        down = {name: error for name, _, error in probed if error}
        tier = redis_tier.redis_state_of(fleet, states, down, address, version, directory_error)
        for result in redis_results(tier, directory_error, thresholds, _ms(started)):
            report(result)
    return run


def _directory_redis_master(context: Context) -> tuple[str | None, int | None, str | None]:
    """(address, version, why it could not be read) of the directory's redis_master endpoint,
    read on the directory cluster's live primary."""
    from igops import postgres, redisops

    model = context.fleet.model
    cluster_name = context.fleet.directory_cluster
    if cluster_name is None:
        return None, None, "the inventory has no Postgres cluster for the directory"
    primary = live_primary(model.postgres.clusters[cluster_name], context.postgres_views(cluster_name))
    if primary is None:
        return None, None, f"no primary of cluster {cluster_name} answers: the directory cannot be read"
    try:
        connection = postgres.connect(context.fleet, context.fleet.host(primary), model.shards.directory_database,
                                      timeout=max(1, int(context.probe_timeout)),
                                      statement_timeout_ms=int(context.probe_timeout * 1000))
        try:
            return (*redisops.read_endpoint(connection), None)
        finally:
            connection.close()
    except Exception as exc:  # noqa: BLE001
        return None, None, f"the directory on {primary}: {_short(exc)}"


def redis_results(tier, directory_error: str | None, thresholds, duration_ms: float) -> list[Result]:
    """One result per Redis node, named by its live role. The reference master is the one the
    app writes to, or without a readable directory the only live master."""
    masters = [node.name for node in tier.nodes if node.role == "master"]
    reference = tier.app_master if tier.app_master in masters else masters[0] if len(masters) == 1 else None
    results = []
    for node in tier.nodes:
        if node.role == "unknown":
            check = "redis-master" if node.app_master else "redis-replica"
            results.append(Result(check, node.name, NagiosStatus.CRITICAL, f"{node.state}: {node.detail}",
                                  duration_ms=duration_ms))
        elif node.role == "master":
            results.append(_redis_master_result(node, tier, reference, masters, directory_error, duration_ms))
        else:
            results.append(_redis_replica_result(node, tier, reference, thresholds, duration_ms))
    return results


def _redis_master_result(node, tier, reference, masters, directory_error, duration_ms) -> Result:
    replicas = sum(1 for other in tier.nodes if other.role == "replica" and other.master == node.name)
    if node.name != reference:
        if tier.app_master in masters:
            why = f"a second master: the app writes to {tier.app_master}"
        else:
            why = f"one of {plural(len(masters), 'master')} ({', '.join(masters)}), and the app writes to none of them"
        return Result("redis-master", node.name, NagiosStatus.CRITICAL, why, duration_ms=duration_ms)
    if tier.app_master != node.name:
        if directory_error:
            elsewhere = directory_error
        elif tier.app_address is None:
            elsewhere = "the directory names no Redis master"
        elif tier.app_master is None:
            elsewhere = f"the directory names {tier.app_address}, no Redis node of the inventory"
        else:
            elsewhere = f"the directory names {tier.app_master}, which is {_redis_role_words(tier, tier.app_master)}"
        return Result("redis-master", node.name, NagiosStatus.CRITICAL,
                      f"master, {replicas} replica(s) linked; but the app does not write here: {elsewhere}",
                      duration_ms=duration_ms)
    return Result("redis-master", node.name, NagiosStatus.OK,
                  f"master the app writes to, {replicas} replica(s) linked", duration_ms=duration_ms)


def _redis_role_words(tier, name: str) -> str:
    found = tier.node(name)
    return "down" if found.role == "unknown" else f"a {found.role}"


def _redis_replica_result(node, tier, reference, thresholds, duration_ms) -> Result:
    if reference is None:
        return Result("redis-replica", node.name, NagiosStatus.CRITICAL,
                      f"replica of {node.master}, but there is no master to follow", duration_ms=duration_ms)
    if node.master != reference:
        return Result("redis-replica", node.name, NagiosStatus.CRITICAL,
                      f"replicates {node.master}, not the master {reference}", duration_ms=duration_ms)
    if node.link != "up":
        return Result("redis-replica", node.name, NagiosStatus.CRITICAL, f"link to {reference} is {node.link}",
                      duration_ms=duration_ms)
    if node.read_only is False:
        return Result("redis-replica", node.name, NagiosStatus.CRITICAL,
                      "accepts writes (replica-read-only no): a write there is lost at the next resync",
                      duration_ms=duration_ms)
    lag = max(0, tier.node(reference).offset - node.offset)
    state = level(lag, thresholds.replication_lag_warning_bytes, thresholds.replication_lag_critical_bytes)
    return Result("redis-replica", node.name, state, f"linked to {reference}, offset lag {lag} bytes",
                  [Perf(f"redis-lag {node.name}", lag, "B", thresholds.replication_lag_warning_bytes,
                        thresholds.replication_lag_critical_bytes, 0)], duration_ms=duration_ms)


# --- memcached ----------------------------------------------------------------------------------

def memcached_probe(context: Context, host) -> Probe:
    port = context.fleet.model.memcached.port

    def run(report) -> None:
        started = time.monotonic()
        try:
            ok, detail = status.memcached_version(str(host.address), port)
        except Exception as exc:  # noqa: BLE001
            ok, detail = False, _short(exc)
        report(Result("memcached", host.name, NagiosStatus.OK if ok else NagiosStatus.CRITICAL,
                      f"{detail} on :{port}", duration_ms=_ms(started)))

    return Probe(f"memcached-{host.name}", [("memcached", host.name)], run)


# --- munin-node ---------------------------------------------------------------------------------

def munin_probe(context: Context, host) -> Probe:
    model = context.fleet.model
    expected_plugins = munin_checks.plugins_for(host)

    def run(report) -> None:
        started = time.monotonic()
        try:
            with munin_checks.NodeClient(str(host.address), model.munin.port, context.probe_timeout) as node:
                dirty = "dirtyconfig" in node.cap(["multigraph", "dirtyconfig"])
                listed = node.list()
                plugins = munin_checks.wanted(listed, model.check.munin_plugins)
                outputs = {plugin: munin_checks.config_and_values(node, plugin, dirty) for plugin in plugins}
        except (munin_checks.NodeError, OSError) as exc:
            report(Result("munin", host.name, NagiosStatus.CRITICAL, _short(exc), duration_ms=_ms(started)))
            return
        now = time.time()
        findings, perfdata, values = [], [], 0
        state = NagiosStatus.OK
        for plugin, (config, fetched) in outputs.items():
            fields, complaints = munin_checks.parse(plugin, config, fetched)
            if complaints or not fields:
                state = worst([state, NagiosStatus.WARNING])
                findings.append(f"{plugin}: {', '.join(complaints) or 'no values'}")
                continue
            for judged in munin_checks.judge(host.name, fields, context.samples, now):
                values += judged.value is not None
                if judged.status != NagiosStatus.OK:
                    state = worst([state, judged.status])
                    findings.append(judged.describe())
                if judged.value is not None and (judged.field.warning or judged.field.critical):
                    perfdata.append(Perf(f"munin {host.name} {judged.field.path}", round(judged.value, 3)))
        missing = [plugin for plugin in expected_plugins if plugin not in listed]
        if missing:
            state = worst([state, NagiosStatus.WARNING])
            findings.append(f"{', '.join(missing)} not installed (igops munin install)")
        summary = "; ".join(findings) if findings else \
            f"{plural(len(outputs), 'igops plugin')}, {plural(values, 'value')} within their limits" if outputs else \
            "answers; no igops plugins for this host's roles"
        report(Result("munin", host.name, state, summary, perfdata, duration_ms=_ms(started)))

    return Probe(f"munin-{host.name}", [("munin", host.name)], run)


# --- Pingdom ------------------------------------------------------------------------------------

PINGDOM_STATES = {"up": NagiosStatus.OK, "down": NagiosStatus.CRITICAL, "unconfirmed_down": NagiosStatus.WARNING,
                  "unknown": NagiosStatus.UNKNOWN, "paused": NagiosStatus.WARNING}


def pingdom_probes(context: Context) -> list[Probe]:
    from igops.checks import pingdom

    fleet = context.fleet
    if not context.secrets.get("pingdom_token"):
        return []
    desired = pingdom.desired_checks(fleet)
    if not desired:
        return []

    def run(report) -> None:
        started = time.monotonic()
        client = pingdom.Pingdom.for_fleet(fleet, timeout=context.probe_timeout)
        try:
            checks = {check["name"]: check for check in client.checks(pingdom.fleet_tag(fleet))}
            now = int(time.time())
            in_maintenance = {}
            for window in client.request("GET", "/maintenance").get("maintenance", []):
                if int(window.get("from", 0)) <= now <= int(window.get("to", 0)):
                    for check_id in window.get("checks", {}).get("uptime", []):
                        in_maintenance[int(check_id)] = window
        except pingdom.PingdomError as exc:
            for want in desired:
                report(Result("pingdom", want.name, NagiosStatus.UNKNOWN, exc.one_line(), duration_ms=_ms(started)))
            return
        finally:
            client.close()
        for want in desired:
            check = checks.get(want.name)
            if check is None:
                report(Result("pingdom", want.name, NagiosStatus.WARNING,
                              "not in Pingdom (igops pingdom sync creates it)", duration_ms=_ms(started)))
                continue
            word = check.get("status", "unknown")
            state = PINGDOM_STATES.get(word, NagiosStatus.UNKNOWN)
            window = in_maintenance.get(int(check["id"]))
            note = ""
            if window and state == NagiosStatus.CRITICAL:
                state = NagiosStatus.WARNING
                note = f" during maintenance window #{window['id']} (until {_clock(window['to'])})"
            response = check.get("lastresponsetime")
            summary = f"{word}{note}" + (f", last response {response} ms" if response is not None else "")
            report(Result("pingdom", want.name, state, summary,
                          [Perf(f"pingdom {want.name}", response / 1000, "s", minimum=0)] if response else [],
                          duration_ms=_ms(started)))

    return [Probe("pingdom", [("pingdom", want.name) for want in desired], run)]


def _clock(timestamp) -> str:
    return datetime.fromtimestamp(int(timestamp), UTC).strftime("%H:%M UTC")

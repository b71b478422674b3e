"""Every check igops runs across the fleet, as probes for `igops.checks.run_all`.

One probe per host over SSH (reachability, free space and write-ability of the data mounts, by
the stdlib program agent/hostprobe.py), one per HTTP endpoint, Postgres cluster, PgBouncer, the
Redis set, memcached and munin-node, one for the snapshot groups (checks/snapshots.py: one
verdict per set of data), one per cluster's WAL archive (checks/archive.py) and one for Pingdom.
Each reports a Result per (check, target) the moment it knows it. The Postgres and PgBouncer
probes are in checks/postgres_probes.py, Redis's in checks/redis_probes.py, and what they all
share (the run's Context) in checks/probe_context.py.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from igops import remote, status
from igops.checks import (
    Perf,
    Probe,
    Report,
    Result,
    level,
    munin as munin_checks,
    snapshots as snapshot_checks,
    worst,
)
from igops.checks.archive import archive_probes, drill_probes
from igops.checks.postgres_probes import pgbouncer_probe, postgres_probes
from igops.checks.probe_context import Context, elapsed_ms, first_line_of
from igops.checks.redis_probes import redis_probes
from igops.errors import NagiosStatus, UsageError
from igops.output import plural

if TYPE_CHECKING:
    from igops.inventory import Fleet
    from igops.inventory_model import Host

GROUPS = (
    "ssh",
    "disk",
    "frozen",
    "http",
    "postgres",
    "pgbouncer",
    "redis",
    "memcached",
    "munin",
    "snapshot",
    "archive",
    "drill",
    "pingdom",
    "operations",
)
SSH_GROUPS = ("ssh", "disk", "frozen")
# A write to a data mount that takes longer than this is taken for a frozen filesystem.
WRITE_STALL_SECONDS = 0.5
HTTP_RETRY_PAUSE = 0.3
GIB = 1 << 30


def validate_groups(only: list[str] | None) -> list[str]:
    unknown = sorted(set(only or []) - set(GROUPS))
    if unknown:
        raise UsageError(f"unknown check {unknown[0]!r}", f"checks are: {', '.join(GROUPS)}")
    return list(only or [])


def probes(
    fleet: Fleet,
    roles: list[str] | None = None,
    only: list[str] | None = None,
    timeout: float = 10.0,
    samples: munin_checks.Samples | None = None,
) -> list[Probe]:
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
        found += snapshot_checks.snapshot_probes(context)
    if "archive" in enabled and (not roles or "postgres" in roles):
        found += archive_probes(fleet)
    if "drill" in enabled and (not roles or "postgres" in roles):
        found += drill_probes(context)
    if "pingdom" in enabled and (not roles or "lb" in roles):
        found += pingdom_probes(context)
    if "operations" in enabled and not roles:
        from igops.checks.operations import operations_probe

        found.append(operations_probe(fleet))
    return found


# --- SSH: reachability, disks, frozen filesystems ----------------------------------------------


def ssh_probes(context: Context, enabled: set[str]) -> list[Probe]:
    from igops import agent

    fleet = context.fleet
    settings = remote.settings_for(fleet)
    # Connect and command deadlines inside the global one, so no session outlives the run by much.
    settings = remote.SshSettings(
        settings.known_hosts,
        settings.identity_file,
        min(settings.connect_timeout, context.timeout),
        context.timeout,
        settings.parallel,
    )
    gate = threading.Semaphore(settings.parallel)
    mount_checks = [group for group in ("disk", "frozen") if group in enabled]
    built = []
    for host, target in zip(context.hosts, remote.targets_for(fleet, context.hosts), strict=False):
        mounts = [mount.path for mount in host.mounts] if mount_checks else []
        expected = ([("ssh", host.name)] if "ssh" in enabled else []) + [
            (group, f"{host.name}:{mount}") for mount in mounts for group in mount_checks
        ]
        if not expected:
            continue
        command, stdin = agent.invocation("hostprobe", [f"{WRITE_STALL_SECONDS:g}", *mounts])
        built.append(
            Probe(
                f"ssh-{host.name}",
                expected,
                _ssh_runner(context, host, target, command, stdin, settings, gate, enabled, mount_checks),
            )
        )
    return built


def _ssh_runner(
    context: Context,
    host: Host,
    target: remote.Target,
    command: str,
    stdin: bytes,
    settings: remote.SshSettings,
    gate: threading.Semaphore,
    enabled: set[str],
    mount_checks: list[str],
) -> Callable[[Report], None]:
    def run(report: Report) -> None:

        with gate:
            [result] = remote.run([target], command, settings, stdin=stdin, timeout=context.timeout)
        mounts = [mount.path for mount in host.mounts] if mount_checks else []
        if not result.ok:
            reason = result.error or (result.stderr.strip().splitlines() or [f"exit {result.exit_code}"])[-1]
            if "ssh" in enabled:
                report(Result("ssh", host.name, NagiosStatus.CRITICAL, reason, duration_ms=result.duration_ms))
            for mount in mounts:
                for group in mount_checks:
                    report(
                        Result(
                            group,
                            f"{host.name}:{mount}",
                            NagiosStatus.UNKNOWN,
                            f"not checked: {host.name} did not answer over SSH",
                        )
                    )
            return
        answer = json.loads(result.stdout)
        if "ssh" in enabled:
            report(
                Result(
                    "ssh",
                    host.name,
                    NagiosStatus.OK,
                    f"reachable, load {' '.join(answer['load'])}",
                    [Perf(f"ssh {host.name}", result.duration_ms / 1000, "s", minimum=0)],
                    duration_ms=result.duration_ms,
                )
            )
        thresholds = context.fleet.model.check
        for entry in answer["mounts"]:
            target_name = f"{host.name}:{entry['mount']}"
            if "disk" in enabled:
                report(
                    disk_result(
                        target_name,
                        entry,
                        thresholds.disk_warning_percent,
                        thresholds.disk_critical_percent,
                        result.duration_ms,
                    )
                )
            if "frozen" in enabled:
                report(frozen_result(target_name, entry, result.duration_ms))

    return run


def disk_result(
    target: str, entry: dict[str, Any], warning: float, critical: float, duration_ms: float | None
) -> Result:
    if not entry.get("mounted"):
        return Result("disk", target, NagiosStatus.CRITICAL, "not mounted", duration_ms=duration_ms)
    used = entry["bytes_total"] - entry["bytes_free"]
    usable = used + entry["bytes_available"]
    percent = 100.0 * used / usable if usable else 0.0
    inodes = entry["inodes_total"]
    inode_percent = 100.0 * (inodes - entry["inodes_free"]) / inodes if inodes else 0.0
    state = level(max(percent, inode_percent), warning, critical)
    summary = (
        f"{percent:.1f}% used, {entry['bytes_available'] / GIB:.2f} GiB free of {usable / GIB:.2f} GiB; "
        f"inodes {inode_percent:.1f}% used"
    )
    return Result(
        "disk",
        target,
        state,
        summary,
        [
            Perf(f"disk {target}", round(percent, 2), "%", warning, critical, 0, 100),
            Perf(f"inodes {target}", round(inode_percent, 2), "%", warning, critical, 0, 100),
        ],
        duration_ms=duration_ms,
    )


def frozen_result(target: str, entry: dict[str, Any], duration_ms: float | None) -> Result:
    if not entry.get("mounted"):
        return Result("frozen", target, NagiosStatus.CRITICAL, "not mounted", duration_ms=duration_ms)
    writable = entry.get("writable")
    if writable:
        return Result("frozen", target, NagiosStatus.OK, "writable", duration_ms=duration_ms)
    if writable is None:
        return Result(
            "frozen", target, NagiosStatus.UNKNOWN, entry.get("detail") or "not tested", duration_ms=duration_ms
        )
    detail = entry.get("detail") or "not writable"
    prefix = "" if "read-only" in detail or detail.startswith("error") else "frozen: "
    return Result("frozen", target, NagiosStatus.CRITICAL, prefix + detail, duration_ms=duration_ms)


# --- HTTP ---------------------------------------------------------------------------------------


def http_probes(context: Context) -> list[Probe]:
    model = context.fleet.model
    built = []
    for host in context.hosts:
        for role, port, path in (
            ("lb", model.lb.port, model.lb.health_path),
            ("app", model.app.port, model.app.health_path),
        ):
            if role in host.roles:
                built.append(
                    Probe(
                        f"http-{role}-{host.name}",
                        [(f"http-{role}", host.name)],
                        _http_runner(f"http-{role}", host, port, path, context.probe_timeout),
                    )
                )
    return built


def _http_runner(check: str, host: Host, port: int, path: str, timeout: float) -> Callable[[Report], None]:
    def run(report: Report) -> None:
        started = time.monotonic()
        ok, detail = health(str(host.address), port, path, timeout)
        if not ok:
            # One failure may be a blip (the app's own health deadline under a load spike): a
            # second look a moment later decides, as Pingdom confirms a "down" before alerting.
            time.sleep(HTTP_RETRY_PAUSE)
            ok, detail = health(str(host.address), port, path, timeout)
        elapsed = elapsed_ms(started)
        report(
            Result(
                check,
                host.name,
                NagiosStatus.OK if ok else NagiosStatus.CRITICAL,
                f"{detail} on :{port} in {elapsed:.0f} ms" if ok else f"{detail} on :{port} (twice)",
                [Perf(f"{check} {host.name}", elapsed / 1000, "s", minimum=0)] if ok else [],
                duration_ms=elapsed,
            )
        )

    return run


def health(address: str, port: int, path: str, timeout: float) -> tuple[bool, str]:
    """GET a health URL: (answered 200, what it said). A JSON body's failing checks are named."""
    import http.client

    connection = http.client.HTTPConnection(address, port, timeout=timeout)
    try:
        connection.request("GET", path, headers={"User-Agent": "igops-check"})
        response = connection.getresponse()
        body = response.read(65536)
    except (OSError, http.client.HTTPException) as exc:
        return False, f"GET {path}: {first_line_of(exc)}"
    finally:
        connection.close()
    detail = f"GET {path} -> {response.status}"
    if response.status != 200:
        try:
            failing = [
                f"{name}: {check.get('error', 'failed')}"
                for name, check in json.loads(body)["checks"].items()
                if not check.get("ok")
            ]
        except (ValueError, KeyError, TypeError, AttributeError):
            failing = []
        if failing:
            detail += " (" + "; ".join(failing)[:300] + ")"
    return response.status == 200, detail


# --- memcached ----------------------------------------------------------------------------------


def memcached_probe(context: Context, host: Host) -> Probe:
    port = context.fleet.model.memcached.port

    def run(report: Report) -> None:
        started = time.monotonic()
        try:
            ok, detail = status.memcached_version(str(host.address), port)
        except Exception as exc:  # noqa: BLE001
            ok, detail = False, first_line_of(exc)
        report(
            Result(
                "memcached",
                host.name,
                NagiosStatus.OK if ok else NagiosStatus.CRITICAL,
                f"{detail} on :{port}",
                duration_ms=elapsed_ms(started),
            )
        )

    return Probe(f"memcached-{host.name}", [("memcached", host.name)], run)


# --- munin-node ---------------------------------------------------------------------------------


def munin_probe(context: Context, host: Host) -> Probe:
    model = context.fleet.model
    expected_plugins = munin_checks.plugins_for(host)

    def run(report: Report) -> None:
        started = time.monotonic()
        try:
            with munin_checks.NodeClient(str(host.address), model.munin.port, context.probe_timeout) as node:
                dirty = "dirtyconfig" in node.cap(["multigraph", "dirtyconfig"])
                listed = node.list()
                plugins = munin_checks.wanted(listed, model.check.munin_plugins)
                outputs = {plugin: munin_checks.config_and_values(node, plugin, dirty) for plugin in plugins}
        except (munin_checks.NodeError, OSError) as exc:
            report(
                Result("munin", host.name, NagiosStatus.CRITICAL, first_line_of(exc), duration_ms=elapsed_ms(started))
            )
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
        summary = (
            "; ".join(findings)
            if findings
            else f"{plural(len(outputs), 'igops plugin')}, {plural(values, 'value')} within their limits"
            if outputs
            else "answers; no igops plugins for this host's roles"
        )
        report(Result("munin", host.name, state, summary, perfdata, duration_ms=elapsed_ms(started)))

    return Probe(f"munin-{host.name}", [("munin", host.name)], run)


# --- Pingdom ------------------------------------------------------------------------------------

PINGDOM_STATES = {
    "up": NagiosStatus.OK,
    "down": NagiosStatus.CRITICAL,
    "unconfirmed_down": NagiosStatus.WARNING,
    "unknown": NagiosStatus.UNKNOWN,
    "paused": NagiosStatus.WARNING,
}


def pingdom_probes(context: Context) -> list[Probe]:
    from igops.checks import pingdom

    fleet = context.fleet
    if not context.secrets.get("pingdom_token"):
        return []
    desired = pingdom.desired_checks(fleet)
    if not desired:
        return []

    def run(report: Report) -> None:
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
                report(
                    Result("pingdom", want.name, NagiosStatus.UNKNOWN, exc.one_line(), duration_ms=elapsed_ms(started))
                )
            return
        finally:
            client.close()
        for want in desired:
            check = checks.get(want.name)
            if check is None:
                report(
                    Result(
                        "pingdom",
                        want.name,
                        NagiosStatus.WARNING,
                        "not in Pingdom (igops pingdom sync creates it)",
                        duration_ms=elapsed_ms(started),
                    )
                )
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
            report(
                Result(
                    "pingdom",
                    want.name,
                    state,
                    summary,
                    [Perf(f"pingdom {want.name}", response / 1000, "s", minimum=0)] if response else [],
                    duration_ms=elapsed_ms(started),
                )
            )

    return [Probe("pingdom", [("pingdom", want.name) for want in desired], run)]


def _clock(timestamp: int | str) -> str:
    return datetime.fromtimestamp(int(timestamp), UTC).strftime("%H:%M UTC")

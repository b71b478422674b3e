"""Fleet overview: can every host be reached over SSH, and does every service answer its
own protocol? All probes run at once under short timeouts."""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from igops import remote
from igops.output import plural
from igops.secrets import Secrets

if TYPE_CHECKING:
    from igops.inventory import Fleet
    from igops.inventory_model import Host

PROBE_TIMEOUT = 3.0

# A service probe: (service, host, address, port, check, the check's own argument); the check
# takes the address, the port and that argument and says whether the service is well, and how.
Check = Callable[[str, int, Any], tuple[bool, str]]
Probe = tuple[str, str, str, int, Check, Any]


@dataclass
class HostState:
    host: str
    address: str
    roles: list[str]
    reachable: bool
    load: str | None
    detail: str | None


@dataclass
class ServiceState:
    service: str
    host: str
    endpoint: str
    ok: bool
    detail: str


@dataclass
class StatusReport:
    fleet: str
    hosts: list[HostState] = field(default_factory=list)
    services: list[ServiceState] = field(default_factory=list)

    def problems(self) -> list[str]:
        return [f"{h.host} unreachable" for h in self.hosts if not h.reachable] + [
            f"{s.service} on {s.host} down ({s.detail})" for s in self.services if not s.ok
        ]


def collect(fleet: Fleet, roles: list[str] | None = None) -> StatusReport:
    selected = fleet.select(roles=roles)
    report = StatusReport(fleet.model.fleet.name)
    probes = service_probes(fleet, selected)
    with ThreadPoolExecutor(max_workers=16, thread_name_prefix="probe") as pool:
        service_futures = [pool.submit(_probe, *probe) for probe in probes]
        settings = remote.settings_for(fleet)
        results = remote.run(
            remote.targets_for(fleet, selected),
            "cat /proc/loadavg",
            settings,
            timeout=min(settings.command_timeout, 10),
        )
        report.services = [future.result() for future in service_futures]
    for host, result in zip(selected, results, strict=False):
        load = " ".join(result.stdout.split()[:3]) if result.ok else None
        report.hosts.append(
            HostState(
                host.name,
                str(host.address),
                list(host.roles),
                result.ok,
                load,
                None if result.ok else (result.error or result.stderr.strip()),
            )
        )
    return report


def service_probes(fleet: Fleet, hosts: Iterable[Host]) -> list[Probe]:
    model = fleet.model
    secrets = Secrets(model.secrets.file)
    probes: list[Probe] = []
    for host in hosts:
        address = str(host.address)
        for role in host.roles:
            if role == "lb":
                probes.append(("nginx", host.name, address, model.lb.port, _http, model.lb.health_path))
            elif role == "app":
                probes.append(("gunicorn", host.name, address, model.app.port, _http, model.app.health_path))
            elif role == "postgres":
                probes.append(
                    (
                        "postgres",
                        host.name,
                        address,
                        model.postgres.port,
                        _postgres,
                        (model.postgres.user, model.postgres.database, secrets),
                    )
                )
            elif role == "pgbouncer":
                probes.append(
                    (
                        "pgbouncer",
                        host.name,
                        address,
                        model.pgbouncer.port,
                        _pgbouncer,
                        (model.pgbouncer.admin_user, secrets),
                    )
                )
            elif role == "redis":
                probes.append(("redis", host.name, address, model.redis.port, _redis, secrets))
            elif role == "memcached":
                probes.append(("memcached", host.name, address, model.memcached.port, memcached_version, None))
            elif role == "munin":
                probes.append(("munin-node", host.name, address, model.munin.port, _munin, None))
    return probes


def _probe(service: str, host: str, address: str, port: int, check: Check, arg: Any) -> ServiceState:
    endpoint = f"{address}:{port}"
    try:
        ok, detail = check(address, port, arg)
    except Exception as exc:  # noqa: BLE001 - a failed probe is a finding, not a crash
        ok, detail = False, _short(exc)
    return ServiceState(service, host, endpoint, ok, detail)


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:160]


def _http(address: str, port: int, path: str) -> tuple[bool, str]:
    connection = http.client.HTTPConnection(address, port, timeout=PROBE_TIMEOUT)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        body = response.read(65536)
    finally:
        connection.close()
    detail = f"GET {path} -> {response.status}"
    if response.status != 200:
        reason = failure_reason(body)
        detail += f": {reason}" if reason else ""
    return response.status == 200, detail


def failure_reason(body: bytes) -> str | None:
    """Why a health URL failed, from its body: the failing checks the app's /health names
    (`{"checks": {NAME: {"ok": false, "error": ...}}}`), else the body's first line."""
    try:
        checks = json.loads(body)["checks"]
        failing = [
            f"{name}: {check.get('error', 'failed')}"
            for name, check in checks.items()
            if isinstance(check, dict) and not check.get("ok")
        ]
    except (ValueError, KeyError, TypeError, AttributeError):
        failing = []
    if failing:
        return "; ".join(failing)[:300]
    lines = body.decode(errors="replace").strip().splitlines()
    return lines[0][:160] if lines else None


def _postgres(address: str, port: int, arg: tuple[str, str, Secrets]) -> tuple[bool, str]:
    import psycopg2

    user, database, secrets = arg
    with psycopg2.connect(
        host=address,
        port=port,
        user=user,
        dbname=database,
        password=secrets.get("postgres_password"),
        connect_timeout=int(PROBE_TIMEOUT),
    ) as connection:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_is_in_recovery(), current_setting('server_version')")
            row = cursor.fetchone()
            assert row is not None  # a SELECT without FROM returns one row
            standby, version = row
    connection.close()
    return True, f"{'standby' if standby else 'primary'}, PostgreSQL {version}"


def _pgbouncer(address: str, port: int, arg: tuple[str, Secrets]) -> tuple[bool, str]:
    import psycopg2

    admin_user, secrets = arg
    connection = psycopg2.connect(
        host=address,
        port=port,
        user=admin_user,
        dbname="pgbouncer",
        password=secrets.get("pgbouncer_password"),
        connect_timeout=int(PROBE_TIMEOUT),
    )
    try:
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute("SHOW DATABASES")
            names = [row[0] for row in cursor.fetchall() if row[0] != "pgbouncer"]
    finally:
        connection.close()
    return True, f"databases: {', '.join(names)}"


def _redis(address: str, port: int, secrets: Secrets) -> tuple[bool, str]:
    from igops.redisops import connect

    client = connect(address, port, secrets.get("redis_password"), PROBE_TIMEOUT)
    try:
        role = client.execute_command("ROLE")  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
    finally:
        client.close()
    if role[0] == "slave":
        return role[3] == "connected", f"replica of {role[1]}:{role[2]} ({role[3]})"
    return True, f"{role[0]}, {plural(len(role[2]), 'replica')}"


def memcached_version(address: str, port: int, _: object = None) -> tuple[bool, str]:
    """Whether memcached answers `version`, and what it said: the probe `igops status` and
    `igops check` share."""
    with socket.create_connection((address, port), timeout=PROBE_TIMEOUT) as sock:
        sock.sendall(b"version\r\n")
        answer = sock.recv(128).decode(errors="replace").strip()
    return answer.startswith("VERSION"), answer


def _munin(address: str, port: int, _: object) -> tuple[bool, str]:
    with socket.create_connection((address, port), timeout=PROBE_TIMEOUT) as sock:
        banner = sock.makefile("rb").readline().decode(errors="replace").strip()
        sock.sendall(b"quit\n")
    return banner.startswith("# munin node"), banner

"""What of the lab answers: igops' own status probes, plus what only the lab has (moto and its
TLS front, the receivers, etcd, the mounts) and a write through each of PgBouncer's databases.
`verify` is `up`'s closing check; `status` is `igops lab status` (nothing started or changed).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from igops.lab import credentials, etcd, pooler, proc, s3tls, state, storage
from igops.lab.state import HOSTS, MOTO, PAGERDUTY, PINGDOM, S3_TLS, SSH_PORT, Paths, with_role

if TYPE_CHECKING:
    from igops.inventory import Fleet


@dataclass
class Component:
    component: str
    host: str
    endpoint: str
    ok: bool
    detail: str


@dataclass
class LabStatus:
    state_dir: str
    inventory: str | None
    components: list[Component] = field(default_factory=list)

    @property
    def running(self) -> bool:
        return any(component.ok for component in self.components)

    def problems(self) -> list[str]:
        return [f"{c.component} on {c.host} ({c.endpoint}): {c.detail}" for c in self.components if not c.ok]


def verify(fleet: Fleet, paths: Paths, creds: credentials.Credentials, patience: float = 20) -> list[Component]:
    """`up`'s closing check: every component answers and each cluster takes a write through
    PgBouncer; raises LabError naming whatever still fails after `patience` seconds."""
    # A fleet that just started can miss a first deadline (a worker's cold first request): a
    # component counts as down only if it keeps failing.
    deadline = time.monotonic() + patience
    while True:
        components = _check(fleet, paths, creds)
        failing = [c for c in components if not c.ok]
        if not failing:
            return components
        if time.monotonic() > deadline:
            raise proc.LabError(
                f"{len(failing)} lab components fail: "
                + "; ".join(f"{c.component} on {c.host} ({c.endpoint}): {c.detail}" for c in failing),
                "see `igops lab status`, `igops pg status CLUSTER` for a cluster that takes no "
                "writes, and the logs under " + str(paths.root),
            )
        time.sleep(1)


def _check(fleet: Fleet, paths: Paths, creds: credentials.Credentials | None) -> list[Component]:
    """igops' own status probes, plus what only the lab has (moto, receivers, mounts) and a write
    through each of PgBouncer's databases: every component can answer while writes fail (PgBouncer
    routing to a standby, or holding a database paused)."""
    from igops import status as fleet_status

    fleet_report = fleet_status.collect(fleet)
    components = [
        Component(
            "ssh",
            h.host,
            f"{h.address}:{SSH_PORT}",
            h.reachable,
            f"load {h.load}" if h.reachable else (h.detail or "unreachable"),
        )
        for h in fleet_report.hosts
    ]
    components += [Component(s.service, s.host, s.endpoint, s.ok, s.detail) for s in fleet_report.services]
    return components + _writes(creds) + _outside_services(paths) + _etcd_members() + _volumes(paths)


def _writes(creds: credentials.Credentials | None) -> list[Component]:
    pgbouncer = with_role("pgbouncer")[0]
    if creds is None:
        return [
            Component(
                "write via pgbouncer",
                pgbouncer.name,
                f"{pgbouncer.address}:{state.PGBOUNCER_PORT}",
                False,
                "not tested: cannot read the lab's passwords (run as root)",
            )
        ]
    return [
        Component("write via pgbouncer", pgbouncer.name, probe.endpoint, probe.ok, probe.detail)
        for probe in pooler.write_probes(creds)
    ]


def _etcd_members() -> list[Component]:
    members = []
    for name, address in state.ETCD_MEMBERS:
        ok, detail = etcd.health(address)
        members.append(Component("etcd", name, f"{address}:{state.ETCD_CLIENT_PORT}", ok, detail))
    return members


def _outside_services(paths: Paths) -> list[Component]:
    import http.client
    import ssl

    def http_ok(address: str, port: int, path: str) -> tuple[bool, str]:
        connection: http.client.HTTPConnection
        if (address, port) == S3_TLS:
            # Through the front, as pgBackRest reaches it: the lab CA must vouch for its address.
            context = ssl.create_default_context(cafile=str(s3tls.ca_file(paths)))
            connection = http.client.HTTPSConnection(address, port, timeout=3, context=context)
        else:
            connection = http.client.HTTPConnection(address, port, timeout=3)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            response.read()
            return response.status == 200, f"GET {path} -> {response.status}"
        except OSError as exc:
            return False, str(exc)
        finally:
            connection.close()

    extras = []
    # moto's dashboard, not its data.json: that dumps every object moto holds (the load
    # generator's photos make it tens of MB) and outgrows the deadline.
    for name, (address, port), path in (
        ("moto", MOTO, "/moto-api/"),
        ("moto-tls", S3_TLS, "/moto-api/"),
        ("pagerduty-receiver", PAGERDUTY, "/_lab/state"),
        ("pingdom-receiver", PINGDOM, "/_lab/state"),
    ):
        ok, detail = http_ok(address, port, path)
        extras.append(Component(name, "-", f"{address}:{port}", ok, detail))
    return extras


def _volumes(paths: Paths) -> list[Component]:
    volumes = []
    mounted = {str(mount.path): mount for mount in storage.mounts_under(paths.root)}
    for lab_host in HOSTS:
        for purpose in lab_host.volumes:
            point = str(paths.mount_point(lab_host.name, purpose))
            mount = mounted.get(point)
            volumes.append(
                Component(
                    f"volume {purpose}",
                    lab_host.name,
                    point,
                    mount is not None,
                    f"{mount.fstype} on {mount.source}" if mount else "not mounted",
                )
            )
    return volumes


def status() -> LabStatus:
    """What of the lab answers now (nothing is started or changed)."""
    from igops import inventory

    paths = state.paths()
    report = LabStatus(str(paths.root), str(paths.inventory) if paths.inventory.exists() else None)
    if paths.inventory.exists() and proc.running_pid(paths.ssh / f"sshd-{state.SSHD_NAME}.pid", paths.root):
        report.components = _check(inventory.load_file(paths.inventory), paths, credentials.load(paths))
    else:
        report.components = _offline_components(paths)
    return report


def _offline_components(paths: Paths) -> list[Component]:
    """Without sshd or an inventory, the probes that need neither."""
    components = []
    for address, port, what in state.lab_endpoints():
        ok = proc.answers(address, port, timeout=0.3)
        components.append(
            Component(
                what,
                next((h.name for h in HOSTS if h.address == address), "-"),
                f"{address}:{port}",
                ok,
                "accepts connections" if ok else "not listening",
            )
        )
    return components + _volumes(paths)

"""The lab: a miniature production fleet on this machine's loopback addresses.

`up` builds or repairs it (idempotent, and it recovers whatever a killed run left behind),
`down` stops it and releases every mount and loop device, `status` says what answers. The
lab is a user of igops: it writes an ordinary inventory and checks itself with igops' own
status probes.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from igops.errors import UsageError
from igops.lab import (
    aws,
    baseline,
    credentials,
    etcd,
    files,
    health,
    inventory as lab_inventory,
    pooler,
    postgres,
    proc,
    s3tls,
    services,
    sshd,
    state,
    storage,
)
from igops.lab.state import (
    CLUSTERS,
    HOSTS,
    MARKER_ENV,
    PAGERDUTY,
    PINGDOM,
    REDIS_MASTER,
    SSH_PORT,
    Paths,
    with_role,
)
from igops.operations import journal
from igops.output import Reporter, plural

if TYPE_CHECKING:
    from contextlib import AbstractContextManager


@dataclass
class LabReport:
    state_dir: str
    inventory: str
    duration_s: float
    primaries: dict[str, str] = field(default_factory=dict)
    recovered: list[str] = field(default_factory=list)
    components: list[health.Component] = field(default_factory=list)


@dataclass
class DownReport:
    state_dir: str
    stopped: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    purged: bool = False
    duration_s: float = 0.0


def _require_root(action: str) -> None:
    if os.geteuid() != 0:
        raise UsageError(
            f"igops lab {action} must run as root: it mounts filesystems, attaches loop devices "
            "and binds port 22 and 80",
            f"run: sudo igops lab {action}",
        )


def _lock(paths: Paths) -> AbstractContextManager[Path]:
    from igops import safety

    return safety.lock(paths.root / "lab", "lab", "lab", _command_line())


def _preflight(paths: Paths) -> None:
    """Refuse before building anything when another program holds one of the lab's ports
    or the app's source is missing."""
    if not (paths.app_source / "requirements.txt").is_file():
        raise UsageError(
            f"the app's source is not at {paths.app_source}",
            "run igops from a checkout of the project (the lab deploys its app/)",
        )
    listening = proc.listeners()
    for address, port, what in state.lab_endpoints():
        holders = listening.get((address, port), [])
        if holders and not _held_by_the_lab(holders, paths.root):
            # A forking server's child serving one last connection holds the listening
            # socket too and cannot be recognised while it exits; look again.
            time.sleep(0.3)
            holders = proc.listeners().get((address, port), [])
        if not _held_by_the_lab(holders, paths.root):
            proc.ensure_free(address, port, what)


def _held_by_the_lab(holders: list[tuple[int, str]], state_root: Path) -> bool:
    return bool(holders) and all(proc.belongs(pid, state_root) for pid, _ in holders)


def _start_all(daemons: list[proc.Daemon], paths: Paths, timeout: float = 60) -> None:
    with ThreadPoolExecutor(max_workers=max(1, len(daemons))) as pool:
        for future in [pool.submit(proc.start, daemon, paths.root, timeout) for daemon in daemons]:
            future.result()


def recover(paths: Paths) -> list[str]:
    """Undo what a killed run can leave: frozen filesystems, its one-off commands still
    running, loop devices nothing mounts, pid files of dead processes."""
    recovered = [f"thawed {mount}" for mount in storage.thaw_all(paths.root)]
    leftovers = proc.build_pids(paths.root)
    if leftovers:
        proc.terminate(leftovers, grace=3)
        recovered.append(f"stopped {plural(len(leftovers), 'command')} of an interrupted run")
    recovered += [f"detached {device}" for device in storage.detach_orphans(paths.root)]
    for pid_file in _pid_files(paths):
        if pid_file.exists() and not proc.running_pid(pid_file, paths.root):
            pid_file.unlink(missing_ok=True)
            recovered.append(f"removed stale {pid_file.name} ({pid_file.parent.relative_to(paths.root)})")
    return recovered


def running() -> bool:
    """Whether any lab daemon runs (cheap: pid files only)."""
    paths = state.paths()
    return any(proc.running_pid(pid_file, paths.root) for pid_file in _pid_files(paths))


def _pid_files(paths: Paths) -> list[Path]:
    found = [
        paths.ssh / f"sshd-{state.SSHD_NAME}.pid",
        paths.services / "moto.pid",
        paths.s3_tls / "nginx.pid",
        paths.services / "receivers.pid",
        *etcd.pid_files(paths),
    ]
    for lab_host in HOSTS:
        directory = paths.host_dir(lab_host.name)
        found.append(paths.munin_dir(lab_host.name) / "munin-node.pid")
        roles = set(lab_host.roles)
        if "redis" in roles:
            found.append(directory / "redis" / "redis.pid")
        if "memcached" in roles:
            found.append(directory / "memcached" / "memcached.pid")
        if "pgbouncer" in roles:
            found.append(paths.pgbouncer_dir() / "pgbouncer.pid")
        if "postgres" in roles:
            found.append(directory / "repmgrd.pid")
        if "app" in roles:
            found.append(paths.app_root(lab_host.name) / "shared" / "gunicorn.pid")
        if "lb" in roles:
            found.append(paths.nginx_dir() / "nginx.pid")
    return found


def receivers_daemon(paths: Paths, creds: credentials.Credentials) -> proc.Daemon:
    env = {
        "IGOPS_PINGDOM_TOKEN": creds.pingdom_token,
        "IGOPS_PAGERDUTY_ROUTING_KEY": creds.pagerduty_routing_key,
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
    }
    argv = (
        sys.executable,
        "-m",
        "igops.lab.receivers",
        "--pagerduty",
        f"{PAGERDUTY[0]}:{PAGERDUTY[1]}",
        "--pingdom",
        f"{PINGDOM[0]}:{PINGDOM[1]}",
        "--record-dir",
        str(paths.services / "receivers"),
    )
    return proc.Daemon(
        "monitoring receivers",
        argv,
        paths.services / "receivers.pid",
        paths.services / "receivers.log",
        endpoint=PINGDOM,
        env=tuple(env.items()),
        config_files=tuple(
            Path(__file__).with_name(f"{module}.py")
            for module in ("receivers", "receiver_base", "pagerduty_receiver", "pingdom_receiver")
        ),
    )


def _ssh(paths: Paths) -> None:
    keys = sshd.ensure_keys(paths.ssh)
    sshd.write_known_hosts(keys, [(lab_host.address, SSH_PORT) for lab_host in HOSTS])
    directory = paths.postgres_ssh
    directory.mkdir(mode=0o700, exist_ok=True)
    key = directory / "id_ed25519"
    if not key.exists():
        proc.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "igops-lab-postgres", "-f", key])
    files.write_file(directory / "known_hosts", keys.known_hosts.read_text())
    files.chown(directory, postgres.OS_USER, recursive=True)
    # Logs in as postgres only (repmgr's switchover and rejoin): sshd finds it by user name.
    files.write_file(
        directory / "authorized_keys", key.with_suffix(".pub").read_text(), mode=0o600, owner=postgres.OS_USER
    )
    sshd.start(
        paths.ssh,
        state.SSHD_NAME,
        keys,
        [lab_host.address for lab_host in HOSTS],
        SSH_PORT,
        env={MARKER_ENV: str(paths.root)},
        user_keys=str(paths.root / "%u-ssh" / "authorized_keys"),
        use_pam=True,
    )


def _redis_master(paths: Paths) -> str:
    """The node that reports itself master now (a Redis failover may have moved it)."""
    from igops.redisops import connect

    for lab_host in with_role("redis"):
        client = connect(lab_host.address, state.REDIS_PORT, None, 2)
        try:
            if client.role()[0] == "master":
                return lab_host.name
        finally:
            client.close()
    return REDIS_MASTER


def up(reporter: Reporter | None = None, repmgrd: bool | None = None) -> LabReport:
    """Build the lab, or bring whatever part of it is missing or stopped back up. `repmgrd`
    starts (True) or stops (False) repmgrd on every Postgres node; None keeps the last choice."""
    reporter = reporter or Reporter()
    _require_root("up")
    started = time.monotonic()
    paths = state.paths()
    paths.root.mkdir(parents=True, exist_ok=True)
    report = LabReport(str(paths.root), str(paths.inventory), 0.0)
    with _lock(paths), ThreadPoolExecutor(max_workers=1, thread_name_prefix="venv") as background:
        with reporter.step("recover what an earlier run left behind") as step:
            report.recovered = recover(paths)
            step.detail = "; ".join(report.recovered) or "nothing to recover"
        with reporter.step("check the lab's addresses and ports") as step:
            _preflight(paths)
            step.detail = f"{plural(len(state.lab_endpoints()), 'endpoint')} on 127.0.10.0/24"
        # pip is the slowest part of a cold start and needs nothing else: start it now.
        venv = background.submit(services.app_venv, paths)
        creds = credentials.ensure(paths)
        with reporter.step("XFS volumes on loop devices (image store + one per host volume)") as step:
            volumes = storage.build(paths)
            step.detail = ", ".join(f"{v.host}:{v.purpose}={v.device}" for v in volumes)
        with reporter.step(f"sshd on {len(HOSTS)} host addresses") as step:
            _ssh(paths)
        with reporter.step("moto (EC2, S3; S3 over TLS too) and the PagerDuty and Pingdom receivers") as step:
            _start_all([aws.daemon(paths), s3tls.daemon(paths), receivers_daemon(paths, creds)], paths)
        with reporter.step("etcd cluster (3 members) for fleet-wide leases and audit") as step:
            _start_all(etcd.daemons(paths), paths)
            step.detail = etcd.wait_healthy()
        with reporter.step("Postgres clusters main (db1 → db2) and pg2 (db3 → db4) with repmgr") as step:
            with ThreadPoolExecutor(max_workers=len(CLUSTERS)) as pool:
                built = list(pool.map(lambda cluster: postgres.build(paths, creds, cluster), CLUSTERS))
            report.primaries = {item.cluster: item.primary for item in built}
            report.recovered += [f"{item.cluster}: {item.repaired}" for item in built if item.repaired]
            step.detail = ", ".join(
                f"{item.cluster}: primary {item.primary}, standby {', '.join(item.standbys)}"
                + (f" ({item.repaired})" if item.repaired else "")
                for item in built
            )
            rerouted = services.route_pgbouncer(paths, {item.cluster: item.primary for item in built if item.repaired})
        with reporter.step("repmgrd (automatic failover) on every Postgres node") as step:
            step.detail = _repmgrd(paths, postgres.repmgrd_wanted(paths, repmgrd))
        with reporter.step("PgBouncer, Redis (master + replica), memcached, munin-node on every host") as step:
            _start_all(
                [
                    services.pgbouncer_daemon(paths, creds, report.primaries),
                    services.memcached_daemon(paths),
                    *services.redis_daemons(paths),
                    *[services.munin_daemon(paths, lab_host.name) for lab_host in HOSTS],
                ],
                paths,
            )
            services.wait_for_replication()
        with reporter.step(
            "PgBouncer: re-read its databases file, resume what an interrupted operation paused"
        ) as step:
            done = pooler.bring_to_health(creds, lab_inventory.coordinator(paths), _command_line(), reload=rerouted)
            report.recovered += [f"pgbouncer: {item}" for item in done if not item.startswith("reloaded")]
            step.detail = "; ".join(done) or "nothing was paused"
        with reporter.step("operations left interrupted: the baseline above has resolved them") as step:
            ended = journal.end_interrupted(
                lab_inventory.coordinator(paths),
                paths.fleet_state,
                "lab up restored the lab's baseline (roles, routes, poolers)",
            )
            report.recovered += [f"operation {op_id}: ended, interrupted" for op_id in ended]
            step.detail = f"ended {', '.join(ended)}" if ended else "none"
        with reporter.step("EC2 instances, EBS volumes, the photo and WAL buckets in moto") as step:
            aws_state = aws.build(volumes)
            step.detail = f"{plural(len(aws_state.instances), 'instance')}, {plural(len(aws_state.volumes), 'volume')}"
        with reporter.step("inventory and secrets") as step:
            text = lab_inventory.render(paths, volumes, aws_state, report.primaries, _redis_master(paths))
            fleet = lab_inventory.write(paths, text)
            step.detail = str(paths.inventory)
        with reporter.step("WAL archive: every cluster archives to its stanza in moto's bucket") as step:
            step.detail = baseline.wal_archiving(fleet)
        from igops.shards import init_shards

        init_shards(fleet, reporter)
        with reporter.step("app: virtualenv, releases, gunicorn on app1..app3") as step:
            environment, first_release = venv.result(), services.first_release_id()
            _start_all(
                [
                    services.gunicorn_daemon(paths, lab_host.name, environment, creds, first_release)
                    for lab_host in with_role("app")
                ],
                paths,
            )
            step.detail = f"venv {environment.name}"
        with reporter.step("nginx load balancer on lb1") as step:
            _start_all([services.nginx_daemon(paths)], paths)
        with reporter.step("monitoring baseline: igops munin install on every host") as step:
            step.detail = baseline.munin_plugins(fleet)
        with reporter.step("monitoring baseline: igops pingdom sync") as step:
            step.detail = baseline.pingdom_checks(fleet)
        with reporter.step("monitoring baseline: the snapshot groups the [snapshot] policy wants, on standbys") as step:
            step.detail = baseline.snapshots(fleet)
        with reporter.step("Postgres standbys replay their primaries' WAL") as step:
            step.detail = baseline.standbys_caught_up(paths, report.primaries)
        with reporter.step("check every host and service with igops status, and a write through PgBouncer") as step:
            report.components = health.verify(fleet, paths, creds)
            step.detail = f"{plural(len(report.components), 'check')} ok"
    report.duration_s = round(time.monotonic() - started, 1)
    return report


def _repmgrd(paths: Paths, wanted: bool) -> str:
    daemons = [
        postgres.repmgrd_daemon(paths, name) for cluster in CLUSTERS for name in (cluster.primary, cluster.standby)
    ]
    if not wanted:
        running_pids = [pid for pid in (proc.running_pid(d.pid_file, paths.root) for d in daemons) if pid]
        proc.terminate(running_pids)
        return (
            f"stopped on {plural(len(running_pids), 'node')}" if running_pids else "not running"
        ) + " (`igops lab up --repmgrd` starts it)"
    _start_all(daemons, paths)
    # A started repmgrd takes a moment to register with its node; igops reads that registration.
    deadline = time.monotonic() + 30
    waiting = [postgres.Node(paths, name) for cluster in CLUSTERS for name in (cluster.primary, cluster.standby)]
    while waiting:
        waiting = [
            node for node in waiting if node.psql("SELECT repmgr.repmgrd_is_running()", database="repmgr") != "t"
        ]
        if waiting and time.monotonic() > deadline:
            raise proc.LabError(
                f"repmgrd does not register on {', '.join(node.name for node in waiting)}",
                f"see {paths.root}/hosts/<node>/log/repmgrd.log",
            )
        time.sleep(0.2)
    return f"running on {plural(len(daemons), 'node')} (`igops lab up --no-repmgrd` stops it)"


def _command_line() -> str:
    from igops import safety

    return safety.redact_argv(["igops", *sys.argv[1:]])


def down(purge: bool = False, reporter: Reporter | None = None) -> DownReport:
    """Stop every lab process, unmount and detach everything; with purge, delete the state."""
    reporter = reporter or Reporter()
    _require_root("down")
    started = time.monotonic()
    paths = state.paths()
    report = DownReport(str(paths.root))
    if not paths.root.exists():
        report.stopped.append("nothing: the state dir does not exist")
        return report
    with _lock(paths):
        with reporter.step("thaw the lab's filesystems") as step:
            # A daemon writing to a frozen filesystem cannot even be killed until it thaws.
            step.detail = ", ".join(storage.thaw_all(paths.root)) or "none was frozen"
        with reporter.step("stop the lab's daemons") as step:
            report.stopped = _stop_daemons(paths)
            step.detail = plural(len(report.stopped), "process", "processes") if report.stopped else "none were running"
        with reporter.step("thaw, unmount and detach the lab's volumes") as step:
            report.problems = storage.teardown(paths.root)
            if report.problems:
                step.status = "failed"
                step.detail = "; ".join(report.problems)
        if purge and report.problems:
            report.problems.append(f"{paths.root} was not deleted: something in it is still mounted")
        elif purge:
            with reporter.step(f"delete {paths.root}"):
                shutil.rmtree(paths.root)
                report.purged = True
    report.duration_s = round(time.monotonic() - started, 1)
    return report


def _stop_daemons(paths: Paths) -> list[str]:
    """Every daemon at once by its pid file, then any lab process still left."""
    targets: list[tuple[str, int, signal.Signals]] = []
    for pid_file in _pid_files(paths):
        pid = proc.running_pid(pid_file, paths.root)
        if pid:
            # gunicorn's TERM waits out in-flight requests; the lab's down need not.
            sig = signal.SIGINT if pid_file.name == "gunicorn.pid" else signal.SIGTERM
            targets.append((str(pid_file.relative_to(paths.root)), pid, sig))
    for cluster in CLUSTERS:
        for name in (cluster.primary, cluster.standby):
            pid = proc.running_pid(paths.pgdata(name) / "postmaster.pid", paths.root)
            if pid:
                targets.append((f"postgres on {name}", pid, signal.SIGINT))  # SIGINT: fast shutdown
    for _, pid, sig in targets:
        proc.send_signal(pid, sig)
    proc.wait_or_kill([pid for _, pid, _ in targets], proc.STOP_GRACE)
    for pid_file in _pid_files(paths):
        pid_file.unlink(missing_ok=True)
    stopped = [name for name, _, _ in targets]
    leftovers = proc.lab_pids(paths.root)
    if leftovers:
        proc.terminate(leftovers)
        stopped += [f"pid {pid}" for pid in leftovers]
    return stopped

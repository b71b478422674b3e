"""The lab's PostgreSQL clusters: a primary and a streaming standby each, set up by repmgr.

Each host's data directory and WAL directory sit on its two XFS volumes; its configuration
sits outside both, in the host directory. A node is initialised once (initdb or
`repmgr standby clone`) and only started on later runs, so a switchover made in the lab
survives `igops lab up`; a node whose initialisation never finished is wiped and redone.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from igops.lab import files, proc
from igops.lab.credentials import Credentials
from igops.lab.state import MARKER_ENV, POSTGRES_PORT, Paths, PgCluster, host

BIN_DIR = Path("/usr/lib/postgresql/15/bin")
OS_USER = "postgres"
NODE_IDS = {"db1": 1, "db2": 2, "db3": 3, "db4": 4}


class Node:
    def __init__(self, paths: Paths, name: str):
        self.paths = paths
        self.name = name
        self.address = host(name).address
        self.pgdata = paths.pgdata(name)
        self.pg_wal = paths.pg_wal(name)
        self.pgconf = paths.pgconf(name)
        self.socket_dir = paths.pg_socket_dir(name)
        self.log = paths.host_dir(name) / "log" / "postgresql.log"
        self.repmgr_conf = paths.repmgr_conf(name)
        self.pgpass = paths.pgpass(name)
        self.marker = paths.marker(f"postgres-{name}")

    @property
    def env(self) -> dict[str, str]:
        return {MARKER_ENV: str(self.paths.root), "PGPASSFILE": str(self.pgpass)}

    def run(self, argv: list[str | Path], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return proc.run(argv, user=OS_USER, env=self.env, **kwargs)

    def pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run(
            [BIN_DIR / "pg_ctl", "-D", self.pgconf, *args], check=check, timeout=90, starts_daemon="start" in args
        )

    def running(self) -> bool:
        return self.pg_ctl("status", check=False).returncode == 0

    def start(self) -> None:
        """Start it, or have a running server read its configuration again (`up` rewrites it)."""
        if self.running():
            self.pg_ctl("reload")
            return
        (self.pgdata / "postmaster.pid").unlink(missing_ok=True)
        self.pg_ctl("-l", str(self.log), "-w", "-t", "60", "start")

    def stop(self) -> None:
        if self.pgdata.joinpath("PG_VERSION").exists() and self.running():
            self.pg_ctl("-w", "-t", "30", "-m", "fast", "stop", check=False)

    def psql(self, script: str, database: str = "postgres", **variables: str) -> str:
        argv: list[str | Path] = [
            BIN_DIR / "psql",
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            self.socket_dir,
            "-p",
            str(POSTGRES_PORT),
            "-U",
            "postgres",
            "-d",
            database,
        ]
        for name, value in variables.items():
            argv += ["-v", f"{name}={value}"]
        return self.run(argv, input=script).stdout.strip()

    def repmgr(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run([BIN_DIR / "repmgr", "-f", self.repmgr_conf, *args], timeout=120)

    def in_recovery(self) -> bool:
        return self.psql("SELECT pg_is_in_recovery()") == "t"

    def wipe(self) -> None:
        self.stop()
        self.marker.unlink(missing_ok=True)
        for directory in (self.pgdata, self.pg_wal):
            shutil.rmtree(directory, ignore_errors=True)

    def write_config(self, credentials: Credentials) -> None:
        values = dict(
            host=self.name,
            address=self.address,
            port=POSTGRES_PORT,
            pgdata=self.pgdata,
            pgconf=self.pgconf,
            socket_dir=self.socket_dir,
            pg_wal=self.pg_wal,
            log=self.log,
            bin_dir=BIN_DIR,
            node_id=NODE_IDS[self.name],
            pgpass=self.pgpass,
            repmgr_conf=self.repmgr_conf,
            known_hosts=self.paths.postgres_ssh / "known_hosts",
            ssh_key=self.paths.postgres_ssh / "id_ed25519",
        )
        for directory in (self.pgconf, self.socket_dir, self.log.parent):
            directory.mkdir(parents=True, exist_ok=True)
            files.chown(directory, OS_USER)
        for name in ("postgresql.conf", "pg_hba.conf"):
            files.write_file(self.pgconf / name, files.render(name, **values), owner=OS_USER)
        files.write_file(self.pgconf / "pg_ident.conf", "", owner=OS_USER)
        files.write_file(self.repmgr_conf, files.render("repmgr.conf", **values), owner=OS_USER)
        files.write_file(
            self.pgpass,
            f"*:*:*:repmgr:{credentials.repmgr_password}\n*:*:*:postgres:{credentials.postgres_password}\n",
            mode=0o600,
            owner=OS_USER,
        )
        for purpose in ("data", "wal"):
            files.chown(self.paths.mount_point(self.name, purpose), OS_USER)


@dataclass(frozen=True)
class ClusterState:
    cluster: str
    primary: str
    standbys: list[str]
    repaired: str | None = None


def build(paths: Paths, credentials: Credentials, cluster: PgCluster) -> ClusterState:
    """Bring one cluster up; returns which node is primary now (it changes on switchover)."""
    nodes = {name: Node(paths, name) for name in (cluster.primary, cluster.standby)}
    for node in nodes.values():
        node.write_config(credentials)
    primary, standby = nodes[cluster.primary], nodes[cluster.standby]
    recloned = False
    if not primary.marker.exists() or not (primary.pgdata / "PG_VERSION").exists():
        standby.wipe()
        primary.wipe()
        _init_primary(primary, credentials, cluster)
        recloned = True
    for node in nodes.values():
        if node.marker.exists():
            node.start()
    writable = [node for node in nodes.values() if node.marker.exists() and not node.in_recovery()]
    repaired = None
    if not writable and all(node.marker.exists() for node in nodes.values()):
        # A switchover or failover stopped between fencing the old primary and promoting the
        # candidate: nothing can take writes, and no member is ahead of the one with the most WAL.
        writable = [_promote_furthest(list(nodes.values()))]
        recloned = True
        repaired = (
            f"no member took writes (an interrupted switchover or failover?): promoted {writable[0].name}, "
            "which had replayed the most WAL; the others are cloned from it"
        )
    if len(writable) != 1:
        raise proc.LabError(
            f"cluster {cluster.name}: {len(writable)} writable nodes "
            f"({', '.join(node.name for node in writable) or 'none'})",
            "stop the member whose writes to give up, put standby.signal in its data directory, "
            "`igops lab up`, then `igops pg rejoin` it (or `igops lab down --purge`)",
        )
    current = writable[0]
    _ensure_roles(current, credentials, cluster)
    for node in nodes.values():
        if node is not current and (recloned or not node.marker.exists()):
            _clone_standby(node, current)
    return ClusterState(
        cluster.name, current.name, [node.name for node in nodes.values() if node is not current], repaired
    )


def repmgrd_daemon(paths: Paths, name: str) -> proc.Daemon:
    """repmgrd on one node, in the foreground of its own session like the lab's other daemons.
    It runs only when the lab is asked for it (`lab up --repmgrd`): most repmgr fleets run it, and
    igops must then keep it from promoting on its own in the middle of a switchover."""
    node = Node(paths, name)
    directory = paths.host_dir(name)
    return proc.Daemon(
        f"repmgrd on {name}",
        (str(BIN_DIR / "repmgrd"), "-f", str(node.repmgr_conf), "--daemonize=false", "--no-pid-file"),
        directory / "repmgrd.pid",
        directory / "log" / "repmgrd.log",
        user=OS_USER,
        env=tuple(node.env.items()),
        config_files=(node.repmgr_conf,),
    )


def repmgrd_wanted(paths: Paths, choice: bool | None) -> bool:
    """Whether repmgrd runs: the choice given to `lab up`, else the one the last `lab up` made."""
    setting = paths.root / "repmgrd"
    if choice is not None:
        setting.write_text("on\n" if choice else "off\n")
        return choice
    return setting.exists() and setting.read_text().strip() == "on"


def _promote_furthest(nodes: list[Node]) -> Node:
    """Promote the standby that replayed the most WAL (the first listed on a tie)."""
    from igops.postgres import optional_lsn

    chosen = max(nodes, key=lambda node: optional_lsn(node.psql("SELECT pg_last_wal_replay_lsn()")) or 0)
    chosen.repmgr("standby", "promote")
    return chosen


def _init_primary(node: Node, credentials: Credentials, cluster: PgCluster) -> None:
    node.pg_wal.parent.mkdir(parents=True, exist_ok=True)
    node.run(
        [
            BIN_DIR / "initdb",
            "-D",
            node.pgdata,
            "--waldir",
            node.pg_wal,
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--locale",
            "C.UTF-8",
            "--auth-local",
            "peer",
            "--auth-host",
            "scram-sha-256",
        ],
        timeout=120,
    )
    # The configuration lives in pgconf; copies here would only mislead.
    for name in ("postgresql.conf", "pg_hba.conf", "pg_ident.conf"):
        (node.pgdata / name).unlink(missing_ok=True)
    node.start()
    _ensure_roles(node, credentials, cluster)
    node.repmgr("primary", "register", "--force")
    node.marker.parent.mkdir(parents=True, exist_ok=True)
    node.marker.touch()


def _ensure_roles(node: Node, credentials: Credentials, cluster: PgCluster) -> None:
    script = """
ALTER ROLE postgres PASSWORD :'postgres_password';
SELECT 'CREATE ROLE repmgr LOGIN SUPERUSER REPLICATION'
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'repmgr') \\gexec
ALTER ROLE repmgr PASSWORD :'repmgr_password';
SELECT 'CREATE ROLE app LOGIN' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'app') \\gexec
ALTER ROLE app PASSWORD :'app_password';
SELECT 'CREATE DATABASE repmgr OWNER repmgr'
 WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'repmgr') \\gexec
"""
    # The service's databases belong to its role, so what the service creates is its own.
    for database in cluster.databases:
        script += (
            f"SELECT 'CREATE DATABASE {database} OWNER app' WHERE NOT EXISTS "
            f"(SELECT FROM pg_database WHERE datname = '{database}') \\gexec\n"
        )
    node.psql(
        script,
        postgres_password=credentials.postgres_password,
        repmgr_password=credentials.repmgr_password,
        app_password=credentials.app_password,
    )


def _clone_standby(node: Node, upstream: Node) -> None:
    node.wipe()
    slot = f"repmgr_slot_{NODE_IDS[node.name]}"
    upstream.psql(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = :'slot' AND NOT active",
        slot=slot,
    )
    node.run(
        [
            BIN_DIR / "repmgr",
            "-f",
            node.repmgr_conf,
            "-h",
            upstream.address,
            "-p",
            str(POSTGRES_PORT),
            "-U",
            "repmgr",
            "-d",
            "repmgr",
            "standby",
            "clone",
            "--fast-checkpoint",
        ],
        timeout=300,
    )
    for name in ("postgresql.conf", "pg_hba.conf", "pg_ident.conf"):
        (node.pgdata / name).unlink(missing_ok=True)
    node.start()
    node.repmgr("standby", "register", "--force", "--wait-sync=30")
    node.marker.touch()

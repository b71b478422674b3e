"""The lab's three-member etcd cluster: where an inventory's [coordination] can keep igops'
leases and audit trail (see igops.coordination).

Each member is a lab daemon with its data under `<state>/etcd/<member>/`, run as Debian's
`etcd` user. A running member whose command line is unchanged is left alone, so a later
`lab up` restarts nothing; a stopped member rejoins with the data it had.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

from igops.lab import files, proc
from igops.lab.state import ETCD_CLIENT_PORT, ETCD_MEMBERS, ETCD_PEER_PORT, Paths
from igops.output import plural

BINARY = "/usr/bin/etcd"
OS_USER = "etcd"
CLUSTER_TOKEN = "igops-lab-etcd"


def _initial_cluster() -> str:
    return ",".join(f"{name}=http://{address}:{ETCD_PEER_PORT}" for name, address in ETCD_MEMBERS)


def daemon(paths: Paths, name: str) -> proc.Daemon:
    address = dict(ETCD_MEMBERS)[name]
    directory = paths.etcd_dir(name)
    data = directory / "data"
    data.mkdir(parents=True, exist_ok=True, mode=0o700)
    files.chown(directory, OS_USER, recursive=True)
    client, peer = f"http://{address}:{ETCD_CLIENT_PORT}", f"http://{address}:{ETCD_PEER_PORT}"
    # The initial-cluster settings count only on a member's first start; later ones read the
    # membership from the data directory.
    argv = (
        BINARY,
        "--name",
        name,
        "--data-dir",
        str(data),
        "--listen-client-urls",
        client,
        "--advertise-client-urls",
        client,
        "--listen-peer-urls",
        peer,
        "--initial-advertise-peer-urls",
        peer,
        "--initial-cluster",
        _initial_cluster(),
        "--initial-cluster-token",
        CLUSTER_TOKEN,
        "--initial-cluster-state",
        "new",
        "--logger",
        "zap",
        "--log-outputs",
        "stderr",
    )
    return proc.Daemon(
        f"etcd {name}",
        argv,
        directory / "etcd.pid",
        directory / "etcd.log",
        endpoint=(address, ETCD_CLIENT_PORT),
        user=OS_USER,
        cwd=directory,
    )


def daemons(paths: Paths) -> list[proc.Daemon]:
    return [daemon(paths, name) for name, _ in ETCD_MEMBERS]


def pid_files(paths: Paths) -> list[Path]:
    return [paths.etcd_dir(name) / "etcd.pid" for name, _ in ETCD_MEMBERS]


def health(address: str, timeout: float = 2.0) -> tuple[bool, str]:
    """etcd's own /health: true only while the member sees a leader."""
    try:
        with urllib.request.urlopen(f"http://{address}:{ETCD_CLIENT_PORT}/health", timeout=timeout) as response:
            body = json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        try:
            body = json.loads(exc.read() or b"{}")
        except ValueError:
            return False, f"HTTP {exc.code}"
    except (OSError, ValueError) as exc:
        return False, str(getattr(exc, "reason", exc))
    ok = str(body.get("health")) == "true"
    return ok, "healthy" if ok else f"unhealthy: {body.get('reason') or 'no leader (a majority of members down?)'}"


def wait_healthy(timeout: float = 30) -> str:
    """Until every member reports itself healthy (a member answers before it has a leader)."""
    deadline = time.monotonic() + timeout
    while True:
        states = {name: health(address) for name, address in ETCD_MEMBERS}
        failing = {name: detail for name, (ok, detail) in states.items() if not ok}
        if not failing:
            return f"{plural(len(ETCD_MEMBERS), 'member')} healthy on {', '.join(a for _, a in ETCD_MEMBERS)}"
        if time.monotonic() > deadline:
            raise proc.LabError(
                "etcd: " + "; ".join(f"{name} {detail}" for name, detail in failing.items()) + f" after {timeout:g} s",
                "see <lab state>/etcd/<member>/etcd.log",
            )
        time.sleep(0.2)
